"""Image datasets: stable ids, labels, fingerprints, every spec form, and bad input named clearly."""

import io
import multiprocessing
import os
import pickle
import re
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image
from tar_helpers import add_member, write_shard

from distill import data, data_digits, data_files
from distill.data import DatasetError, create_dataset

# Folder layout used by several tests: (relative path, colour); listed in id order.
FOLDER_FILES = [
    ("cat/a.PNG", (10, 0, 0)),
    ("cat/b.png", (20, 0, 0)),
    ("cat/sub/c.bmp", (30, 0, 0)),
    ("dog/x.tif", (0, 40, 0)),
    ("dog/y.png", (0, 50, 0)),
]


def write_image(path, color=(0, 0, 0), size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_folder(root, files=FOLDER_FILES):
    for relative, color in files:
        write_image(root / relative, color)
    return root


def colors(ds):
    return [ds.load(i).getpixel((0, 0)) for i in range(len(ds))]


def png_bytes(array, compress_level=6):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def write_csv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    create_dataset("digits", cache_dir=str(cache))
    return cache


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory):
    """Three classes of distinct random-noise PNGs (so pixel comparisons identify each sample)."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(1)
    for c, count in enumerate((3, 2, 4)):
        for k in range(count):
            path = root / f"class{c}" / f"img{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(path)
    return root


# ---------------------------------------------------------------- digits


def test_digits_builds_once_with_a_fixed_split(digits_cache, monkeypatch):
    from sklearn.datasets import load_digits

    train = create_dataset("digits", cache_dir=str(digits_cache))
    val = create_dataset("digits", split="val", cache_dir=str(digits_cache))
    assert train.num_classes == val.num_classes == 10
    assert train.classes == [str(d) for d in range(10)]
    assert (len(train), len(val)) == (1437, 360)
    assert train.spec == "digits" and train.labels.dtype == np.int64

    # layout <cache>/digits/{train,val}/<class>/<index>.png; nothing left from the temporary build
    assert sorted(os.listdir(digits_cache)) == ["digits"]
    files = {split: sorted((digits_cache / "digits" / split).glob("*/*.png")) for split in ("train", "val")}
    indices = {split: {int(p.stem) for p in paths} for split, paths in files.items()}
    order = np.random.default_rng(0).permutation(1797)
    assert indices["train"] == set(order[:1437].tolist()) and indices["val"] == set(order[1437:].tolist())

    # each file's class folder is the sklearn target of its index
    target = load_digits().target
    assert all(int(p.parent.name) == target[int(p.stem)] for p in files["train"] + files["val"])
    np.testing.assert_array_equal(
        np.bincount(train.labels, minlength=10) + np.bincount(val.labels, minlength=10),
        np.bincount(target, minlength=10),
    )

    # a second create_dataset reuses the cache: building again would fail here
    monkeypatch.setattr(data_digits, "_write_digits", lambda folder: pytest.fail("digits were rebuilt"))
    again = create_dataset("digits", cache_dir=str(digits_cache))
    assert again.fingerprint() == train.fingerprint()
    assert train.fingerprint() != val.fingerprint()


def test_digits_images_are_rgb_32x32_upscaled_digits(digits_cache):
    from sklearn.datasets import load_digits

    val = create_dataset("digits", split="val", cache_dir=str(digits_cache))
    images = load_digits().images
    index = int(sorted((digits_cache / "digits" / "val" / str(val.labels[0])).glob("*.png"))[0].stem)
    image = val.load(0)
    assert image.mode == "RGB" and image.size == (32, 32)
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    # downsampling the 32x32 image back to 8x8 gives roughly the original 0..16 values
    small = pixels[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3)) * 16 / 255
    assert np.abs(small - images[index]).mean() < 1.5
    assert pixels.max() > 150


def test_digits_identical_in_another_cache_dir(digits_cache, tmp_path):
    for split in ("train", "val"):
        a = create_dataset("digits", split=split, cache_dir=str(digits_cache))
        b = create_dataset("digits", split=split, cache_dir=str(tmp_path))
        assert a.fingerprint() == b.fingerprint()
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(np.asarray(a.load(7)), np.asarray(b.load(7)))


def fake_digits(folder, per_split=1):
    """A tiny stand-in for the digits build (the real one is covered above): one class, a few images per split."""
    for split in ("train", "val"):
        for k in range(per_split):
            write_image(folder / split / "0" / f"{k:04d}.png", (k, k, k))


def test_digits_cache_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setattr(data_digits, "_write_digits", fake_digits)
    ds = create_dataset("digits", split="val")
    assert (tmp_path / "env-cache" / "digits" / "val" / "0" / "0000.png").is_file()
    assert len(ds) == 1


def test_digits_lost_race_uses_the_winners_copy(tmp_path, monkeypatch):
    """Another process renames its finished copy into place while we build ours: we use theirs."""

    def write_and_lose(folder):
        fake_digits(folder, per_split=1)
        fake_digits(tmp_path / "digits", per_split=3)  # the other process finishes first

    monkeypatch.setattr(data_digits, "_write_digits", write_and_lose)
    ds = create_dataset("digits", cache_dir=str(tmp_path))
    assert len(ds) == 3  # theirs
    assert sorted(os.listdir(tmp_path)) == ["digits"]  # our temporary copy was removed


# ---------------------------------------------------------------- image folders


def test_folder_ids_sorted_by_class_then_path(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"junk")
    (root / ".cache").mkdir()
    ds = create_dataset(str(root))
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert colors(ds) == [c for _, c in FOLDER_FILES]
    assert ds.load(0).mode == "RGB"
    assert ds.spec == str(root)


def test_folder_ids_independent_of_creation_order(tmp_path):
    a = make_folder(tmp_path / "a", FOLDER_FILES)
    b = make_folder(tmp_path / "b", FOLDER_FILES[::-1])
    os.utime(b / "cat" / "b.png", (0, 0))
    ds_a, ds_b = create_dataset(str(a)), create_dataset(str(b))
    assert colors(ds_a) == colors(ds_b)
    np.testing.assert_array_equal(ds_a.labels, ds_b.labels)
    assert ds_a.fingerprint() == ds_b.fingerprint()  # relative paths only: the location does not matter


def test_fingerprint_tracks_sizes_and_paths(tmp_path):
    root = make_folder(tmp_path / "ds")
    ds = create_dataset(str(root))
    before = ds.fingerprint()
    assert re.fullmatch("[0-9a-f]{64}", before)  # a sha256 hex digest
    assert create_dataset(str(root)).fingerprint() == before

    size = (root / "cat" / "b.png").stat().st_size
    noise = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    noise[0, 0] = (20, 0, 0)
    Image.fromarray(noise).save(root / "cat" / "b.png")  # same name, same pixel (0, 0), new size
    assert (root / "cat" / "b.png").stat().st_size != size
    assert create_dataset(str(root)).load(1).getpixel((0, 0)) == (20, 0, 0)
    assert create_dataset(str(root)).fingerprint() != before
    assert ds.fingerprint() == before  # computed once and cached

    write_image(root / "cat" / "b.png", (20, 0, 0))
    assert create_dataset(str(root)).fingerprint() == before
    (root / "cat" / "b.png").rename(root / "cat" / "bb.png")
    assert create_dataset(str(root)).fingerprint() != before


def test_fingerprint_tracks_labels(tmp_path):
    make_folder(tmp_path)
    one = write_csv(tmp_path / "one.csv", ["path,label", "cat/a.PNG,0", "cat/b.png,1", "dog/y.png,1"])
    two = write_csv(tmp_path / "two.csv", ["path,label", "cat/a.PNG,1", "cat/b.png,0", "dog/y.png,1"])
    ds_one, ds_two = create_dataset(f"csv:{one}"), create_dataset(f"csv:{two}")
    assert ds_one.classes == ds_two.classes == ["0", "1"]
    assert ds_one.fingerprint() != ds_two.fingerprint()
    # class names are part of it too: folder 'dog' renamed, same ids, labels, sizes
    root = make_folder(tmp_path / "f")
    before = create_dataset(str(root)).fingerprint()
    (root / "dog").rename(root / "emu")
    assert create_dataset(str(root)).fingerprint() != before


def test_describe(tmp_path):
    root = make_folder(tmp_path / "ds")
    ds = create_dataset(str(root))
    assert ds.describe() == {
        "spec": str(root),
        "num_samples": 5,
        "num_classes": 2,
        "classes": ["cat", "dog"],
        "fingerprint": ds.fingerprint(),
        "fingerprint_mode": "fast",
        "skipped": [],
    }


# ---------------------------------------------------------------- CSV / TSV


def test_csv_with_class_names_keeps_row_order(tmp_path, monkeypatch):
    make_folder(tmp_path / "imgs")
    absolute = tmp_path / "imgs" / "dog" / "x.tif"
    csv_path = write_csv(
        tmp_path / "list.csv",
        ["path,label", "imgs/dog/y.png, dog", "", "imgs/cat/b.png,cat", f"{absolute},dog", "imgs/cat/a.PNG,cat"],
    )
    monkeypatch.chdir(tmp_path / "imgs")  # relative paths are relative to the CSV, not the working directory
    ds = create_dataset(f"csv:{csv_path}")
    assert ds.classes == ["cat", "dog"]
    assert ds.labels.tolist() == [1, 0, 1, 0]
    assert colors(ds) == [(0, 50, 0), (20, 0, 0), (0, 40, 0), (10, 0, 0)]
    assert ds.spec == f"csv:{csv_path}"


def test_csv_with_integer_labels(tmp_path):
    make_folder(tmp_path)
    csv_path = write_csv(tmp_path / "list.csv", ["label,path", "2,cat/a.PNG", "0,dog/y.png", "02,cat/b.png"])
    ds = create_dataset(f"csv:{csv_path}")
    assert ds.classes == ["0", "1", "2"] and ds.num_classes == 3
    assert ds.labels.tolist() == [2, 0, 2]
    assert colors(ds) == [(10, 0, 0), (0, 50, 0), (20, 0, 0)]


@pytest.mark.parametrize(("name", "sep"), [("list.tsv", "\t"), ("list.csv", "\t"), ("list.txt", ";")])
def test_tsv_and_detected_delimiters(tmp_path, name, sep):
    make_folder(tmp_path)
    lines = ["id", "path", "label"], ["7", "dog/x.tif", "dog"], ["8", "cat/a.PNG", "cat"]
    path = write_csv(tmp_path / name, [sep.join(row) for row in lines])
    ds = create_dataset(f"csv:{path}")
    assert ds.classes == ["cat", "dog"]
    assert ds.labels.tolist() == [1, 0]
    assert colors(ds) == [(0, 40, 0), (10, 0, 0)]


# ---------------------------------------------------------------- webdataset tar shards


def write_shards(folder_ds, out, per_shard=4):
    """Shards of the folder dataset's samples, each image re-encoded as PNG; shards written last-first."""
    out.mkdir()
    starts = list(range(0, len(folder_ds), per_shard))
    for start in reversed(starts):
        samples = []
        for i in range(start, min(start + per_shard, len(folder_ds))):
            members = {"png": png_bytes(np.asarray(folder_ds.load(i))), "cls": f"{folder_ds.labels[i]}\n"}
            if i % 2:  # member order within a sample does not matter; extra members are ignored
                members = {**dict(reversed(members.items())), "json": b"{}"}
            samples.append((f"sample{i:05d}", members))
        write_shard(out / f"shard-{start // per_shard:03d}.tar", samples)
    return out


