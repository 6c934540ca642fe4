"""distill-save-logits end to end on the built-in digits, with a small timm teacher."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import logit_store.location
from distill.cli import save_logits as save_main
from distill.save import PlaneProgress, my_shards, records_of
from logit_store import ShardWriter, open_store
from logit_store.cli import main as store_cli
from logit_store.writer import FAULT_COMMIT

TEACHER = "timm:test_vit"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A cache dir for digits and a teacher checkpoint, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("save")
    torch.manual_seed(0)
    ckpt = root / "teacher.safetensors"
    save_file(timm.create_model("test_vit", num_classes=10).state_dict(), str(ckpt))
    return {"root": root, "ckpt": str(ckpt), "env": os.environ | {"DISTILL_CACHE": str(root / "cache")}}


def save_args(env, out, *extra, **overrides):
    opts = {
        "teacher": TEACHER,
        "checkpoint": env["ckpt"],
        "data": "digits",
        "out": str(out),
        "epochs": 2,
        "k": 3,
        "img_size": 32,
        "batch_size": 64,
        "aug": "tinyvit",
    }
    opts |= overrides
    return [arg for key, value in opts.items() for arg in ("--" + key.replace("_", "-"), str(value))] + list(extra)


SCRIPT = str(Path(sys.executable).parent / "distill-save-logits")


def run_cli(env, args, launcher=(), extra_env=None, **kw):
    env_vars = env["env"] | (extra_env or {})
    return subprocess.run([*launcher, SCRIPT, *args], env=env_vars, capture_output=True, text=True, **kw)


def content(path):
    return open_store(path).info()["content_hashes"]


@pytest.fixture(scope="module")
def reference(env):
    out = env["root"] / "reference.zarr"
    proc = run_cli(env, save_args(env, out, "--check-replay", "8"))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_save_builds_a_complete_store(env, reference):
    out, proc = reference
    store = open_store(out)
    assert store.verify() == []
    m = store.manifest
    assert (m.num_samples, m.num_classes, m.k, m.epochs) == (1437, 10, 3, 2)
    assert m.teacher["spec"] == TEACHER and len(m.teacher["weights_sha256"]) == 64
    assert (
        m.dataset["fingerprint"]
        and m.augmentation["hash"]
        and m.augmentation["recipe"]["auto_augment"] == "rand-m9-mstd0.5-inc1"
    )
    stats = store.info()["statistics"]
    assert stats["records"] == 2 * 1437 and 0 < stats["mean_topk_mass"] <= 1 and stats["mean_kl_full_to_rebuilt"] >= 0
    assert "records/s" in proc.stdout
    assert [(e["by"], e["planes"], e["teacher"]) for e in m.provenance] == [("distill-save-logits", [0, 1], TEACHER)]


def test_check_replay_is_exact_on_cpu(reference):
    _, proc = reference
    line = next(line for line in proc.stdout.splitlines() if line.startswith("check-replay"))
    assert "topk_index_agreement=1" in line and "max_abs_logit_diff=0" in line, line


class Bar:
    """What PlaneProgress uses of a tqdm bar: `update(n)`; `shown` is every count it showed, in order."""

    def __init__(self) -> None:
        self.n, self.shown = 0, []

    def update(self, n: int) -> None:
        self.n += n
        self.shown.append(self.n)


@pytest.mark.parametrize(("processes", "pending"), [(1, range(6)), (2, range(6)), (3, range(6)), (2, [1, 4, 5])])
def test_the_progress_bar_counts_each_record_once_whatever_the_process_count(processes, pending):
    # digits' 1437 ids in shards of 256, the last one short, over two epochs: with two processes the main one
    # holds shards 0, 2 and 4 (768 records), and counting its batches times the process count showed 3.07k of
    # 2.87k. A resume may leave the main process no shard of a plane ([1, 4, 5] with two: 4 only).
    manifest = SimpleNamespace(shard_range=lambda s: (256 * s, min(256 * (s + 1), 1437)))
    main = SimpleNamespace(num_processes=processes, process_index=0)
    plane, bar = records_of(manifest, list(pending)), Bar()
    for epoch in range(2):
        mine = my_shards(list(pending), main)
        share = PlaneProgress(bar, plane, records_of(manifest, mine))
        for start, stop in map(manifest.shard_range, mine):
            for first in range(start, stop, 64):  # the save's batches: a shard's last one may be short
                share.add(min(first + 64, stop) - first)
        assert bar.n == plane * (epoch + 1), bar.shown
    assert bar.shown == sorted(bar.shown) and bar.n == 2 * plane  # never back, never past the total


@pytest.mark.slow
def test_two_processes_equal_one(env, reference):
    out = env["root"] / "two.zarr"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
    ]
    proc = run_cli(env, save_args(env, out), launcher=cmd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert content(out) == content(reference[0])
    counts = re.findall(r"\| ?([\d.]+k?)/2\.87k ", proc.stderr)  # the bar: each of the 2,874 records once
    assert counts and counts[-1] == "2.87k", proc.stderr[-3000:]


def test_sigkill_then_rerun_equals_uninterrupted(env, reference):
    out = env["root"] / "killed.zarr"
    proc = run_cli(env, save_args(env, out), extra_env={FAULT_COMMIT: "after:2"})  # killed after its 2nd commit
    assert proc.returncode == -9, proc.stderr[-2000:]
    store = open_store(out)
    committed = sum(len(store.committed_shards(e)) for e in range(2))
    assert committed == 2 < 2 * store.manifest.num_shards, "the kill lands mid-save"
    again = run_cli(env, save_args(env, out))
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    assert content(out) == content(reference[0])


def test_bad_inputs(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", env["env"]["DISTILL_CACHE"])

    def fails(args, pattern):  # in this process: the subprocess of each would cost an import of torch
        assert save_main(args) == 2
        err = capsys.readouterr().err
        assert pattern in err and len(err.strip().splitlines()) == 1, err[-2000:]

    out = tmp_path / "s.zarr"
    fails(save_args(env, out, data=tmp_path / "nowhere"), "nowhere")
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "empty_class").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a" / "x.png")
    fails(save_args(env, out, data=tmp_path / "imgs", k=2), "empty_class")  # k fits the 2 folders: the dataset speaks
    fails(save_args(env, out, teacher="timm:no_such_net"), "no_such_net")
    bad = tmp_path / "bad.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("test_vit", num_classes=7).state_dict(), str(bad))
    fails(save_args(env, out, checkpoint=bad), "head.weight")
    fails(save_args(env, out, k=11), "larger than")
    assert not out.exists()  # nothing was created by any failed run


def test_unreadable_image_named_or_skipped(env, tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"not an image")
    args = [
        "--teacher",
        "timm:test_vit",
        "--data",
        str(tmp_path / "imgs"),
        "--out",
        str(tmp_path / "s.zarr"),
        "--epochs",
        "1",
        "--k",
        "2",
        "--img-size",
        "32",
    ]
    proc = run_cli(env, args)
    assert proc.returncode != 0 and "broken.png" in proc.stderr
    proc = run_cli(env, [*args, "--out", str(tmp_path / "t.zarr"), "--skip-unreadable"])
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "t.zarr" / "manifest.json").read_text())
    assert manifest["num_samples"] == 6
    assert any("broken.png" in s for s in manifest["dataset"]["skipped"])


def test_config_file_and_option_errors(env, tmp_path, capsys):
    cfg = tmp_path / "save.yaml"
    cfg.write_text(
        f"teacher: {TEACHER}\ndata: digits\nout: {tmp_path / 'c.zarr'}\nepochs: 1\nk: 2\nimg-size: 32\ncolour: red\n"
    )
    with pytest.raises(SystemExit):
        save_main(["--config", str(cfg)])
    assert "unknown key(s) ['colour']" in capsys.readouterr().err
    cfg.write_text(f"teacher: {TEACHER}\ndata: digits\nout: {tmp_path / 'c.zarr'}\nepochs: ten\nk: 2\n")
    with pytest.raises(SystemExit):
        save_main(["--config", str(cfg)])
    assert "'epochs' must be int" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        save_main(["--teacher", TEACHER])
    assert "missing required option(s): --data, --out, --epochs" in capsys.readouterr().err


def test_a_damaged_committed_shard_stops_the_resume_until_repaired(env, reference, tmp_path):
    """One byte of a committed shard flipped: the re-run save refuses (it said "saved 0 records" before);
    distill-store repair uncommits that shard only, and the next save rewrites it bit for bit."""
    out = tmp_path / "damaged.zarr"
    shutil.copytree(reference[0], out)
    shard = out / "values" / "c" / "1" / "0" / "0"  # epoch 1, shard 0: records [0, 192)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    markers = sorted(p.name for p in (out / "commits").iterdir())
    proc = run_cli(env, save_args(env, out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    end = open_store(out).manifest.shard_range(0)[1]
    assert f"committed records are damaged: epoch 1 records [0, {end}): damaged" in proc.stderr
    assert f"run distill-store repair {out}, then this save again" in proc.stderr
    assert store_cli(["repair", str(out)]) == 0
    assert sorted(p.name for p in (out / "commits").iterdir()) == [m for m in markers if m != "e00001-s000000.json"]
    again = run_cli(env, save_args(env, out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert content(out) == content(reference[0])
    assert shard.read_bytes() == (reference[0] / shard.relative_to(out)).read_bytes()
    assert store_cli(["repair", str(out)]) == 0  # nothing left to repair


def test_a_full_disk_while_saving_is_one_line_and_exit_2(env, tmp_path, monkeypatch, capsys):
    """ENOSPC at the third file the save writes (the manifest, shard 0's marker, shard 1's marker)."""
    monkeypatch.setenv("DISTILL_CACHE", env["env"]["DISTILL_CACHE"])
    monkeypatch.setattr(ShardWriter, "MAX_SEALED", 0)  # commits in shard order, on the saving thread
    real, calls = logit_store.location.write_file, []

    def full_at_third(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(logit_store.location, "write_file", full_at_third)
    out = tmp_path / "s.zarr"
    assert save_main(save_args(env, out)) == 2
    marker = out / "commits" / "e00000-s000001.json"
    expected = f"distill-save-logits: error: disk full: cannot write {marker} (no space left on its file system); "
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(expected + "free space, then run again"), errors
    assert [p for p in tmp_path.rglob("*") if ".tmp-" in p.name] == []


@pytest.mark.slow
def test_a_failed_save_blocks_no_corrected_command(env, tmp_path):
    """Killed before its first commit: the corrected command (another --k) replaces the empty store, saying so;
    a store with committed records is still refused, naming the field (issue 17)."""
    out = tmp_path / "s.zarr"
    assert run_cli(env, save_args(env, out, k=4), extra_env={FAULT_COMMIT: "before:1"}).returncode == -9
    assert (out / "manifest.json").exists() and not (out / "commits").exists()
    proc = run_cli(env, save_args(env, out, epochs=1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"replacing {out}: it holds no committed record and was made with another epochs, k\n" in proc.stderr
    assert open_store(out).manifest.k == 3 and open_store(out).verify() == []
    refused = run_cli(env, save_args(env, out, epochs=1, k=4))
    assert refused.returncode == 2 and "k: store has 3, asked for 4" in refused.stderr
