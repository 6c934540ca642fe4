"""Image-text datasets: stable ids, captions that match their images, captions in the fingerprint, clear errors."""

import hashlib
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from tar_helpers import write_shard

from distill.augment import Augmentation
from distill.data import NO_LABEL, DatasetError, create_dataset
from distill.data_digits import DIGIT_CAPTION_TEMPLATE, DIGIT_NAMES, digit_caption
from distill.data_files import PairsDataset
from distill.data_tar import TarDataset
from distill.loader import ReplayDataset
from distill.views import ReplayAugment

# (relative path, colour, caption); "cat/a.png" has two captions, so two rows (two samples).
PAIRS = [
    ("dog/y.png", (0, 50, 0), "a dog, sitting"),
    ("cat/a.png", (10, 0, 0), "a red cat"),
    ("cat/sub/b.jpg", (200, 0, 0), 'the "brightest" cat'),
    ("cat/a.png", (10, 0, 0), "another caption of the same cat"),
]


def write_image(path, color, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_table(path, rows, sep=","):
    """One row per list of cells; a cell holding the separator or a quote is quoted (RFC 4180)."""

    def cell(text):
        return '"' + text.replace('"', '""') + '"' if sep in text or '"' in text else text

    path.write_text("\n".join(sep.join(cell(c) for c in row) for row in rows) + "\n")
    return path


def make_pairs(root, pairs=PAIRS, header=("path", "caption"), name="pairs.csv", sep=","):
    for relative, color, _ in pairs:
        if not (root / relative).exists():
            write_image(root / relative, color)
    return write_table(root / name, [header] + [[p, c] for p, _, c in pairs], sep)


def colors(ds):
    return [ds.load(i).getpixel((0, 0)) for i in range(len(ds))]


def encoded(color, fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), color).save(buffer, format=fmt)
    return buffer.getvalue()


def wds_samples(start, count, labels=False):
    """Samples start..start+count-1: colour (10 * i, 0, 0), caption "caption i", jpg for odd i, png for even."""
    out = []
    for i in range(start, start + count):
        fmt = "jpg" if i % 2 else "png"
        members = {fmt: encoded((10 * i, 0, 0), "JPEG" if i % 2 else "PNG"), "txt": f" caption {i}\n"}
        if labels:
            members["cls"] = str(i % 3)
        if i % 2:  # member order within a sample does not matter
            members = dict(reversed(members.items()))
        out.append((f"s{i:03d}", members))
    return out


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    create_dataset("digits", split="val", cache_dir=str(cache))
    return cache


# ---------------------------------------------------------------- pairs:PATH


def test_pairs_ids_follow_rows_and_captions_match_images(tmp_path, monkeypatch):
    csv_path = make_pairs(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # relative paths are relative to the file, not the working directory
    ds = create_dataset(f"pairs:{csv_path}")
    assert isinstance(ds, PairsDataset) and ds.spec == f"pairs:{csv_path}"
    assert len(ds) == 4 and ds.has_captions and not ds.has_labels
    assert ds.captions == [c for _, _, c in PAIRS]
    assert [ds.caption(i) for i in range(4)] == ds.captions and ds.caption(np.int64(2)) == PAIRS[2][2]
    # JPEG of a flat colour decodes to (nearly) that colour
    assert all(np.abs(np.subtract(got, want)).max() <= 2 for got, (_, want, _) in zip(colors(ds), PAIRS, strict=True))
    assert colors(ds)[0] == (0, 50, 0) and colors(ds)[1] == colors(ds)[3] == (10, 0, 0)
    assert ds.classes == [] and ds.num_classes == 0 and ds.labels.tolist() == [NO_LABEL] * 4
    described = ds.describe()
    assert described["has_captions"] is True and described["num_samples"] == 4 and described["classes"] == []
    with pytest.raises(IndexError):
        ds.caption(4)


def test_pairs_tsv_with_labels_and_absolute_paths(tmp_path):
    make_pairs(tmp_path)
    absolute = tmp_path / "dog" / "y.png"
    rows = [
        ["Label", " Caption ", "PATH"],
        ["cat", "a cat,\twith a tab", "cat/a.png"],
        ["dog", "  a dog  ", str(absolute)],
    ]
    ds = create_dataset(f"pairs:{write_table(tmp_path / 'list.tsv', rows, sep=chr(9))}")
    assert ds.has_labels and ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 1]
    assert ds.captions == ["a cat,\twith a tab", "a dog"]  # surrounding whitespace stripped
    assert colors(ds) == [(10, 0, 0), (0, 50, 0)]
    integer = write_table(tmp_path / "int.csv", [["path", "caption", "label"], ["cat/a.png", "x", "2"]])
    assert create_dataset(f"pairs:{integer}").classes == ["0", "1", "2"]