def test_wds_loads_same_pixels_as_its_folder(noise_folder, tmp_path):
    folder = create_dataset(str(noise_folder))
    shards = write_shards(folder, tmp_path / "shards")
    ds = create_dataset(f"wds:{shards}/shard-*.tar")
    assert len(ds) == len(folder) == 9
    assert ds.classes == ["0", "1", "2"]
    np.testing.assert_array_equal(ds.labels, folder.labels)
    for i in reversed(range(len(ds))):
        image = ds.load(i)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), np.asarray(folder.load(i)))
    # a folder of shards and a single shard path work too
    assert create_dataset(f"wds:{shards}").fingerprint() == ds.fingerprint()
    single = create_dataset(f"wds:{shards}/shard-001.tar")
    assert len(single) == 4
    np.testing.assert_array_equal(np.asarray(single.load(0)), np.asarray(folder.load(4)))
    ds.close()


def test_wds_fingerprint_uses_member_sizes(noise_folder, tmp_path):
    folder = create_dataset(str(noise_folder))
    fingerprints = []
    for level in (0, 9):
        path = tmp_path / f"level{level}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(3):
                add_member(tar, f"{i}.png", png_bytes(np.asarray(folder.load(i)), compress_level=level))
                add_member(tar, f"{i}.cls", b"0")
        fingerprints.append(create_dataset(f"wds:{path}").describe()["fingerprint"])
    shutil.copy(tmp_path / "level0.tar", tmp_path / "copy.tar")
    fingerprints.append(create_dataset(f"wds:{tmp_path / 'copy.tar'}").fingerprint())
    assert fingerprints[0] != fingerprints[1]
    assert fingerprints[0] != fingerprints[2]  # the shard's name is part of each sample's path


