"""Stores read over HTTP from a static file server that refuses directory listings (403): a real
`http.server` on 127.0.0.1, started by the tests, answering files by name and byte ranges, as web servers,
public bucket URLs and hubs do. Nothing a reader needs may come from listing a folder, and a location that
cannot be listed never reads as empty or damaged.

Every result is compared with the same store read from its local folder."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import numcodecs
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from store_helpers import manifest, write_epoch
from train_helpers import base_recipe, small_digits, write_recipe

from distill.cli import save_logits as save_main
from distill.cli import train as train_main
from logit_store import StoreAccessError, convert_store, create_store, open_store
from logit_store.cli import main as store_cli

pytestmark = pytest.mark.usefixtures("single_thread")
USER, PASSWORD = "reader", "pa55/word+secret"
HTML = b"<!DOCTYPE html><html><body>Welcome</body></html>"


class StaticFiles(http.server.SimpleHTTPRequestHandler):
    """Files by name, with byte ranges (206); a folder is refused (403: no listing). Its server's `site` may
    make it require a password, answer an HTML page for every missing file (as single-page sites do), or go
    away: from the first request whose path holds `site.gone_from`, every connection closes unanswered."""

    protocol_version = "HTTP/1.1"  # keep-alive, as real servers
    disable_nagle_algorithm = True  # (headers and body are separate writes: no 40 ms wait on the second)

    def log_message(self, *args: object) -> None:
        pass

    def send_head(self) -> io.BytesIO | None:
        site: Site = self.server.site  # type: ignore[attr-defined]
        site.requests.append(self.path)
        if site.gone_from is not None and site.gone_from in self.path:
            site.gone = True
        if site.gone:
            self.close_connection = True
            return None
        if site.password and self.headers.get("Authorization") != site.password:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="store"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            self.send_error(403, "directory listing refused")
            return None
        if not os.path.isfile(path):
            if site.html_for_missing:
                return self._send(HTML, 200, "text/html")
            self.send_error(404)
            return None
        return self._send(Path(path).read_bytes())

    def _send(self, data: bytes, status: int = 200, kind: str = "application/octet-stream") -> io.BytesIO:
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        start, stop = 0, len(data)
        if match is not None:
            self.server.site.ranged.append(self.path)  # type: ignore[attr-defined]
            first, last = match.groups()
            start, stop = (len(data) - int(last), len(data)) if not first else (int(first), len(data))
            stop = min(stop, int(last) + 1) if first and last else stop
            start, status = max(start, 0), 206
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(stop - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.end_headers()
        return io.BytesIO(data[start:stop])


class WholeFiles(http.server.SimpleHTTPRequestHandler):
    """Python's own file server, as `python -m http.server` runs it: it ignores byte ranges."""

    def log_message(self, *args: object) -> None:
        pass


