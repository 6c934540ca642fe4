"""The options of `distill-save-logits`: what the save pipeline (`distill.save`) takes.

A module of its own, without torch: the command line (`distill.cli`) builds and checks a `SaveConfig`
before the save's heavy imports load, so `--help` and an option's error answer at once.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .errors import RecipeError

__all__ = ["OPTION_TYPES", "TEACHER_SPECS", "SaveConfig"]

# The teacher spec syntax (teachers/registry.py and the teacher modules), for the tools' --help epilogs.
TEACHER_SPECS = """teacher specs (--teacher here, a recipe's teacher.source): options and model keyword arguments
go in the spec after a "?", joined by "&" (a recipe's teacher section takes only source, checkpoint, epochs)
  timm:NAME                           a timm model for the data's classes: random, or the weights of --checkpoint
                                      (teacher.checkpoint), which must fit its head
  timm:NAME?file=PATH                 pretrained weights from a local file, with their own head (timm's
                                      pretrained_cfg_overlay file); ?pretrained=1: timm's own (download or cache)
  timm:NAME?file=PATH&class_map=FILE  a pretrained head of other classes: FILE holds the teacher's class index
                                      of each data class, one per line, in the data's class order
  timm:NAME?KEY=VALUE&...             model keyword arguments, values read as YAML: img_size=32 (a ViT at
                                      another size), window_sizes=[8,4,2,1], drop_path_rate=0.1
  module:pkg.mod:factory?KEY=VALUE    factory(num_classes=..., KEY=VALUE): your own nn.Module
  ensemble:SPEC@CKPT,SPEC@CKPT*0.3    the members' weighted mean softmax
  store:PATH                          a saved store (training recipes)
  open_clip:NAME?pretrained=TAG       a CLIP teacher: embeddings
"""


def _option(text: str, default: Any = MISSING) -> Any:
    return field(default=default, metadata={"help": text if default is MISSING else f"{text} (default: {default})"})


@dataclass
class SaveConfig:
    """The options of distill-save-logits (command line over `--config FILE.yaml`). Invariant: every field has
    its annotated type and range (a RecipeError naming the option otherwise)."""

    teacher: str = _option(
        "teacher spec: timm:NAME[?file=PATH&class_map=FILE&KEY=VALUE], module:pkg.mod:factory, ensemble:..., "
        "open_clip:NAME (the specs are listed below)"
    )
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