def _load_in_child(ds, ids, queue, parent_files):
    pixels = [np.asarray(ds.load(i)).tobytes() for i in ids]
    # the shard files the parent opened (kept alive here by parent_files) are not reused: this process opened its own
    own_files = bool(ds._files) and not any(f is p for f in ds._files.values() for p in parent_files)
    queue.put((tuple(ids), pixels, own_files))


def test_wds_is_fork_safe_and_pickles_without_open_files(noise_folder, tmp_path):
    folder = create_dataset(str(noise_folder))
    ds = create_dataset(f"wds:{write_shards(folder, tmp_path / 'shards')}")
    expected = [np.asarray(folder.load(i)).tobytes() for i in range(len(ds))]
    assert np.asarray(ds.load(8)).tobytes() == expected[8]  # the parent has its shard files open now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [
        ctx.Process(target=_load_in_child, args=(ds, ids, queue, list(ds._files.values())))
        for ids in ([0, 5, 8, 1], [8, 7, 6, 2])
    ]
    for child in children:
        child.start()
    results = [queue.get(timeout=30) for _ in children]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    for ids, pixels, own_files in results:
        assert pixels == [expected[i] for i in ids]
        assert own_files
    assert sorted(ids for ids, _, _ in results) == [(0, 5, 8, 1), (8, 7, 6, 2)]
    assert [np.asarray(ds.load(i)).tobytes() for i in range(len(ds))] == expected

    clone = pickle.loads(pickle.dumps(ds))
    assert clone.fingerprint() == ds.fingerprint()
    assert np.asarray(clone.load(3)).tobytes() == expected[3]
    ds.close()
    clone.close()