def test_pairs_ids_and_fingerprint_independent_of_location_and_file_order(tmp_path):
    a = create_dataset(f"pairs:{make_pairs(tmp_path / 'a')}")
    b_root = tmp_path / "elsewhere" / "b"
    for relative, color, _ in reversed(PAIRS):  # files created in the other order, with other times
        write_image(b_root / relative, color)
    os.utime(b_root / "cat" / "a.png", (0, 0))
    b = create_dataset(f"pairs:{make_pairs(b_root)}")
    assert a.fingerprint() == b.fingerprint()
    assert a.captions == b.captions and colors(a) == colors(b)
    # a repeated spec is the same dataset; the row order is the id order, so it is part of the fingerprint
    assert create_dataset(a.spec).fingerprint() == a.fingerprint()
    swapped = create_dataset(f"pairs:{make_pairs(tmp_path / 'a', [PAIRS[1], PAIRS[0], *PAIRS[2:]], name='s.csv')}")
    assert swapped.captions[:2] == [PAIRS[1][2], PAIRS[0][2]] and swapped.fingerprint() != a.fingerprint()


def test_fingerprint_covers_every_caption(tmp_path):
    base = create_dataset(f"pairs:{make_pairs(tmp_path)}").fingerprint()
    for i in range(len(PAIRS)):
        changed = [*PAIRS]
        changed[i] = (PAIRS[i][0], PAIRS[i][1], PAIRS[i][2] + "!")
        assert create_dataset(f"pairs:{make_pairs(tmp_path, changed, name=f'c{i}.csv')}").fingerprint() != base
    padded = [(p, c, f"  {t} ") for p, c, t in PAIRS]
    assert create_dataset(f"pairs:{make_pairs(tmp_path, padded, name='padded.csv')}").fingerprint() == base

    # same files and labels with and without captions: different datasets
    write_table(tmp_path / "plain.csv", [["path", "label"], ["cat/a.png", "0"]])
    write_table(tmp_path / "text.csv", [["path", "label", "caption"], ["cat/a.png", "0", "a cat"]])
    plain, text = create_dataset(f"csv:{tmp_path / 'plain.csv'}"), create_dataset(f"pairs:{tmp_path / 'text.csv'}")
    assert plain.labels.tolist() == text.labels.tolist() and plain.fingerprint() != text.fingerprint()


def test_datasets_without_captions_keep_their_fingerprint(tmp_path):
    """The fingerprint of a dataset without captions is the original one, so stores saved before still match."""
    make_pairs(tmp_path)
    ds = create_dataset(str(tmp_path))
    assert not ds.has_captions and "has_captions" not in ds.describe()
    names = ["cat/a.png", "cat/sub/b.jpg", "dog/y.png"]
    digest = hashlib.sha256(f"distill-dataset-v1\n3\n{json.dumps(['cat', 'dog'])}\n".encode())
    digest.update(
        "".join(
            f"{i}\t{label}\t{(tmp_path / name).stat().st_size}\t{json.dumps(name)}\n"
            for i, (label, name) in enumerate(zip([0, 0, 1], names, strict=True))
        ).encode()
    )
    assert ds.fingerprint() == digest.hexdigest()
    with pytest.raises(DatasetError, match=r"has no captions .*pairs:PATH"):
        ds.caption(0)
    with pytest.raises(DatasetError, match="has no captions"):
        _ = ds.captions