class Site:
    """A folder served on 127.0.0.1 (port 0) by a thread, with the requests it answered."""

    def __init__(self, root: Path, handler: type = StaticFiles) -> None:
        self.requests: list[str] = []
        self.ranged: list[str] = []  # the requests for a byte range
        self.gone_from: str | None = None
        self.gone = False
        self.password: str | None = None
        self.html_for_missing = False
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=root))
        self.server.request_queue_size = 128
        self.server.site = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, name: str, credentials: str = "") -> str:
        host, port = self.server.server_address[:2]
        return f"http://{credentials}{host}:{port}/{name}"

    def require(self, user: str, password: str) -> None:
        self.password = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def close(self) -> None:
        """Stop answering: new connections are refused, those kept alive close unanswered."""
        self.gone = True
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def serving(root: Path, handler: type = StaticFiles) -> Iterator[Site]:
    site = Site(root, handler)
    try:
        yield site
    finally:
        site.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A folder to serve: a finished store (s.zarr, 4 chunks a shard), one still being written (partial.zarr: epoch 0 and shards 0
    and 2 of epoch 1), an lmdb copy (s.lmdb) and an HTML page (index.html)."""
    root = tmp_path_factory.mktemp("site")
    store = create_store(root / "s.zarr", manifest(shard_records=512, chunk_records=128))
    for epoch in range(store.manifest.epochs):
        write_epoch(store, epoch)
    partial = create_store(root / "partial.zarr", manifest())
    write_epoch(partial, 0)
    write_epoch(partial, 1, shards=[0, 2])
    convert_store(open_store(root / "s.zarr"), root / "s.lmdb", "lmdb").close()
    (root / "index.html").write_bytes(HTML)
    return root


@pytest.fixture
def site(folder) -> Iterator[Site]:
    with serving(folder) as site:
        yield site


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = store_cli(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(code: int, out: str, err: str) -> str:
    """The one error line of a refused command (exit 2, nothing on stdout, no traceback)."""
    assert (code, out) == (2, "") and err.count("\n") == 1 and "Traceback" not in err, (code, out, err)
    return err


# ---- a finished store, and one still being written ----------------------------------------------------


@pytest.mark.parametrize("name", ["s.zarr", "partial.zarr"])
def test_info_and_verify_of_the_url_equal_those_of_the_local_folder(folder, site, name, capsys):
    """Records, epochs done, size, statistics and content hashes; verify's ranges (the partial store: epoch 1's
    missing ones, exit 1). No folder is asked for and nothing is written into the served folder."""
    before = snapshot(folder)
    url, local = site.url(name), str(folder / name)
    for args in (["info"], ["info", "--json"], ["verify"]):
        remote = run(capsys, args[0], url, *args[1:])
        here = run(capsys, args[0], local, *args[1:])
        assert remote == (here[0], here[1].replace(local, url), here[2]), args
    assert [path for path in site.requests if path.endswith("/")] == []
    assert snapshot(folder) == before
    info = json.loads(run(capsys, "info", url, "--json")[1])
    if name == "partial.zarr":
        assert info["completed_epochs"] == [0] and info["records_per_epoch"] == {"0": 3000, "1": 1024}
        assert "epoch 1 records [512, 1024): missing (not committed)" in run(capsys, "verify", url)[1]
    else:
        assert info["completed_epochs"] == [0, 1] and len(info["content_hashes"]) == 2


def test_records_read_over_http_are_the_local_ones(folder, site, tmp_path):
    """Reads of planes decoded in pieces into the node's shared cache, as training reads a large store: zarr
    reads byte ranges of each shard file (its index, then its chunks)."""
    ids = np.random.default_rng(0).permutation(3000)[:700]
    local = open_store(folder / "s.zarr")
    remote = open_store(site.url("s.zarr"), cache_bytes=40_000, cache_dir=str(tmp_path))
    for epoch in (0, 1):
        a, b = local.read(epoch, ids), remote.read(epoch, ids)
        for field in ("values", "indices", "tail_lse", "seed"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert len([path for path in site.ranged if "/c/" in path]) > 2 * 4 * remote.manifest.num_shards


def test_a_served_store_converts_to_a_local_one(folder, site, tmp_path, capsys):
    """`distill-store convert URL FOLDER` (a served store copied home, as lmdb here): the copy's content hashes are
    the served store's."""
    code, out, err = run(capsys, "convert", site.url("s.zarr"), str(tmp_path / "copy.lmdb"))
    assert code == 0 and "(lmdb)" in out, err
    copied = json.loads(run(capsys, "info", str(tmp_path / "copy.lmdb"), "--json")[1])
    served = json.loads(run(capsys, "info", str(folder / "s.zarr"), "--json")[1])
    assert copied["content_hashes"] == served["content_hashes"] and len(served["content_hashes"]) == 2


def test_an_lmdb_store_over_http_is_one_line_naming_it(site, capsys):
    err = one_line(*run(capsys, "info", site.url("s.lmdb")))
    assert f"lmdb stores need a local path, got {site.url('s.lmdb')}" in err


