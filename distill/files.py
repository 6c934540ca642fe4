"""Reading a file a user named: only a regular file, and only up to a size cap; YAML as bounded plain data.

``open()`` on a FIFO blocks until a writer comes, and reading ``/dev/zero`` (or a link to it) or a sparse
file of many gigabytes ends in a MemoryError. So a path is opened non-blocking, checked by ``fstat`` on the
open descriptor (what is checked is what is read, even if the path is swapped meanwhile) and read to at most
the cap plus one byte. A refusal is a ``RefusedFile``, an ``OSError`` whose text is the reason, so the
callers' ``except OSError`` handlers name the file as they do for any other read error.

Every YAML the toolkit reads (recipes and their ``--set`` values, augmentation files, ``--config`` files, a
run folder's recipe) goes through ``load_yaml_file`` or ``load_yaml_text``: plain data only (a SafeLoader),
within ``MAX_ALIAS_VALUES`` values added by aliases and ``MAX_DEPTH`` levels of nesting, and ``3e-4`` read as
the number it means. A problem is a ``BadYaml`` whose text is the reason on one line.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from typing import Any

import yaml

MiB = 1 << 20

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class RefusedFile(OSError):
    """A path that is not a regular file, or a file larger than its cap; ``str()`` is the reason."""


def size_text(size: int) -> str:
    """``size`` bytes for a message: '8 GiB', '300 bytes', '1048581 bytes (1.0 MiB)' (exact when not whole, so a
    size just over a limit never reads as equal to it)."""
    if size < 1024:
        return f"{size} bytes"
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{size} bytes ({value:.1f} {unit})"
    raise AssertionError(size)  # unreachable: size >= 1024 matches KiB


def refuse_unless_regular(mode: int, size: int, limit: int, what: str = "a file") -> None:
    """RefusedFile unless ``mode`` is a regular file's and ``size`` is at most ``limit`` bytes (``what``: the
    kind of file, for the message)."""
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise RefusedFile(f"{kind}, not a regular file")
    if size > limit:
        raise RefusedFile(f"{size_text(size)}, more than the {size_text(limit)} allowed for {what}")


def read_regular_file(path: str | os.PathLike, limit: int, what: str = "a file") -> bytes:
    """The bytes of the regular file ``path``; RefusedFile for anything else or more than ``limit`` bytes,
    another OSError when it cannot be opened or read."""
    # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer; no effect on regular files.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:  # owns fd from here on
        info = os.fstat(fd)
        refuse_unless_regular(info.st_mode, info.st_size, limit, what)
        data = f.read(limit + 1)  # bounded even if the file grew since fstat
    if len(data) > limit:
        raise RefusedFile(f"grew past the {size_text(limit)} allowed for {what} while it was read")
    return data


# ---- YAML ------------------------------------------------------------------------------------------------

# Aliases may repeat a section (`zero_shot: *zero_shot`), but every value they add to the document counts: a
# "billion laughs" of nested aliases loads in microseconds as shared objects, then takes minutes and gigabytes
# once anything walks or copies it. Nesting is capped as well, so that nothing walking the data recurses too deep.
MAX_ALIAS_VALUES = 10_000  # values (scalars and collections) all aliases of one document may add
MAX_DEPTH = 32  # levels of nested collections in a document (the published recipes use 6)
MAX_YAML_BYTES = 1 * MiB  # the largest YAML file read: the toolkit's are a few KiB; /dev/zero would fill memory


class BadYaml(ValueError):
    """YAML that cannot be read as bounded plain data, or a YAML file that cannot be read; ``str()`` is the
    reason on one line (callers prefix the file or option)."""


def load_yaml_file(path: str | os.PathLike, what: str, limit: int = MAX_YAML_BYTES) -> Any:
    """The plain data of the YAML file ``path``, a regular UTF-8 file of at most ``limit`` bytes (``what``: the
    kind of file, for the message: "a recipe"). BadYaml: 'cannot read: ...', 'not UTF-8 text (...)' or
    'not valid YAML: ...' (see ``load_yaml_text``)."""
    try:
        text = read_regular_file(path, limit, what).decode("utf-8")
    except OSError as err:
        raise BadYaml(f"cannot read: {err}") from None
    except UnicodeDecodeError as err:
        raise BadYaml(f"not UTF-8 text ({err})") from None
    try:
        return load_yaml_text(text)
    except BadYaml as err:
        raise BadYaml(f"not valid YAML: {err}") from None


def load_yaml_text(text: str) -> Any:
    """Plain data within MAX_ALIAS_VALUES and MAX_DEPTH; anything else (a syntax error, a ``!!python`` tag, an
    alias bomb or cycle, deeper nesting) is a BadYaml saying what and where."""
    try:
        data = yaml.load(text, Loader=_BoundedLoader)
    except RecursionError:  # the composer recurses per level: deep enough, it runs out of stack
        raise BadYaml(f"nested deeper than {MAX_DEPTH} levels") from None
    except yaml.YAMLError as err:
        raise BadYaml(_one_line(err)) from None
    if nesting_depth(data) > MAX_DEPTH:
        raise BadYaml(f"nested deeper than {MAX_DEPTH} levels")
    return data


def nesting_depth(data: Any) -> int:
    """Levels of nested lists and mappings in ``data`` (0 for a scalar), walked without recursion; a depth past
    MAX_DEPTH is reported as MAX_DEPTH + 1 (no need to walk on)."""
    deepest, stack = 0, [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth + 1)
            if depth < MAX_DEPTH:
                stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader (plain data only) within MAX_ALIAS_VALUES; no alias inside its own anchor (a cycle).
    YAML 1.1 reads `3e-4` as a string (its floats need a dot); the toolkit's files mean a number."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._alias_values = 0
        self._open: set[str] = set()  # anchors of collections being composed

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if event.anchor in self._open:  # a cycle: anything walking the data would never end
                problem = f"alias *{event.anchor} inside its own anchor"
                raise yaml.composer.ComposerError(None, None, problem, event.start_mark)
            if event.anchor in self.anchors:
                self._alias_values += _values(self.anchors[event.anchor], {})
                if self._alias_values > MAX_ALIAS_VALUES:
                    problem = f"aliases add more than {MAX_ALIAS_VALUES} values (an alias bomb?); write them out"
                    raise yaml.composer.ComposerError(None, None, problem, event.start_mark)
        return super().compose_node(parent, index)

    def compose_sequence_node(self, anchor: str | None) -> yaml.SequenceNode:
        with self._composing(anchor):
            return super().compose_sequence_node(anchor)

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        with self._composing(anchor):
            return super().compose_mapping_node(anchor)

    @contextlib.contextmanager
    def _composing(self, anchor: str | None) -> Iterator[None]:
        if anchor is not None:
            self._open.add(anchor)
        try:
            yield
        finally:
            self._open.discard(anchor)


_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.[\d_]+)[eE][-+]?\d+$")
_BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """Writes what `load_yaml_text` reads back as it was: a string such as '1e3' is quoted (plain, the loader
    would read a number)."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT, list("-+0123456789."))


def dump_yaml(data: Any) -> str:
    """`data` as YAML that `load_yaml_text` reads back equal (keys in their order)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def _values(node: yaml.Node, seen: dict[int, int]) -> int:
    """The values `node` stands for once its aliases are expanded (itself included); `seen` memoises shared
    nodes, so this costs one visit per distinct node."""
    if id(node) not in seen:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        seen[id(node)] = 1 + sum(_values(child, seen) for child in children)
    return seen[id(node)]


def _one_line(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's own text spans several)."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return str(err)
    mark = err.problem_mark or err.context_mark
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return f"{err.context + ': ' if err.context else ''}{err.problem}{where}"
