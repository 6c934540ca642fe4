"""`distill-store views`: every view's parameters, explicit enough that PIL, torchvision and torch alone rebuild
the toolkit's own views (ReplayDataset + mix_batch) exactly, in a process that never imports our augmentation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import ROOT

from distill.augment import Augmentation
from distill.data import create_dataset
from distill.loader import ReplayDataset
from distill.views import ReplayAugment
from logit_store import Manifest, create_store
from logit_store.cli import main as store_cli

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE, SEED, EPOCHS = 24, 7, 2
# crop + flip + colour jitter + RandAugment + erasing + Mixup and CutMix; "random" interpolation also draws
# each RandAugment operation's filter at random (timm's own draw)
MIXED = Augmentation(
    scale=(0.25, 1.0), interpolation="random", color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
    re_prob=0.5, mixup_alpha=0.8, cutmix_alpha=1.0,
)  # fmt: skip
BICUBIC = Augmentation(interpolation="bicubic", auto_augment="rand-n3-m7-mstd0.5-inc1", re_prob=0.25)

# Runs in a fresh interpreter: the views rebuilt from the parameters alone, with PIL, numpy and torch (torchvision's
# colour adjustments of PIL images are PIL's ImageEnhance, its normalisation (x - mean) / std in float32).
REBUILD = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from PIL import Image, ImageEnhance, ImageOps

    views, paths = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
    FILTER = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

    def operation(img, op):
        name = op["op"]
        if "affine" in op:
            return img.transform(img.size, Image.AFFINE, tuple(op["affine"]), resample=FILTER[op["resample"]],
                                 fillcolor=tuple(op["fill"]))
        if name == "Rotate":
            return img.rotate(op["degrees"], resample=FILTER[op["resample"]], fillcolor=tuple(op["fill"]))
        if "enhance" in op:
            return getattr(ImageEnhance, op["enhance"])(img).enhance(op["factor"])
        if "bits" in op:
            return img if op["bits"] >= 8 else ImageOps.posterize(img, op["bits"])
        if name == "SolarizeAdd":
            lut = [min(255, i + op["add"]) if i < op["threshold"] else i for i in range(256)]
            return img.point(lut * 3)
        if "threshold" in op:
            return ImageOps.solarize(img, op["threshold"])
        return {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize, "Invert": ImageOps.invert}[name](img)

    def unmixed(v):
        img = Image.open(paths[v["id"]]).convert("RGB")
        assert list(img.size) == v["source_size"]
        img = img.resize(tuple(v["output_size"]), FILTER[v["interpolation"]], box=tuple(v["crop_box"]))
        if v["flip"]:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if v["color_jitter"]:
            j = v["color_jitter"]
            for enhance, key in (("Brightness", "brightness"), ("Contrast", "contrast"), ("Color", "saturation")):
                img = getattr(ImageEnhance, enhance)(img).enhance(j[key])
        for op in v["rand_augment"] or []:
            img = operation(img, op)
        mean, std = (torch.tensor(v["normalize"][key]).view(3, 1, 1) for key in ("mean", "std"))
        x = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - mean) / std
        if v["erase"]:
            x0, y0, x1, y1 = v["erase"]["box"]
            g = torch.Generator().manual_seed(v["erase"]["noise_seed"])
            x[:, y0:y1, x0:x1] = torch.randn((3, y1 - y0, x1 - x0), generator=g)
        return x

    def mixed(views):
        plain = {v["id"]: unmixed(v) for v in views}
        out = []
        for v in views:
            x, mix = plain[v["id"]].clone(), v["mix"]
            if mix and mix["mode"] == "mixup":
                lam = torch.tensor(mix["lam"], dtype=torch.float32)
                x = x * lam + plain[mix["partner"]] * (1 - lam)
            elif mix:
                x0, y0, x1, y1 = mix["box"]
                x[:, y0:y1, x0:x1] = plain[mix["partner"]][:, y0:y1, x0:x1]
            out.append(x.numpy())
        return np.stack(out)

    np.save(sys.argv[3], np.stack([mixed(batch) for batch in views]))  # views: lists of a batch's views
    ours = sorted(m for m in sys.modules if m == "distill" or m.startswith(("distill.", "logit_store", "teachers")))
    print(json.dumps(ours))
""")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[str, list[str]]:
    """A class-folder dataset of 12 noisy images of assorted sizes (not square: the crop boxes scale per axis);
    its spec and the files in id order (sorted by class, then name: written out here)."""
    root = tmp_path_factory.mktemp("views")
    rng = np.random.default_rng(0)
    paths = []
    for c in ("a", "b"):
        (root / "data" / c).mkdir(parents=True)
        for i in range(6):
            w, h = (int(v) for v in rng.integers(20, 61, 2))
            grid = np.add.outer(np.arange(h), np.arange(w))[..., None] * rng.integers(1, 6, 3)
            pixels = (grid + rng.integers(0, 40, (h, w, 3))) % 256
            path = root / "data" / c / f"{i}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(path)
            paths.append(str(path))
    return str(root / "data"), paths