@pytest.mark.parametrize(
    ("name", "html", "message"),
    [
        ("nothing-here.zarr", False, "{url} is not a logit store: it has no manifest.json"),
        ("index.html", False, "{url} is not a logit store: it has no manifest.json"),
        ("app/route", True, "{url}/manifest.json is not valid JSON"),
    ],
    ids=["404", "an HTML page", "a site answering HTML for every path"],
)
def test_a_url_that_is_not_a_store_is_one_line_naming_it(site, name, html, message, capsys):
    site.html_for_missing = html
    url = site.url(name)
    for command in ("info", "verify"):
        err = one_line(*run(capsys, command, url))
        assert message.format(url=url) in err


def test_a_web_location_is_never_written(site):
    from logit_store import StoreError

    with pytest.raises(StoreError, match=r"is an http\(s\) location, read-only: cannot create or write a store"):
        create_store(site.url("new.zarr"), manifest())
    store = open_store(site.url("partial.zarr"))
    with pytest.raises(StoreError, match=r"read-only: cannot write to it"):
        store.writer(1)


def test_a_server_that_ignores_byte_ranges_is_one_line(folder, capsys):
    """python -m http.server sends whole files for ranged requests: refused up front, never read as damage."""
    with serving(folder, WholeFiles) as site:
        err = one_line(*run(capsys, "verify", site.url("s.zarr")))
    assert f"{site.url('s.zarr')}: the server ignores HTTP Range requests" in err


# ---- docs/STORE_FORMAT.md's minimal reading algorithm, written out with numpy and numcodecs ---------------

ROW_FIELDS = ("values", "indices", "tail_lse", "seed", "partner", "lam", "embedding")  # the format's tables' order


def fetch(url: str, suffix: int | None = None, first: int | None = None, length: int = 0) -> bytes | None:
    """A file (None on a 404), its last `suffix` bytes, or `length` bytes from `first`: plain HTTP requests."""
    headers = {"Range": f"bytes=-{suffix}"} if suffix else {}
    headers = {"Range": f"bytes={first}-{first + length - 1}"} if first is not None else headers
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise


def read_record(store: str, plane: int, sample: int) -> tuple[dict[str, np.ndarray], bool]:
    """The record of `sample` in `plane` of the zarr store at URL `store`, following docs/STORE_FORMAT.md
    ("Reading a store: the minimal algorithm") step by step, and whether its block matches its digest."""
    m = json.loads(fetch(f"{store}/manifest.json"))  # 1. manifest
    assert m["format_version"] == 3 and m["backend"] == "zarr" and m["kind"] == "logits"
    shard_records, chunk_records, n = m["shard_records"], m["chunk_records"], m["num_samples"]
    shard = sample // shard_records  # 2. shard and block
    start, stop = shard * shard_records, min((shard + 1) * shard_records, n)
    block, row = divmod(sample - start, chunk_records)
    marker = json.loads(fetch(f"{store}/commits/e{plane:05d}-s{shard:06d}.json"))  # 3. marker
    assert (marker["epoch"], marker["shard"], marker["start"], marker["stop"]) == (plane, shard, start, stop)
    rows_in_block = min(chunk_records, stop - start - block * chunk_records)
    fields, chunks = [f for f in ROW_FIELDS if f in m["dtypes"]], shard_records // chunk_records
    block_rows = {}
    for field in fields:  # 4. rows: the shard file's index, then the block's chunk
        meta = json.loads(fetch(f"{store}/{field}/zarr.json"))
        wide = len(meta["shape"]) == 3
        key = f"{store}/{field}/c/{plane}/{shard}" + ("/0" if wide else "")
        index = np.frombuffer(fetch(key, suffix=16 * chunks + 4)[:-4], dtype="<u8").reshape(chunks, 2)
        offset, length = (int(v) for v in index[block])
        assert offset != 2**64 - 1, "an absent chunk: fill values"
        raw = numcodecs.Blosc().decode(fetch(key, first=offset, length=length))
        dtype = np.dtype(m["dtypes"][field]).newbyteorder("<")
        width = (m["k"],) if wide else ()
        block_rows[field] = np.frombuffer(raw, dtype=dtype).reshape(chunk_records, *width)[:rows_in_block]
    codes = np.cumsum(block_rows["values"], axis=1, dtype=np.uint16)  # 5. codes: cumulative sum mod 2^16
    packed = np.empty(rows_in_block, dtype=[(f, block_rows[f].dtype, block_rows[f].shape[1:]) for f in fields])
    for field in fields:
        packed[field] = codes if field == "values" else block_rows[field]
    intact = hashlib.blake2b(packed.tobytes(), digest_size=16).hexdigest() == marker["digests"][block]  # 6.
    record = packed[row]
    step = 2.0**-11  # 7. decode: logits relative to the top one, and the tail
    return {
        "values": (record["values"] * -step).astype(np.float32),
        "indices": record["indices"],
        "tail_lse": np.float32(record["tail_lse"] * step),
        "seed": record["seed"],
    }, intact