def test_pairs_skip_unreadable_keeps_captions_aligned(tmp_path):
    make_pairs(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rows = [["path", "caption"], ["dog/y.png", "dog"], ["bad.png", "broken"], ["cat/a.png", "cat"]]
    path = write_table(tmp_path / "list.csv", rows)
    with pytest.raises(DatasetError, match=f"{tmp_path / 'bad.png'}: not a readable image"):
        create_dataset(f"pairs:{path}").load(1)
    ds = create_dataset(f"pairs:{path}", skip_unreadable=True)
    assert ds.skipped == [str(tmp_path / "bad.png")]
    assert ds.captions == ["dog", "cat"] and colors(ds) == [(0, 50, 0), (10, 0, 0)]


# ---------------------------------------------------------------- pairs: bad input


@pytest.mark.parametrize(("header", "missing"), [("path,text", "caption"), ("file,caption", "path")])
def test_pairs_missing_column(tmp_path, header, missing):
    make_pairs(tmp_path)
    path = tmp_path / "list.csv"
    path.write_text(f"{header}\ncat/a.png,a cat\n")
    with pytest.raises(DatasetError, match=rf"{path}: no '{missing}' column in the header .*'path' and 'caption'"):
        create_dataset(f"pairs:{path}")


def test_pairs_missing_image_names_row_line_and_column(tmp_path):
    make_pairs(tmp_path)
    path = write_table(tmp_path / "list.csv", [["caption", "path"], ["x", "cat/a.png"], ["y", "cat/gone.png"]])
    with pytest.raises(
        DatasetError, match=rf"{path}: row 2 \(line 3, column 2 'path'\): file 'cat/gone.png' does not exist"
    ):
        create_dataset(f"pairs:{path}")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["cat/a.png", "a cat"], ["cat/a.png", "   "]], r"row 2 \(line 3, column 2 'caption'\): empty caption"),
        ([["", "a cat"]], r"row 1 \(line 2, column 1 'path'\): empty 'path'"),
        ([["cat/a.png", "a cat", ""]], r"row 1 \(line 2, column 3 'label'\): empty 'label'"),
        ([["cat/a.png"]], r"row 1 \(line 2\) has 1 field\(s\), expected at least 2"),
        ([], "no data rows after the header"),
    ],
)
def test_pairs_bad_rows(tmp_path, rows, message):
    make_pairs(tmp_path)
    header = ["path", "caption", "label"] if any(len(r) == 3 for r in rows) else ["path", "caption"]
    path = write_table(tmp_path / "list.csv", [header, *rows])
    with pytest.raises(DatasetError, match=f"{path}: {message}"):
        create_dataset(f"pairs:{path}")


def test_pairs_bad_spec_and_file(tmp_path):
    with pytest.raises(DatasetError, match="pairs: needs a file path"):
        create_dataset("pairs:")
    with pytest.raises(DatasetError, match=f"CSV file '{tmp_path / 'none.csv'}' does not exist"):
        create_dataset(f"pairs:{tmp_path / 'none.csv'}")
    with pytest.raises(DatasetError, match=r"unknown dataset spec prefix 'hf:'.*pairs:PATH.*digits-captions"):
        create_dataset("hf:coco")


# ---------------------------------------------------------------- wds:PATTERN with .txt captions


def test_wds_captions_follow_shard_then_member_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "part-001.tar", wds_samples(3, 2))  # written first, read second
    write_shard(shards / "part-000.tar", wds_samples(0, 3))
    ds = create_dataset(f"wds:{shards}/part-*.tar")
    assert isinstance(ds, TarDataset) and ds.has_captions and not ds.has_labels
    assert ds.captions == [f"caption {i}" for i in range(5)]
    assert ds.labels.tolist() == [NO_LABEL] * 5 and ds.classes == []
    for i in range(5):  # each image is the one stored beside its caption
        red = ds.load(i).getpixel((0, 0))[0]
        assert abs(red - 10 * int(ds.caption(i).split()[1])) <= 3
    assert ds.describe()["has_captions"] is True
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.captions == ds.captions and clone.fingerprint() == ds.fingerprint()
    ds.close()


def test_wds_captions_with_labels_and_fingerprint(tmp_path):
    shard = write_shard(tmp_path / "a.tar", wds_samples(0, 4, labels=True))
    ds = create_dataset(f"wds:{shard}")
    assert ds.has_captions and ds.has_labels and ds.classes == ["0", "1", "2"]
    assert ds.labels.tolist() == [0, 1, 2, 0] and ds.caption(3) == "caption 3"

    samples = wds_samples(0, 4, labels=True)
    samples[2][1]["txt"] = "caption 2, edited"
    assert create_dataset(f"wds:{write_shard(tmp_path / 'b.tar', samples)}").fingerprint() != ds.fingerprint()
    # the shard name is part of each sample's path, so compare against a same-named copy
    (tmp_path / "copy").mkdir()
    same = create_dataset(f"wds:{write_shard(tmp_path / 'copy' / 'a.tar', wds_samples(0, 4, labels=True))}")
    assert same.fingerprint() == ds.fingerprint()
    ds.close()


