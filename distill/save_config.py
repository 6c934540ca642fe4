"""The options of `distill-save-logits`: what the save pipeline (`distill.save`) takes.

A module of its own, without torch: the command line (`distill.cli`) builds and checks a `SaveConfig`
before the save's heavy imports load, so `--help` and an option's error answer at once.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .errors import RecipeError

__all__ = ["OPTION_TYPES", "SaveConfig"]


def _option(text: str, default: Any = MISSING) -> Any:
    return field(default=default, metadata={"help": text if default is MISSING else f"{text} (default: {default})"})


@dataclass
class SaveConfig:
    """The options of distill-save-logits (command line over `--config FILE.yaml`). Invariant: every field has
    its annotated type and range (a RecipeError naming the option otherwise)."""

    teacher: str = _option("teacher spec: timm:NAME, module:pkg.mod:factory, ensemble:..., open_clip:NAME")
    data: str = _option("dataset spec: a class-folder PATH, csv:PATH, wds:PATTERN, pairs:PATH, digits")
    out: str = _option("the store to write: a path or an fsspec URL")
    epochs: int = _option("epochs of views to save")
    k: int | None = _option("classes kept per record (logits teachers; a CLIP teacher stores embeddings)", None)
    backend: str = _option("zarr or lmdb", "zarr")
    checkpoint: str | None = _option("the teacher's weights (.safetensors, or .pth read with weights_only)", None)
    aug: str | dict = field(  # a mapping of Augmentation fields only through --from-recipe or --config
        default="basic",
        metadata={"help": "augmentation preset or YAML file: the views students will replay (default: basic)"},
    )
    img_size: int = _option("the teacher's input size", 224)
    batch_size: int = _option("teacher batch (part of the store's identity: a resume must keep it)", 64)
    workers: int = _option("DataLoader worker processes", 0)
    seed: int = _option("global seed of the views (a student's recipe must use the same)", 0)
    skip_unreadable: bool = _option("drop images that cannot be decoded instead of failing", False)
    fingerprint: str = _option(
        "dataset fingerprint: content (every image's bytes hashed, cached) or fast (names, sizes, labels only: "
        "for datasets too large to read once)",
        "content",
    )
    check_replay: int = _option("after saving, recompute this many stored records and compare", 0)

    def __post_init__(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), OPTION_TYPES[str(f.type)]
            if value is not None and not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
                raise RecipeError(f"option '{f.name}' must be {f.type.replace(' | None', '')}, got {value!r}")
        for name in ("epochs", "k", "img_size", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise RecipeError(f"option '{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "check_replay"):  # refused here, before the teacher loads or a store is made
            if getattr(self, name) < 0:
                raise RecipeError(f"option '{name}' must be >= 0, got {getattr(self, name)}")
        if self.fingerprint not in ("content", "fast"):
            raise RecipeError(f"option 'fingerprint' must be content or fast, got {self.fingerprint!r}")


# A field's annotation (a string, under `from __future__ import annotations`) -> the Python types it admits.
OPTION_TYPES = {"str": str, "int": int, "bool": bool, "str | None": str, "int | None": int, "str | dict": (str, dict)}