def test_the_minimal_algorithm_reads_a_record_over_http(site):
    """The format's minimal reading algorithm, over plain HTTP requests of named files, gives the records the
    store's reader gives (ids in the first, middle and last shard; blocks 0 to 3 of a shard)."""
    store = open_store(site.url("s.zarr"))
    for plane, sample in ((0, 0), (1, 700), (0, 1555), (1, 2999)):
        record, intact = read_record(site.url("s.zarr"), plane, sample)
        expected = store.read(plane, [sample])
        assert intact
        for field in ("values", "indices", "tail_lse", "seed"):
            np.testing.assert_array_equal(record[field], getattr(expected, field)[0])


# ---- a server that goes away -----------------------------------------------------------------------------


@pytest.mark.parametrize("gone_from", ["/commits/", "zarr.json", "/c/"], ids=["markers", "metadata", "shard data"])
@pytest.mark.parametrize("command", ["info", "verify"])
def test_a_server_gone_mid_read_is_one_line_never_missing_or_damaged(site, gone_from, command, capsys):
    """From the first request for a marker, an array's metadata or a shard's data on, the server closes every
    connection unanswered: one line naming the URL, exit 2."""
    site.gone_from = gone_from
    url = site.url("s.zarr")
    err = one_line(*run(capsys, command, url))
    assert err.startswith(f"distill-store {command}: error: {url}: ") and site.gone
    assert not re.search("missing|damaged|not committed|not a logit store", err), err


def test_a_server_shut_down_between_two_reads(folder):
    site = Site(folder)
    store = open_store(site.url("s.zarr"))
    store.read(0, [5])
    site.close()
    for call in (lambda: store.read(1, [5]), store.verify, store.info):
        with pytest.raises(StoreAccessError, match=f"^{re.escape(site.url('s.zarr'))}: "):
            call()


# ---- credentials in the URL ------------------------------------------------------------------------------


def test_credentials_in_the_url_are_used_and_never_printed(site, capsys):
    """user:password@ in the URL (percent-encoded) is sent to the server, and shown nowhere as given."""
    site.require(USER, PASSWORD)
    secret = f"{USER}:{quote(PASSWORD, safe='')}@"
    url, shown = site.url("s.zarr", secret), site.url("s.zarr", "***@")
    code, out, err = run(capsys, "info", url)
    assert code == 0 and f"store        {shown}" in out and err == ""
    assert run(capsys, "verify", url)[0] == 0
    refused = one_line(*run(capsys, "info", site.url("s.zarr")))  # no password: the server's 401, named
    assert "401" in refused
    missing = one_line(*run(capsys, "info", site.url("none.zarr", secret)))
    assert f"{site.url('none.zarr', '***@')} is not a logit store" in missing
    site.gone_from = "/c/"
    gone = one_line(*run(capsys, "verify", url))
    raw = one_line(*run(capsys, "info", site.url("s.zarr", f"{USER}:{PASSWORD}@")))  # '/' not encoded
    assert f"{shown}: not a valid URL" in raw
    for text in (out, refused, missing, gone, raw):
        assert "pa55" not in text


