"""Weights files: safe loading (safetensors or weights-only torch.load), fit checks against a model, and hashing."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logit_store import DistillError

__all__ = [
    "SUFFIXES",
    "CheckpointError",
    "classifier_keys",
    "file_sha256",
    "load_checkpoint",
    "load_state_dict_file",
    "mismatch_report",
    "state_dict_sha256",
    "unwrap_state_dict",
]

# What the loader reads: safetensors, and torch files as torch and timm's train.py write them
# (model_best.pth.tar, last.pth.tar, checkpoint-N.pth.tar).
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".pth.tar", ".tar")
# Containers a training script may nest the weights under, tried in this order (timm's loader takes
# "state_dict_ema" / "model_ema" first when present, as timm does).
NESTED_KEYS = ("state_dict", "model", "model_ema")
# Wrapper prefixes: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 20


class CheckpointError(DistillError):
    """A weights file that cannot be read safely or does not fit its model; the message names it."""


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict of CPU tensors from a .safetensors or torch file (.pth, .pt, .bin, timm's .pth.tar).

    Read by timm's own loader: torch files with `weights_only=True` (nothing but tensors, plain containers and
    timm's `args` Namespace is ever unpickled), the EMA weights of a timm training checkpoint when it has them,
    weights nested under "state_dict" or "model" unwrapped, and "module." / "_orig_mod." prefixes stripped.
    """
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if not path.name.lower().endswith(SUFFIXES):
        raise CheckpointError(
            f"checkpoint {path}: unknown file type '{path.suffix}', expected one of {', '.join(SUFFIXES)}"
        )
    try:
        raw: Any = load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except RuntimeError as err:
        blocked = re.search(r"Unsupported globals?: ([^.]*(?:\.[^ .]+)*)", str(err))
        if "weights_only" not in str(err):
            raise CheckpointError(f"checkpoint {path} could not be read: {err}") from err
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain containers, and is refused: "
            f"it is read with torch.load(weights_only=True), which never unpickles arbitrary objects "
            f"(blocked: {blocked.group(1) if blocked else 'unknown globals'}). Re-save just the state dict "
            "(torch.save(model.state_dict(), ...)) or use .safetensors."
        ) from err
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as err:  # safetensors' errors are ValueErrors
        raise CheckpointError(f"checkpoint {path} could not be read: {err}") from err
    return unwrap_state_dict(raw, source=str(path))


def unwrap_state_dict(raw: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a raw or nested state dict, with wrapper prefixes stripped from the keys."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source} holds a {type(raw).__name__}, expected a state dict (a mapping of tensors)")
    for key in NESTED_KEYS:
        if isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    not_tensors = sorted(str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(
            f"{source} is not a state dict: {_listing(not_tensors)} hold no tensors "
            f"(weights are looked for at the top level or under {', '.join(repr(k) for k in NESTED_KEYS)})"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = str(key)
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise CheckpointError(f"{source}: key {key!r} collides with another once its wrapper prefix is stripped")
        out[name] = value
    return out


def mismatch_report(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """One entry per kind of mismatch (shapes, missing keys, unexpected keys); empty when the state dict fits."""
    expected = model.state_dict()
    shapes = [
        f"{key}: checkpoint {list(state_dict[key].shape)} vs model {list(expected[key].shape)}"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    lines = []
    if shapes:
        lines.append(f"shape mismatches (checkpoint vs model): {_listing(shapes)}")
    if missing:
        lines.append(f"missing keys (in the model, not in the checkpoint): {_listing(missing)}")
    if unexpected:
        lines.append(f"unexpected keys (in the checkpoint, not in the model): {_listing(unexpected)}")
    return lines


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], what: str = "the model", new_head: bool = False
) -> str | None:
    """Load a checkpoint file into `model`, strictly; any mismatch is a CheckpointError listing all of them.

    With `new_head` (fine-tuning a pretrained model on other classes), a checkpoint whose only mismatch is the
    shape of the model's classifier (timm's `pretrained_cfg["classifier"]` names, as timm's pretrained loading
    drops a head of another class count) loads all but the classifier, which keeps its new initialisation: the
    returned line says so, naming its tensors and shapes. None when everything was loaded."""
    state_dict = load_state_dict_file(path)
    kept = {}
    if new_head:
        expected = model.state_dict()
        kept = {
            key: f"{key}: checkpoint {list(state_dict[key].shape)} vs model {list(expected[key].shape)}"
            for key in classifier_keys(model)
            if key in expected and key in state_dict and state_dict[key].shape != expected[key].shape
        }
        state_dict = {**state_dict, **{key: expected[key] for key in kept}}  # the model's own: left as built
    problems = mismatch_report(model, state_dict)
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit {what} (saved for another model or another num_classes?): "
            + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)
    if not kept:
        return None
    return (
        f"checkpoint {path}: loaded into {what} but its classifier, which has another class count and is left "
        f"newly initialised ({'; '.join(kept.values())})"
    )


def classifier_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of a timm model's classifier: `NAME.weight` and `NAME.bias` of each name in its
    `pretrained_cfg["classifier"]` (or `default_cfg`), a string or a tuple ("head", "head_dist")."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    names = [names] if isinstance(names, str) else list(names or [])
    return [f"{name}.{part}" for name in names for part in ("weight", "bias")]


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 hex of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex over a state dict: for each key in sorted order, its name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _listing(items: list[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    return shown + (f"; ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")