# ---------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match=f"'{tmp_path / 'nope'}' does not exist"):
        create_dataset(str(tmp_path / "nope"))


def test_file_given_as_folder(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("path,label\n")
    with pytest.raises(DatasetError, match=rf"'{path}' is a file, not a folder .*csv:"):
        create_dataset(str(path))


def test_folder_without_class_folders_is_unlabelled(tmp_path):
    write_image(tmp_path / "flat" / "b.png")
    write_image(tmp_path / "flat" / "a.png")
    ds = create_dataset(str(tmp_path / "flat"))
    assert (ds.classes, ds.labels.tolist(), ds.has_labels) == ([], [data.NO_LABEL] * 2, False)
    assert ds.describe()["num_classes"] == 0 and ds._names[0] == "a.png"  # ids by relative path
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=f"{tmp_path / 'empty'}: no class sub-folders and no images"):
        create_dataset(str(tmp_path / "empty"))


def test_unlabeled_spec_ignores_class_folders(tmp_path):
    root = make_folder(tmp_path / "ds")
    labelled, unlabelled = create_dataset(str(root)), create_dataset(f"unlabeled:{root}")
    assert len(unlabelled) == len(labelled) and not unlabelled.has_labels
    assert (unlabelled.labels == data.NO_LABEL).all() and unlabelled.fingerprint() != labelled.fingerprint()


def test_csv_with_some_labels_and_with_none(tmp_path):
    make_folder(tmp_path)
    partly = create_dataset(f"csv:{write_csv(tmp_path / 'p.csv', ['path,label', 'cat/a.PNG,cat', 'dog/y.png,'])}")
    assert partly.classes == ["cat"] and partly.labels.tolist() == [0, data.NO_LABEL]
    none = create_dataset(f"csv:{write_csv(tmp_path / 'n.csv', ['path', 'cat/a.PNG', 'dog/y.png'])}")
    assert none.classes == [] and none.labels.tolist() == [data.NO_LABEL] * 2


def test_empty_class_folder(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "emu" / "deep").mkdir(parents=True)
    (root / "emu" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=f"{root / 'emu'}: class folder 'emu' holds no images"):
        create_dataset(str(root))


