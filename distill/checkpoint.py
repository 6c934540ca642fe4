"""A run's files on disk: the output-dir policy, the run lock, resumable checkpoints and the final weights.

Policy: a run writes into its `output_dir` only, holding `output_dir/.lock` (an flock: released when the
process ends, however it ends) so a second run there is refused. The lock is taken before the folder is
checked and held to the run's end, so no run can finish or start there between the check and the writes.
Re-running the same recipe resumes from the last checkpoint (a finished run of it is done: `run_recipe` returns
its summary.json and writes nothing); another recipe's run, finished (summary.json) or not, or a folder that
holds no run of this toolkit is refused, naming the first differing key; nothing is ever overwritten. The
same recipe with more epochs extends a finished run from its `checkpoints/last`. A run that stopped before its first checkpoint holds nothing worth keeping:
a corrected recipe starts afresh.

Checkpoints are the toolkit's own files under `checkpoints/step_N`: `model.safetensors`, `state.pt`
(what the Trainer gathers: optimizer, schedule, progress, EMA, the method's state; tensors and plain data,
read back with `torch.load(weights_only=True)`, so a planted file cannot run code) and `rng_R.pt` per
process. This module writes and reads the files; the Trainer gathers and restores its parts. They
are written as `step_N.partial` (each file fsynced) and made visible by one rename, so a kill at any
moment leaves the previous checkpoint intact. The step checkpoint before the newest is kept too: a newest
one damaged all the same (an empty or cut-short file) is refused naming the file, and deleting it resumes
from the one before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from logit_store.errors import disk_full_named
from logit_store.location import redact_text
from logit_store.locks import RangeLock
from teachers.checkpoint import CheckpointError

from .errors import RecipeError
from .files import BadYaml, dump_yaml, load_yaml_file

__all__ = [
    "check_output_dir",
    "extends",
    "keep_last_checkpoint",
    "lock_output_dir",
    "public",
    "read_checkpoint",
    "restore_rng",
    "same_run",
    "save_checkpoint",
    "save_weights",
    "write_recipe",
]

RECIPE_FILE = "recipe.yaml"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"
LAST, BEST = "last", "best"  # a finished run's final state, and its state at the best validation top-1


# ---- the output dir ----------------------------------------------------------------------------------------


def check_output_dir(out: Path, resolved: dict[str, Any]) -> Path | None:
    """Check `out` can take this run (reads only); the checkpoint to resume from, if any: the last step's,
    or a finished run's `checkpoints/last` when this recipe only asks for more epochs (an extension)."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output_dir {out} is a file, not a folder")
    if (out / SUMMARY_FILE).exists():
        if extends(out, resolved):
            return out / CHECKPOINTS / LAST
        previous = saved_recipe(out)
        other = isinstance(previous, dict) and not same_run(previous, resolved)
        which = f" of another recipe ({_first_difference(previous, public(resolved))} differs)" if other else ""
        raise RecipeError(
            f"output_dir {out} holds a finished run ({SUMMARY_FILE}){which}: choose another output_dir, or ask for "
            "more epochs to extend it"
        )
    checkpoints = sorted((out / CHECKPOINTS).glob("step_*[0-9]"))
    saved = out / RECIPE_FILE
    if saved.exists() and checkpoints:
        previous = saved_recipe(out)
        if not same_run(previous, resolved):
            key = _first_difference(previous, public(resolved))
            raise RecipeError(
                f"output_dir {out} holds a run of another recipe ({key} differs): choose another output_dir"
            )
    elif not saved.exists() and out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise RecipeError(f"output_dir {out} is not empty and holds no run of this toolkit (no {RECIPE_FILE})")
    return checkpoints[-1] if checkpoints else None


def saved_recipe(out: Path) -> Any:
    """The recipe a run wrote to `out` (its RECIPE_FILE, read as any YAML the toolkit reads: bounded plain data),
    None when there is none; a RecipeError naming the file when it cannot be read."""
    path = out / RECIPE_FILE
    if not path.exists():
        return None
    try:
        return load_yaml_file(path, "a run's recipe")
    except BadYaml as err:
        raise RecipeError(f"{path}: {err}") from None


def public(data: Any) -> Any:
    """`data` with the credentials of every URL in it redacted: what a run writes and logs."""
    if isinstance(data, dict):
        return {k: public(v) for k, v in data.items()}
    if isinstance(data, list):
        return [public(v) for v in data]
    return redact_text(data) if isinstance(data, str) else data


