"""One registry helper for every named, pluggable part: store back-ends, teachers, datasets, methods.

An entry is registered as an object or as a "package.module:attribute" path, imported the first
time it is asked for, so listing names never imports torch, zarr or open_clip. A registry may
also read a group of Python entry points (`pyproject.toml`'s `[project.entry-points.GROUP]`),
which is how other installed packages add entries.

    BACKENDS = Registry("store back-end", StoreInputError, group="logit_store.backends")
    BACKENDS.register("zarr", "logit_store.backends.zarr_backend:ZarrBackend")  # or from the group
    BACKENDS.get("zarr")       # imports the module on first use
    BACKENDS.names("z*")       # ['zarr']

An unknown name is an error of the registry's error class that lists what is installed and the
close names. Registering a name twice with another object is a programming error (ValueError),
or a warning when the registry is built with `duplicates="warn"` (entry points of two packages).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import warnings
from importlib.metadata import entry_points
from typing import Any, Generic, Literal, TypeVar

from .errors import DistillError

T = TypeVar("T")

__all__ = ["Registry", "import_path"]


def import_path(path: str) -> Any:
    """The object named by "package.module:attribute" (the attribute may be dotted)."""
    module_name, _, attribute = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in filter(None, attribute.split(".")):
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Names -> objects of one kind (see the module docstring)."""

    def __init__(
        self,
        kind: str,
        error: type[Exception] = DistillError,
        group: str | None = None,
        duplicates: Literal["error", "warn"] = "error",
    ) -> None:
        self.kind, self.error, self.group, self.duplicates = kind, error, group, duplicates
        self._entries: dict[str, T | str] = {}
        self._group_read = group is None

    def register(self, name: str, obj: T | str | None = None) -> Any:
        """Register `obj` (or a "module:attribute" path) under `name`; without `obj`, a decorator."""
        if obj is None:

            def decorate(target: T) -> T:
                self.register(name, target)
                return target

            return decorate
        old = self._entries.get(name)
        if old is not None and old is not obj and old != obj and not self._same_path(old, obj):
            message = f"{self.kind} {name!r} is already registered ({_describe(old)}); not replaced by {_describe(obj)}"
            if self.duplicates == "error":
                raise ValueError(message)
            warnings.warn(message, stacklevel=2)
            return obj
        self._entries[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The entry `name`, imported on first use; an unknown name lists the installed ones."""
        self._read_group()
        if name not in self._entries:
            raise self.error(self.unknown(name))
        entry = self._entries[name]
        if isinstance(entry, str):
            try:
                entry = import_path(entry)
            except ModuleNotFoundError as err:
                module = entry.partition(":")[0]
                if err.name and err.name != module and not module.startswith(err.name + "."):
                    # a dependency of the entry's module (an optional package), not the module itself
                    raise self.error(
                        f"{self.kind} {name!r} needs the package {err.name!r}, which is not installed"
                    ) from None
                raise
            self._entries[name] = entry
        return entry  # type: ignore[return-value]

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style pattern, sorted."""
        self._read_group()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        self._read_group()
        return name in self._entries

    def unknown(self, name: str) -> str:
        """The message for an unknown name: what is installed, and the closest names."""
        known = self.names()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}; installed: {', '.join(known) or 'none'}{hint}"

    def _read_group(self) -> None:
        if self._group_read:
            return
        self._group_read = True
        for point in entry_points(group=self.group):
            self.register(point.name, point.value)

    @staticmethod
    def _same_path(old: Any, new: Any) -> bool:
        """An imported entry and the path it came from are the same registration."""
        paths = [x for x in (old, new) if isinstance(x, str)]
        objects = [x for x in (old, new) if not isinstance(x, str)]
        return len(paths) == 1 and len(objects) == 1 and _resolves_to(paths[0], objects[0])


def _resolves_to(path: str, obj: Any) -> bool:
    module_name, _, attribute = path.partition(":")
    return getattr(obj, "__module__", None) == module_name and getattr(obj, "__qualname__", None) == attribute


def _describe(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__name__)}"