def test_missing_csv(tmp_path):
    with pytest.raises(DatasetError, match=f"CSV file '{tmp_path / 'none.csv'}' does not exist"):
        create_dataset(f"csv:{tmp_path / 'none.csv'}")


@pytest.mark.parametrize(("header", "missing"), [("file,label", "path")])
def test_csv_missing_column(tmp_path, header, missing):
    make_folder(tmp_path)
    path = write_csv(tmp_path / "list.csv", [header, "cat/a.PNG,cat"])
    with pytest.raises(DatasetError, match=f"{path}: no '{missing}' column"):
        create_dataset(f"csv:{path}")


def test_csv_row_with_missing_file(tmp_path):
    make_folder(tmp_path)
    path = write_csv(tmp_path / "list.csv", ["path,label", "cat/a.PNG,cat", "cat/gone.png,cat"])
    with pytest.raises(DatasetError, match=rf"{path}: row 2 \(line 3\): file 'cat/gone.png' does not exist"):
        create_dataset(f"csv:{path}")


def test_csv_empty_and_negative_labels(tmp_path):
    make_folder(tmp_path)
    empty = write_csv(tmp_path / "empty.csv", ["path,label"])
    with pytest.raises(DatasetError, match=f"{empty}: no data rows"):
        create_dataset(f"csv:{empty}")
    negative = write_csv(tmp_path / "neg.csv", ["path,label", "cat/a.PNG,1", "cat/b.png,-1"])
    with pytest.raises(DatasetError, match=rf"{negative}: row 2 .*label -1 is negative"):
        create_dataset(f"csv:{negative}")


def test_wds_bad_input(tmp_path):
    with pytest.raises(DatasetError, match=f"no tar shards match '{tmp_path}/shard-\\*.tar'"):
        create_dataset(f"wds:{tmp_path}/shard-*.tar")
    with pytest.raises(DatasetError, match=f"tar shard '{tmp_path / 'one.tar'}' does not exist"):
        create_dataset(f"wds:{tmp_path / 'one.tar'}")

    no_label = tmp_path / "no-label.tar"
    with tarfile.open(no_label, "w") as tar:
        add_member(tar, "a.png", png_bytes(np.zeros((2, 2, 3), np.uint8)))
    assert not create_dataset(f"wds:{no_label}").has_labels  # shards without .cls: unlabelled
    some_labels = tmp_path / "some-labels.tar"
    with tarfile.open(some_labels, "w") as tar:
        add_member(tar, "a.png", png_bytes(np.zeros((2, 2, 3), np.uint8)))
        add_member(tar, "b.png", png_bytes(np.zeros((2, 2, 3), np.uint8)))
        add_member(tar, "b.cls", b"1")
    with pytest.raises(DatasetError, match=f"{some_labels}: sample 'a' .* has no .cls label member"):
        create_dataset(f"wds:{some_labels}")

    bad_label = tmp_path / "bad-label.tar"
    with tarfile.open(bad_label, "w") as tar:
        add_member(tar, "a.png", png_bytes(np.zeros((2, 2, 3), np.uint8)))
        add_member(tar, "a.cls", b"cat")
    with pytest.raises(DatasetError, match=f"{bad_label}:a.cls: label 'cat'"):
        create_dataset(f"wds:{bad_label}")

    not_tar = tmp_path / "not.tar"
    not_tar.write_bytes(b"\x1f\x8b" + b"\0" * 600)
    with pytest.raises(DatasetError, match=f"{not_tar}: not a readable uncompressed tar"):
        create_dataset(f"wds:{not_tar}")