# ---- training from a store served over HTTP -------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory) -> dict[str, Path]:
    """A store saved from a random tiny teacher on a few digits (1 epoch), beside the digits."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("http-train")
    data = small_digits(root, per_class_train=8, per_class_val=2)
    torch.manual_seed(0)
    weights = root / "teacher.safetensors"
    save_file(timm.create_model("test_convnext", num_classes=10).state_dict(), str(weights))
    served = root / "served"
    args = ["--teacher", "timm:test_convnext", "--checkpoint", str(weights), "--data", data["train"], "--out",
            str(served / "t.zarr"), "--epochs", "1", "--k", "3", "--aug", "basic", "--img-size", "32"]  # fmt: skip
    assert save_main(args) == 0
    return {"root": root, "served": served, **{k: Path(v) for k, v in data.items()}}


def train(digits_store: dict[str, Path], source: str, name: str) -> str:
    """sha256 of the final weights (every tensor, by name) of a 1-epoch tinyvit student taught by `source`. (Not
    of the file: its metadata names the teacher's source.)"""
    data = {k: str(v) for k, v in digits_store.items()}
    out = digits_store["root"] / name
    recipe = base_recipe(data, out, method="tinyvit", teacher={"source": f"store:{source}"}, batch_size=16, epochs=1)
    assert train_main([str(write_recipe(digits_store["root"] / f"{name}.yaml", recipe))]) == 0
    digest = hashlib.sha256()
    for key, tensor in sorted(load_file(out / "model.safetensors").items()):
        digest.update(key.encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


def test_a_student_trained_from_the_url_is_the_one_trained_from_the_folder(digits_store):
    before = snapshot(digits_store["served"])
    with serving(digits_store["served"]) as site:
        remote = train(digits_store, site.url("t.zarr"), "from-url")
    assert [path for path in site.requests if path.endswith("/")] == []
    assert remote == train(digits_store, str(digits_store["served"] / "t.zarr"), "from-folder")
    assert snapshot(digits_store["served"]) == before


def test_training_from_a_store_still_being_written_names_the_missing_epoch(digits_store, tmp_path, capsys):
    partial = tmp_path / "served" / "t.zarr"
    shutil.copytree(digits_store["served"] / "t.zarr", partial)
    (partial / "commits" / "e00000-s000000.json").unlink()
    data = {k: str(v) for k, v in digits_store.items()}
    with serving(tmp_path / "served") as site:
        url = site.url("t.zarr")
        recipe = base_recipe(data, tmp_path / "run", method="tinyvit", teacher={"source": f"store:{url}"}, epochs=1)
        code = train_main([str(write_recipe(tmp_path / "r.yaml", recipe))])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"teacher.source store:{url}: epoch 0 is incomplete (1 of" in err


def test_training_from_a_server_gone_mid_run_is_one_line_naming_the_url(digits_store, tmp_path, capsys):
    """The run starts (manifest, markers and pin read), then the server goes away at the first shard it reads."""
    data = {k: str(v) for k, v in digits_store.items()}
    with serving(digits_store["served"]) as site:
        site.gone_from = "/c/"
        url = site.url("t.zarr", f"{USER}:{quote(PASSWORD, safe='')}@")
        recipe = base_recipe(data, tmp_path / "run", method="tinyvit", teacher={"source": f"store:{url}"}, epochs=1)
        code = train_main([str(write_recipe(tmp_path / "r.yaml", recipe))])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1 and site.gone, err
    assert site.url("t.zarr", "***@") in err[0] and "Server disconnected" in err[0] and "pa55" not in err[0]
    assert not re.search("missing|damaged|not committed", err[0]), err
