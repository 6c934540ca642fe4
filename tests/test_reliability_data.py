"""Datasets and recipe files that would loop, hang or exhaust memory: refused in one line naming the file.

Class folders linked back into the dataset, FIFOs, links to /dev/zero, huge (sparse) files and tar members,
and truncated JPEGs that PIL's verify() lets through.
"""

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill import data_files, data_tar
from distill.data import DatasetError, create_dataset
from distill.errors import RecipeError
from distill.recipe import load_recipe_file

GiB = 1 << 30
# Opening a FIFO the blocking way waits forever for a writer: should the fix break, fail, do not hang the run.
FIFO_GUARD = pytest.mark.timeout(60)


def write_image(path, color=(0, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def two_classes(root):
    write_image(root / "cat" / "a.png", (10, 0, 0))
    write_image(root / "dog" / "b.png", (0, 20, 0))
    return root


def one_line(message):
    assert "\n" not in str(message)
    return str(message)


def write_list(root, paths):
    """A CSV in ``root`` listing ``paths`` (relative to it), each labelled cat."""
    csv = root / "list.csv"
    csv.write_text("path,label\n" + "".join(f"{p},cat\n" for p in paths))
    return csv


def png_bytes():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- 1. class folders linked back into the dataset


@pytest.mark.parametrize("target", ["root", "ancestor"])
def test_a_class_folder_linked_to_the_dataset_or_an_ancestor_is_refused_naming_it(tmp_path, target):
    root = two_classes(tmp_path / "ds")
    (root / "loop").symlink_to(root if target == "root" else tmp_path, target_is_directory=True)
    with pytest.raises(DatasetError, match=f"^{root / 'loop'}: class folder 'loop' links to .* holds the dataset"):
        create_dataset(str(root))


@pytest.mark.parametrize("target", ["dog", "dog/sub"])
def test_a_class_folder_linked_into_another_class_is_refused_naming_both(tmp_path, target):
    root = two_classes(tmp_path / "ds")
    write_image(root / "dog" / "sub" / "c.png")
    (root / "zebra").symlink_to(root / target, target_is_directory=True)
    with pytest.raises(DatasetError, match=f"^{root / 'zebra'}: class folder 'zebra' .* class folder 'dog'") as err:
        create_dataset(str(root))
    one_line(err.value)


def test_a_class_folder_linked_from_outside_the_dataset_is_followed(tmp_path):
    root = two_classes(tmp_path / "ds")
    write_image(tmp_path / "elsewhere" / "e.png", (0, 0, 30))
    (root / "emu").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    ds = create_dataset(str(root))
    assert ds.classes == ["cat", "dog", "emu"] and len(ds) == 3
    assert ds.load(2).getpixel((0, 0)) == (0, 0, 30)


# ---- 2. only regular files of bounded size


@FIFO_GUARD
def test_a_fifo_in_an_image_folder_is_refused_naming_it_not_waited_on(tmp_path):
    root = two_classes(tmp_path / "ds")
    os.mkfifo(root / "cat" / "pipe.png")
    with pytest.raises(DatasetError, match=f"^{root / 'cat' / 'pipe.png'}: a FIFO, not a regular file$"):
        create_dataset(str(root))


@FIFO_GUARD
def test_a_file_swapped_for_a_fifo_after_listing_is_refused_on_load(tmp_path):
    root = two_classes(tmp_path / "ds")
    ds = create_dataset(str(root))
    (root / "cat" / "a.png").unlink()
    os.mkfifo(root / "cat" / "a.png")  # opened without O_NONBLOCK this would block the test forever
    with pytest.raises(DatasetError, match=f"^{root / 'cat' / 'a.png'}: a FIFO, not a regular file$"):
        ds.load(0)


def test_a_link_to_dev_zero_is_refused_in_a_folder_and_a_csv(tmp_path):
    root = two_classes(tmp_path / "ds")
    (root / "dog" / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(DatasetError, match=f"^{root / 'dog' / 'zero.png'}: a character device, not a regular file$"):
        create_dataset(str(root))
    csv = write_list(root, ["cat/a.png", "dog/zero.png"])
    with pytest.raises(DatasetError, match=r"list.csv: row 2 \(line 3\): 'dog/zero.png': a character device") as err:
        create_dataset(f"csv:{csv}")
    one_line(err.value)


def test_a_huge_sparse_image_file_is_refused_naming_its_size(tmp_path):
    root = two_classes(tmp_path / "ds")
    huge = root / "cat" / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(8 * GiB)  # a hole: no disk used
    with pytest.raises(DatasetError, match=f"^{huge}: 8 GiB, more than the 512 MiB allowed for an image file$"):
        create_dataset(str(root))


def test_an_image_file_grown_past_the_cap_after_listing_is_refused_on_load(tmp_path, monkeypatch):
    root = two_classes(tmp_path / "ds")
    ds = create_dataset(str(root))
    monkeypatch.setattr(data_files, "MAX_IMAGE_BYTES", 16)  # the same check as for 512 MiB, without writing that much
    with pytest.raises(DatasetError, match=f"^{root / 'cat' / 'a.png'}: .* more than the 16 bytes allowed"):
        ds.load(0)


def sparse_tar(path, member_size):
    """A tar whose one member, k.png, claims ``member_size`` bytes, all a hole in the tar file (no disk used)."""
    info = tarfile.TarInfo("k.png")
    info.size = member_size
    header = info.tobuf(tarfile.GNU_FORMAT)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + member_size + 2 * tarfile.BLOCKSIZE)  # data, then the end-of-archive blocks
    return path


def test_a_sparse_8_gib_tar_member_is_refused_when_indexed(tmp_path):
    shard = sparse_tar(tmp_path / "big.tar", 8 * GiB)
    with pytest.raises(DatasetError, match=f"^{shard}:k.png: 8 GiB, more than the 512 MiB allowed for an image"):
        create_dataset(f"wds:{shard}")


def test_tar_members_over_their_caps_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data_tar, "MAX_IMAGE_BYTES", 1000)
    shard = sparse_tar(tmp_path / "small.tar", 1001)
    with pytest.raises(DatasetError, match=f"^{shard}:k.png: 1001 bytes, more than the 1000 bytes allowed"):
        create_dataset(f"wds:{shard}")
    monkeypatch.setattr(data_tar, "MAX_TEXT_MEMBER_BYTES", 10)
    shard = tmp_path / "caption.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("k.png", png_bytes()), ("k.txt", b"a caption longer than ten bytes")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(DatasetError, match=f"^{shard}:k.txt: 31 bytes, more than the 10 bytes allowed for a .txt"):
        create_dataset(f"wds:{shard}")


@FIFO_GUARD
def test_a_fifo_named_like_a_shard_is_not_opened(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    os.mkfifo(shards / "a.tar")
    with pytest.raises(DatasetError, match=r"holds no \.tar shards"):
        create_dataset(f"wds:{shards}")
    with pytest.raises(DatasetError, match=f"^tar shard '{shards / 'a.tar'}' is not a regular file$"):
        create_dataset(f"wds:{shards / 'a.tar'}")


@FIFO_GUARD
def test_a_recipe_that_is_a_device_a_fifo_or_too_large_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"^recipe /dev/zero: cannot read: a character device, not a regular file$"):
        load_recipe_file("/dev/zero")
    os.mkfifo(tmp_path / "pipe.yaml")
    with pytest.raises(RecipeError, match=r"pipe\.yaml: cannot read: a FIFO, not a regular file$"):
        load_recipe_file(tmp_path / "pipe.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("a: 1\n" + "#" * (1 << 20))
    with pytest.raises(
        RecipeError,
        match=r"big\.yaml: cannot read: 1048581 bytes \(1\.0 MiB\), more than the 1 MiB allowed for a recipe$",
    ):
        load_recipe_file(big)
    (tmp_path / "latin1.yaml").write_bytes(b"seed: \xe9\n")
    with pytest.raises(RecipeError, match=r"latin1\.yaml: not UTF-8 text"):
        load_recipe_file(tmp_path / "latin1.yaml")


def test_distill_train_on_dev_zero_is_one_line_and_exit_2():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "distill-train"), "/dev/zero"],
        capture_output=True,
        text=True,
        timeout=60,  # a guard only: the refusal takes the time Python takes to start
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "/dev/zero" in lines[0] and "not a regular file" in lines[0], result.stderr


# ---- 3. --skip-unreadable decodes every pixel


def truncated_jpeg(path):
    """A real JPEG cut in half: PIL's verify() passes it, decoding its pixels fails."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with Image.open(path) as image:
        image.verify()  # the premise: the structure check alone lets it through
    return path


def test_skip_unreadable_skips_a_truncated_jpeg_and_names_it(tmp_path):
    root = two_classes(tmp_path / "ds")
    cut = truncated_jpeg(root / "cat" / "cut.jpg")
    ds = create_dataset(str(root), skip_unreadable=True)
    assert ds.skipped == [str(cut)] and len(ds) == 2
    assert [ds.load(i).getpixel((0, 0)) for i in range(2)] == [(10, 0, 0), (0, 20, 0)]


def test_a_truncated_jpeg_without_skip_unreadable_is_one_line_naming_it(tmp_path):
    root = two_classes(tmp_path / "ds")
    cut = truncated_jpeg(root / "cat" / "cut.jpg")
    ds = create_dataset(str(root))
    with pytest.raises(DatasetError, match=f"^{cut}: not a readable image .*truncated") as err:
        ds.load(1)
    one_line(err.value)