def test_unknown_spec_prefix_lists_accepted_forms(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown dataset spec prefix 'hf:'.*digits.*csv:PATH.*wds:PATTERN"):
        create_dataset("hf:mnist")
    with pytest.raises(DatasetError, match="split must be one of"):
        create_dataset("digits", split="test", cache_dir=str(tmp_path))


def test_sample_id_out_of_range(tmp_path):
    ds = create_dataset(str(make_folder(tmp_path)))
    with pytest.raises(IndexError, match=r"sample id 5 is outside \[0, 5\)"):
        ds.load(5)
    with pytest.raises(IndexError):
        ds.load(-1)
    assert ds.load(np.int64(4)).getpixel((0, 0)) == (0, 50, 0)


def corrupt_folder(root):
    """Folder with two unreadable files among good ones; returns them in id order."""
    make_folder(root)
    bad = [root / "cat" / "aa.png", root / "dog" / "xx.png"]
    bad[0].write_bytes(b"this is not a png")
    good = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(good, format="PNG")
    bad[1].write_bytes(good.getvalue()[: len(good.getvalue()) // 2])  # truncated
    return bad


def test_unreadable_image_named_on_load(tmp_path):
    bad = corrupt_folder(tmp_path / "ds")
    ds = create_dataset(str(tmp_path / "ds"))
    assert len(ds) == 7 and ds.skipped == []
    with pytest.raises(DatasetError, match=f"{bad[0]}: not a readable image"):
        ds.load(1)
    with pytest.raises(DatasetError, match=f"{bad[1]}: not a readable image"):
        ds.load(5)
    assert ds.load(0).getpixel((0, 0)) == (10, 0, 0)


def test_skip_unreadable_keeps_ids_dense(tmp_path):
    bad = corrupt_folder(tmp_path / "ds")
    ds = create_dataset(str(tmp_path / "ds"), skip_unreadable=True)
    assert ds.skipped == [str(p) for p in bad]
    assert ds.describe()["skipped"] == [str(p) for p in bad]
    assert len(ds) == 5 and ds.describe()["num_samples"] == 5
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert colors(ds) == [c for _, c in FOLDER_FILES]  # ids 0..4 are exactly the readable files, in order
    assert ds.fingerprint() == create_dataset(str(make_folder(tmp_path / "clean"))).fingerprint()


def test_skip_unreadable_in_csv_and_wds(tmp_path, noise_folder):
    bad = corrupt_folder(tmp_path)
    path = write_csv(tmp_path / "list.csv", ["path,label", "dog/xx.png,dog", "dog/y.png,dog", "cat/aa.png,cat"])
    ds = create_dataset(f"csv:{path}", skip_unreadable=True)
    assert ds.skipped == [str(bad[1]), str(bad[0])]
    assert len(ds) == 1 and colors(ds) == [(0, 50, 0)] and ds.classes == ["cat", "dog"] and ds.labels.tolist() == [1]

    folder = create_dataset(str(noise_folder))
    shard = tmp_path / "mixed.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            payload = b"garbage" if i == 1 else png_bytes(np.asarray(folder.load(i)))
            add_member(tar, f"k{i}.png", payload)
            add_member(tar, f"k{i}.cls", str(folder.labels[i]).encode())
    with pytest.raises(DatasetError, match=f"{shard}:k1.png: not a readable image"):
        create_dataset(f"wds:{shard}").load(1)
    ds = create_dataset(f"wds:{shard}", skip_unreadable=True)
    assert ds.skipped == [f"{shard}:k1.png"]
    assert len(ds) == 3 and ds.labels.tolist() == [int(folder.labels[i]) for i in (0, 2, 3)]
    for new_id, old_id in enumerate((0, 2, 3)):
        np.testing.assert_array_equal(np.asarray(ds.load(new_id)), np.asarray(folder.load(old_id)))
    ds.close()


def test_content_fingerprint_sees_swapped_images_and_caches_the_bytes_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "imgs"
    for cls, shade in (("cat", 30), ("dog", 200)):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (shade, 0, 0)).save(root / cls / "a.png", compress_level=0)  # equal sizes
    first = create_dataset(str(root))
    fast, content = first.fingerprint(), first.fingerprint("content")
    assert first.describe("content")["fingerprint_mode"] == "content" and fast != content
    # The same bytes again: the cache answers, no image is read.
    monkeypatch.setattr(data_files.FolderDataset, "_read_bytes", lambda self, i: pytest.fail("read an image"))
    assert create_dataset(str(root)).fingerprint("content") == content
    monkeypatch.undo()
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    # Two equal-size images swapped between classes: the fast fingerprint cannot tell, the content one does.
    (root / "cat" / "a.png").rename(tmp_path / "swap.png")
    (root / "dog" / "a.png").rename(root / "cat" / "a.png")
    (tmp_path / "swap.png").rename(root / "dog" / "a.png")
    swapped = create_dataset(str(root))
    assert swapped.fingerprint() == fast and swapped.fingerprint("content") != content