def make_store(path, spec: str, aug: Augmentation) -> str:
    data = create_dataset(spec)
    teacher = {"spec": "timm:resnet18", "weights_sha256": "ab" * 32, "img_size": SIZE, "batch_size": 4}
    m = Manifest(num_samples=len(data), num_classes=2, k=2, epochs=EPOCHS, mixing=aug.mixing, global_seed=SEED,
                 teacher=teacher, dataset=data.describe(), augmentation=aug.manifest_entry())  # fmt: skip
    create_store(path, m).close()
    return str(path)


def views_json(capsys, store: str, spec: str, epoch: int, ids: str) -> list[dict]:
    assert store_cli(["views", store, "--data", spec, "--epoch", str(epoch), "--ids", ids, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_views_rebuilt_from_the_parameters_alone_are_the_toolkits(tmp_path, capsys, images):
    """Both augmentations, both epochs: the views of every id rebuilt in one fresh interpreter (torch imported
    once) and compared with ReplayDataset.batch's (views made, then mixed by mix_batch)."""
    spec, paths = images
    batches, toolkit = [], []
    for name, aug in (("mixed", MIXED), ("bicubic", BICUBIC)):
        store = make_store(tmp_path / f"{name}.zarr", spec, aug)
        ours = ReplayDataset(create_dataset(spec), ReplayAugment(aug, SIZE, SEED))
        for epoch in range(EPOCHS):
            batches.append(views_json(capsys, store, spec, epoch, f"0:{len(paths)}"))
            toolkit.append(ours.batch([(epoch, i) for i in range(len(paths))])["image"])
    (tmp_path / "views.json").write_text(json.dumps(batches))
    (tmp_path / "paths.json").write_text(json.dumps(paths))
    proc = subprocess.run(
        [sys.executable, "-c", REBUILD, *(str(tmp_path / f) for f in ("views.json", "paths.json", "x.npy"))],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == []  # no module of this toolkit was imported to rebuild them
    rebuilt = torch.from_numpy(np.load(tmp_path / "x.npy"))
    for got, want in zip(rebuilt, toolkit, strict=True):
        assert torch.equal(got, want)  # exact: the same PIL and float32 torch operations in the same order
    mixed = batches[0] + batches[1]  # MIXED's parameters exercised every part (these seeds draw each)
    ops = [op for v in mixed for op in v["rand_augment"]]
    assert {v["mix"]["mode"] for v in mixed if v["mix"]} == {"mixup", "cutmix"}
    assert any(v["erase"] for v in mixed) and {v["flip"] for v in mixed} == {True, False}
    assert any("affine" in op for op in ops) and any("enhance" in op for op in ops)
    assert {op["resample"] for op in ops if "resample" in op} == {"bilinear", "bicubic"}
    assert {v["interpolation"] for v in mixed} == {"bilinear", "bicubic"}
    assert all(v["color_jitter"] for v in mixed)
    assert all(len(v["rand_augment"]) <= 3 and v["mix"] is None for v in batches[2] + batches[3])  # n3, no mixing


def test_text_output_is_one_line_per_view(tmp_path, capsys, images):
    spec, _ = images
    store = make_store(tmp_path / "s.zarr", spec, MIXED)
    assert store_cli(["views", store, "--data", spec, "--epoch", "1", "--ids", "2:5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1 id 2", "epoch 1 id 3", "epoch 1 id 4"]
    views = views_json(capsys, store, spec, 1, "2:5")
    for line, view in zip(lines, views, strict=True):
        assert f"{view['source_size'][0]}x{view['source_size'][1]} crop" in line and f"-> {SIZE}x{SIZE}" in line
        assert ("RandAugment " + (view["rand_augment"][0]["op"] if view["rand_augment"] else "none")) in line
        if view["mix"]:
            assert f"{view['mix']['mode']} with id {view['mix']['partner']}" in line


def test_bad_requests_are_one_line_before_torch(tmp_path, images):
    """Another dataset, an epoch or an id out of range, a malformed --ids: exit 2, one line naming it, and neither
    torch nor timm imported to say so."""
    spec, _ = images
    store = make_store(tmp_path / "s.zarr", spec, MIXED)
    other = tmp_path / "other" / "a"
    other.mkdir(parents=True)
    Image.new("RGB", (9, 9)).save(other / "0.png")
    cases = [
        (["--data", str(tmp_path / "other"), "--epoch", "0", "--ids", "0:2"], f"dataset {tmp_path / 'other'}: fingerprint"),
        (["--data", spec, "--epoch", "2", "--ids", "0:2"], "--epoch 2: the store has epochs 0 to 1"),
        (["--data", spec, "--epoch", "0", "--ids", "10:13"], "--ids: id 12 is out of range; the store has ids 0 to 11"),
        (["--data", spec, "--epoch", "0", "--ids", "a:b"], "--ids: expected START:STOP or one ID"),
    ]  # fmt: skip
    probe = textwrap.dedent("""
        import contextlib, io, json, sys
        from logit_store.cli import main
        results = []
        for argv in json.loads(sys.argv[1]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                results.append([main(argv), err.getvalue()])
        print(json.dumps({"results": results, "heavy": [m for m in ("torch", "timm") if m in sys.modules]}))
    """)
    argv = json.dumps([["views", store, *args] for args, _ in cases])
    proc = subprocess.run([sys.executable, "-c", probe, argv], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["heavy"] == []
    for (_, message), (code, stderr) in zip(cases, report["results"], strict=True):
        assert code == 2 and message in stderr and len(stderr.splitlines()) == 1, stderr