def same_run(saved: Any, resolved: dict[str, Any]) -> bool:
    """Whether a run's saved recipe is this recipe's run: equal (credentials aside) but for the follow-ups
    under `then`, which do not change this run (they are runs of their own, in folders of their own)."""
    ours = public(resolved)
    return isinstance(saved, dict) and {k: v for k, v in saved.items() if k != "then"} == {
        k: v for k, v in ours.items() if k != "then"
    }


def extends(out: Path, resolved: dict[str, Any]) -> bool:
    """Whether this recipe continues the finished run in `out`: the same recipe with more epochs."""
    saved = saved_recipe(out)
    if not isinstance(saved, dict) or not (out / CHECKPOINTS / LAST).is_dir():
        return False
    more = isinstance(saved.get("epochs"), int) and resolved["epochs"] > saved["epochs"]
    return more and same_run(saved | {"epochs": resolved["epochs"]}, resolved)


class OutputDirLock(RangeLock):
    """`output_dir/.lock`, held by a run from before it checks the folder to its end, so that no other run
    finishes or starts there between its check and its writes. `created`: the folder was made by this lock."""

    def __init__(self, out: Path) -> None:
        if out.exists() and not out.is_dir():
            raise RecipeError(f"output_dir {out} is a file, not a folder")
        self.out, self.created = out, not out.exists()
        super().__init__(str(out), LOCK_FILE, f"output_dir {out}")

    def abandon(self) -> None:
        """Let go of a folder whose run was refused before it wrote anything: one this lock made is removed
        again (the lock file first, while still held, so that no other run can take a lock on a removed file).
        Never raises: the refusal that led here is what the user must see."""
        try:
            if self.created:
                (self.out / LOCK_FILE).unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            self.release()
        if self.created:
            with contextlib.suppress(OSError):  # another run has made it its own meanwhile
                self.out.rmdir()


LOCK_FILE = ".lock"


def lock_output_dir(out: Path) -> OutputDirLock:
    """Hold `out` for this run; a second run there is refused while the first lives."""
    return OutputDirLock(out)


def write_recipe(out: Path, resolved: dict[str, Any], fresh: bool) -> None:
    """The run's recipe, credentials redacted; a fresh start clears what a try that never checkpointed left."""
    if fresh:
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        (out / "metrics.csv").unlink(missing_ok=True)
    (out / RECIPE_FILE).write_text(dump_yaml(public(resolved)))


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    return path or "the recipe"


# ---- checkpoints -------------------------------------------------------------------------------------------


def save_checkpoint(
    acc: Accelerator, out: Path, model: nn.Module, state: dict[str, Any], step: int | None = None
) -> None:
    """A run's checkpoint into `out`/checkpoints/step_N (older step_* removed after), or checkpoints/best with no
    step: `model`'s weights, `state` (tensors and plain data: read back weights_only) and each process's RNG
    state. Made visible by one rename, so a kill at any moment leaves the previous one whole."""
    final = out / CHECKPOINTS / (BEST if step is None else f"step_{step:08d}")
    partial = final.with_name(final.name + ".partial")
    if acc.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    acc.wait_for_everyone()
    try:
        if acc.is_main_process:
            save_weights(model, partial / "model.safetensors")
            write_file(partial / "state.pt", lambda fh: torch.save(state, fh))
        write_file(partial / f"rng_{acc.process_index}.pt", lambda fh: torch.save(_rng_state(), fh))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a failed checkpoint (a full disk) leaves no partial files
        raise
    acc.wait_for_everyone()
    if acc.is_main_process:
        replaced = final.with_name(final.name + ".old")
        if final.exists():
            final.rename(replaced)
        partial.rename(final)
        shutil.rmtree(replaced, ignore_errors=True)
        if step is not None:  # the one before stays: what a damaged newest one is resumed from instead
            earlier = [p for p in sorted((out / CHECKPOINTS).glob("step_*[0-9]")) if p.name < final.name]
            _remove_steps(out, keep=[final, *earlier[-1:]])
    acc.wait_for_everyone()