def test_wds_skip_unreadable_keeps_captions_aligned(tmp_path):
    samples = wds_samples(0, 3)
    samples[1][1]["jpg"] = b"garbage"
    shard = write_shard(tmp_path / "a.tar", samples)
    ds = create_dataset(f"wds:{shard}", skip_unreadable=True)
    assert ds.skipped == [f"{shard}:s001.jpg"] and ds.captions == ["caption 0", "caption 2"]
    assert ds.load(1).getpixel((0, 0))[0] == 20


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s[1][1].pop("txt"), r": sample 's001' \(s001.jpg\) has no .txt caption member"),
        (lambda s: s[2][1].pop("cls"), r": sample 's002' \(s002.png\) has no .cls label member"),
        (lambda s: s[0][1].update(txt=" \n"), r":s000.txt: empty caption"),
        (lambda s: s[0][1].update(txt=b"\xff\xfe"), r":s000.txt: the caption is not UTF-8"),
        (lambda s: s.append(("lonely", {"txt": "no image"})), r": sample 'lonely' has a .txt but no image member"),
    ],
)
def test_wds_caption_errors_name_shard_and_member(tmp_path, edit, message):
    samples = wds_samples(0, 3, labels=True)
    edit(samples)
    shard = write_shard(tmp_path / "bad.tar", samples)
    with pytest.raises(DatasetError, match=f"{shard}{message}"):
        create_dataset(f"wds:{shard}")


# ---------------------------------------------------------------- digits-captions


def test_digits_captions_match_labels_and_split(digits_cache):
    assert len(DIGIT_NAMES) == 10 and DIGIT_NAMES[7] == "seven"
    assert digit_caption(7) == DIGIT_CAPTION_TEMPLATE.format("seven") == "a photo of the number seven"
    digits = create_dataset("digits", split="val", cache_dir=str(digits_cache))
    ds = create_dataset("digits-captions", split="val", cache_dir=str(digits_cache))
    assert ds.spec == "digits-captions" and ds.has_captions and ds.has_labels
    assert len(ds) == len(digits) == 360 and ds.classes == digits.classes
    np.testing.assert_array_equal(ds.labels, digits.labels)
    assert ds.captions == [f"a photo of the number {DIGIT_NAMES[label]}" for label in digits.labels.tolist()]
    np.testing.assert_array_equal(np.asarray(ds.load(5)), np.asarray(digits.load(5)))
    assert ds.fingerprint() != digits.fingerprint()
    assert create_dataset("digits-captions", split="val", cache_dir=str(digits_cache)).fingerprint() == ds.fingerprint()
    with pytest.raises(DatasetError, match="digits-captions: split must be one of"):
        create_dataset("digits-captions", split="test", cache_dir=str(digits_cache))


# ---------------------------------------------------------------- replay


def test_replay_of_an_image_text_dataset(tmp_path):
    """The view of (epoch, id) depends on the image only: a pairs dataset replays like the folder it lists."""
    rng = np.random.default_rng(0)
    root = tmp_path / "noise"
    rows = [["path", "caption"]]
    for k in range(6):
        path = root / "c" / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
        rows.append([f"c/{k}.png", f"noise number {k}"])
    pairs = create_dataset(f"pairs:{write_table(root / 'pairs.csv', rows)}")
    folder = create_dataset(str(root))
    augment = ReplayAugment(Augmentation(color_jitter=0.4, re_prob=0.5, mixup_alpha=0.8, cutmix_alpha=1.0), 16, 7)
    replay, reference = ReplayDataset(pairs, augment), ReplayDataset(folder, augment)
    items = [replay[(3, i)] for i in (4, 0, 5)]
    for item in items:
        again, same = replay[(3, item["id"])], reference[(3, item["id"])]
        assert torch.equal(item["image"], again["image"]) and torch.equal(item["image"], same["image"])
        assert (item["partner"], item["lam"]) == (same["partner"], same["lam"])
        assert item["label"] == item["partner_label"] == NO_LABEL
        assert pairs.caption(item["id"]) == f"noise number {item['id']}"
    batch = replay.batch([(3, 4), (3, 0), (3, 5)])  # with the partners' views mixed in
    assert batch["image"].shape == (3, 3, 16, 16) and batch["id"].tolist() == [4, 0, 5]
    assert [pairs.caption(i) for i in batch["id"].tolist()] == ["noise number 4", "noise number 0", "noise number 5"]
    assert not torch.equal(replay[(4, 4)]["image"], items[0]["image"])  # another epoch, another view
