"""The store's narrow contract: a read-only store refuses every write, a store closes as a context manager, errors
that are OS failures are OSErrors too (and still one line from the CLI), a back-end name is checked once (by
`create_backend`), and the package's modules import no circle."""

from __future__ import annotations

import ast
import errno
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from store_helpers import manifest, write_in_order

import logit_store
import logit_store.location
from logit_store import (
    DiskFullError,
    DistillError,
    ShardWriter,
    StoreAccessError,
    StoreError,
    StoreInputError,
    create_store,
    open_store,
)
from logit_store.backends import lmdb_backend
from logit_store.cli import main as store_cli
from logit_store.location import StoreLocation
from logit_store.testing import listing

PACKAGE = Path(logit_store.__file__).parent


@pytest.fixture(params=["zarr", "lmdb"])
def written(request, tmp_path) -> Path:
    """A store of 2 shards whose epoch 0 is committed."""
    path = tmp_path / "s"
    store = create_store(path, manifest(request.param, num_samples=1000, shard_records=512, chunk_records=128))
    write_in_order(store, 0)
    store.close()
    return path


def test_a_store_opened_read_only_reads_and_refuses_every_write(written):
    before = listing(written)
    store = open_store(written, read_only=True)
    assert store.read(0, [3, 999]).seed.size == 2 and store.verify()[0].kind == "missing"
    refused = f"{written} was opened read-only: cannot"
    for write in (
        lambda s: s.writer(1),
        lambda s: ShardWriter(s, 1, [0]),
        lambda s: s.repair(),
        lambda s: s.refresh_statistics(),
    ):
        with pytest.raises(StoreError, match=refused):
            write(store)
        with pytest.raises(StoreError, match=refused):  # as a DataLoader worker gets it
            write(pickle.loads(pickle.dumps(store)))
    store.close()
    assert listing(written) == before
    with open_store(written) as writable:  # the default: writable
        writable.writer(1, [0]).release()


def test_a_store_is_a_context_manager_that_closes_its_handles(written):
    key = (os.getpid(), str(written / "lmdb"))
    with open_store(written, read_only=True) as store:
        assert store.read(0, np.arange(600)).seed.size == 600 and store.private_cache_bytes > 0
        opened = key in lmdb_backend._OPEN
    assert store.private_cache_bytes == 0 and key not in lmdb_backend._OPEN
    assert opened == (store.manifest.backend == "lmdb")  # lmdb's environment was open, and is closed
    assert store.read(0, [5]).seed.size == 1  # a later read reopens what it needs


def test_disk_full_and_access_errors_are_os_errors_too():
    for error in (DiskFullError, StoreAccessError):
        assert issubclass(error, OSError) and issubclass(error, DistillError) and issubclass(error, ValueError)
    assert str(DiskFullError("disk full: x")) == "disk full: x" and DiskFullError("x").errno is None


def test_a_caller_catching_os_error_sees_a_full_disk_named_once(tmp_path, monkeypatch):
    """ENOSPC at the second commit marker: the DiskFullError reaches the caller's `except OSError` as it is."""
    monkeypatch.setattr(ShardWriter, "MAX_SEALED", 0)
    store = create_store(tmp_path / "s", manifest(num_samples=1000, shard_records=512, chunk_records=128))
    real, calls = logit_store.location.write_file, []

    def full_at_second(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(logit_store.location, "write_file", full_at_second)
    try:
        write_in_order(store, 0)
    except OSError as err:
        caught = err
    marker = tmp_path / "s" / "commits" / "e00000-s000001.json"
    assert type(caught) is DiskFullError
    assert (
        str(caught)
        == f"disk full: cannot write {marker} (no space left on its file system); free space, then run again"
    )


def test_the_cli_prints_a_full_disk_and_an_unreachable_store_as_one_line_exit_2(written, tmp_path, monkeypatch, capsys):
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(logit_store.location, "write_file", full)
        assert store_cli(["convert", str(written), str(tmp_path / "copy"), "--backend", "zarr"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distill-store convert: error: disk full: cannot write "), err

    def unreachable(*_args, **_kwargs):
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(MemoryFileSystem, "cat_file", unreachable)
    assert store_cli(["info", "memory://bucket/s"]) == 2
    assert capsys.readouterr().err == "distill-store info: error: memory://bucket/s: connection refused\n"


def test_an_unreachable_store_is_named_once_through_nested_reaches():
    """zarr's writes reach the store inside a reach (the array's metadata, then its shards): an inner
    StoreAccessError, an OSError too, passes the outer one as it is."""
    location = StoreLocation("memory://bucket/s")
    with pytest.raises(StoreAccessError) as err, location.reaching(), location.reaching():
        raise ConnectionRefusedError("connection refused")
    assert str(err.value) == "memory://bucket/s: connection refused"


def test_the_cli_prints_a_replaced_store_as_the_library_logs_it(written, tmp_path, capsys):
    """`logit_store.api` logs the replacement of an empty store made with another manifest; distill-store
    prints it as the one plain line on stderr it always printed."""
    m = open_store(written).manifest
    dst = tmp_path / "copy"
    create_store(dst, manifest("zarr", num_samples=1000, shard_records=512, chunk_records=128, k=4)).close()
    assert store_cli(["convert", str(written), str(dst), "--backend", "zarr"]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"replacing {dst}: it holds no committed record and was made with another k\n"
    assert open_store(dst).manifest.k == m.k and open_store(dst).committed_shards(0) == {0, 1}


def test_an_unknown_backend_is_refused_once_naming_the_store_and_the_installed_ones(tmp_path):
    path = tmp_path / "s"
    with pytest.raises(StoreInputError) as err:
        create_store(path, manifest("zar"))
    assert (
        str(err.value) == f"{path}: manifest: unknown store back-end 'zar'; installed: lmdb, zarr; did you mean 'zarr'?"
    )
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    create_store(path, manifest("zarr")).close()
    edited = (path / "manifest.json").read_text().replace('"backend": "zarr"', '"backend": "hdf5"')
    (path / "manifest.json").write_text(edited)  # a store of a back-end not installed here
    with pytest.raises(
        StoreInputError, match=rf"^{path}: manifest: unknown store back-end 'hdf5'; installed: lmdb, zarr$"
    ):
        open_store(path)


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that importing `path` runs, from imports anywhere in it (TYPE_CHECKING blocks and
    functions too): each module named, and its packages but the root (which runs before any of its modules)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = ".".join(filter(None, [package.rsplit(".", node.level - 1)[0] if node.level else "", node.module]))
            names = {f"{module}.{a.name}" for a in node.names}
            found |= names | ({module} if module != "logit_store" or not names <= modules else set())
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    parents = {".".join(t.split(".")[:i]) for t in found for i in range(2, t.count(".") + 1)}
    return (found | parents) & modules - {name}


def test_the_package_modules_import_no_circle():
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(paths)) for name, path in paths.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for t in graph[todo.pop()] - seen:
                seen.add(t)
                todo.append(t)
        return seen

    assert [m for m in sorted(graph) if m in reach(m)] == []


def test_the_library_imports_no_pytest():
    probe = "import sys, logit_store, logit_store.cli, logit_store.pin; print(sorted({'pytest'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