def read_checkpoint(path: Path, acc: Accelerator) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights on the CPU, state on this process's device, this process's RNG state) of what `save_checkpoint`
    wrote; only tensors and plain data are read (weights_only). Every file is read before the caller restores
    anything; one that cannot be (empty, cut short) is a CheckpointError naming it."""
    weights = _read(path / "model.safetensors", lambda file: load_file(str(file), device="cpu"))
    state = _read(path / "state.pt", lambda file: torch.load(file, map_location=acc.device, weights_only=True))
    rng = _read(path / f"rng_{acc.process_index}.pt", lambda file: torch.load(file, weights_only=True))
    return weights, state, rng


# What reading a damaged (empty, cut short, garbled) file raises: torch's zip reader (RuntimeError naming the
# zip archive), its pickle reader (EOFError, UnpicklingError), safetensors (SafetensorError). Anything else
# (out of memory on the device, a type weights_only refuses) is no damage and keeps its own error.
_DAMAGED = (EOFError, pickle.UnpicklingError, SafetensorError)
_DAMAGED_ZIP = ("zip archive", "central directory", "PytorchStreamReader")


def _read(file: Path, load: Callable[[Path], Any]) -> Any:
    """`load(file)`; a file that cannot be read is damage to its checkpoint, named with the way out."""
    where = file.parent
    if not file.is_file():  # e.g. rng_1.pt of a run saved with fewer processes: not damage, another launch
        raise CheckpointError(
            f"checkpoint {where} has no {file.name}: it was saved by a run of another process count; resume "
            "with the processes it ran on"
        )
    try:
        return load(file)
    except (*_DAMAGED, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not any(s in str(err) for s in _DAMAGED_ZIP):
            raise
        empty = file.stat().st_size == 0
        why = "is empty (0 bytes)" if empty else f"cannot be read ({_first_sentence(err)})"
        raise CheckpointError(f"checkpoint {where} is damaged: {file.name} {why}; {_way_out(where)}") from err


def _first_sentence(err: BaseException) -> str:
    """The gist of a reader's error for a one-line message (torch's run to a paragraph)."""
    text = str(err).strip().split("\n")[0].split(". ")[0]
    return text[:200] or type(err).__name__


def _way_out(damaged: Path) -> str:
    """What to do about a damaged checkpoint: resume from the one before it (kept for this), or start afresh."""
    if damaged.name == LAST:
        return "the finished run cannot be extended from it: train the longer run in another output_dir"
    earlier = [p for p in sorted(damaged.parent.glob("step_*[0-9]")) if p.name < damaged.name]
    if earlier:
        return f"delete that folder to resume from the checkpoint before it, {earlier[-1]}"
    return "delete that folder to start the run afresh (it is the run's only checkpoint)"


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Set Python's, numpy's, torch's and CUDA's generators as `read_checkpoint`'s RNG state has them."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def keep_last_checkpoint(out: Path) -> None:
    """A finished run keeps its final state as checkpoints/last (to extend or fine-tune it) beside best."""
    steps = sorted((out / CHECKPOINTS).glob("step_*[0-9]"))
    if steps:
        shutil.rmtree(out / CHECKPOINTS / LAST, ignore_errors=True)
        steps[-1].rename(out / CHECKPOINTS / LAST)
    _remove_steps(out, keep=[])


def _remove_steps(out: Path, keep: list[Path]) -> None:
    """Remove the step checkpoints (and any `.partial` or `.old` left of one) but those in `keep`."""
    for old in (out / CHECKPOINTS).glob("step_*"):
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors state dict (with string `metadata`). Clones, so weights shared between modules are written
    under every name and the file loads into any copy of the model as a plain state dict."""
    data = save({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, metadata=metadata)
    write_file(path, lambda fh: fh.write(data))


def write_file(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """A file written whole or not at all: `write` fills `path`.partial through a Python file object (so that a
    full disk fails as OSError(ENOSPC), which torch's own writer reports only as "unexpected pos"), renamed over
    `path` once complete. A failed write leaves neither file and raises one DiskFullError naming `path`."""
    partial = path.with_name(path.name + ".partial")
    try:
        with disk_full_named(path):
            with open(partial, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())  # its bytes are down before its name: a power cut leaves no empty file
            os.replace(partial, path)
    finally:
        remove_quietly(partial)


def remove_quietly(path: Path) -> None:
    """Remove `path` if it is there. A read-only file system (EROFS, even for a file that is not there) is
    ignored: nothing can have been written there, and the write's own error is the one to report."""
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        if err.errno != errno.EROFS:
            raise
