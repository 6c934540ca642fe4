"""Stores on object storage: fsspec file systems that are not async (memory://), a protocol whose package is
missing, and a real S3 API (moto's server, on 127.0.0.1, reached through s3fs by this process and by
writer, reader and CLI subprocesses): disjoint writers, a killed writer resumed, convert both ways, and
credentials that never reach a file or an output.

Every content hash is compared with the same store written locally."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from store_helpers import EPOCHS, manifest, records_for, write_epoch

from logit_store import StoreAccessError, StoreError, create_store, open_store
from logit_store.cli import main as store_cli
from logit_store.location import StoreLocation, redact_text
from logit_store.writer import FAULT_COMMIT

HELPER = str(Path(__file__).with_name("store_helpers.py"))
KEY, SECRET = "AKIDTESTKEY4S3", "s3cret/with+chars"  # a '/' and a '+', as real secrets have: percent-encoded in URLs
FORMS = (KEY, SECRET, quote(SECRET, safe=""))  # no form of them may appear anywhere


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    """The same store written locally (zarr), uninterrupted."""
    path = tmp_path_factory.mktemp("reference") / "s"
    ref = create_store(path, manifest())
    for epoch in range(EPOCHS):
        write_epoch(ref, epoch)
    return path


@pytest.fixture(scope="module")
def reference(local_store):
    """Content hashes of the same store written locally, uninterrupted."""
    return open_store(local_store).info()["content_hashes"]


# ---- file systems that are not async ---------------------------------------------------------------


def test_memory_store_is_created_written_read_and_verified(reference, capsys):
    url = "memory://test-memory-store/x.zarr"
    store = create_store(url, manifest())
    for epoch in range(EPOCHS):
        write_epoch(store, epoch)
    again = open_store(url)
    ids = np.array([2999, 0, 1500, 7])
    expected = records_for(again.manifest, 1, ids)
    got = again.read(1, ids)
    for field in ("values", "indices", "tail_lse", "seed"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))
    assert again.verify() == []
    assert again.info()["content_hashes"] == reference
    assert store_cli(["verify", url]) == 0
    assert "OK: 2 epochs x 3000 records intact" in capsys.readouterr().out


@pytest.mark.parametrize(
    "failing", ["/commits/", "/c/", "/zarr.json"], ids=["commit markers", "shard data", "array metadata"]
)
def test_an_object_store_out_of_reach_is_never_damage_to_verify_or_repair(failing, monkeypatch):
    """Reads that fail on the way (an OSError, as s3fs makes of a 503) while listings succeed: verify and
    repair raise StoreAccessError naming the store; neither reports damage, and repair drops no commit."""
    url = f"memory://test-out-of-reach-{len(failing)}/x.zarr"
    write_epoch(create_store(url, manifest()), 0)
    cls = type(StoreLocation(url).fs)
    read = cls.cat_file

    def flaky(self, path, *args, **kwargs):
        if failing in path:
            raise OSError("SlowDown: please reduce your request rate")
        return read(self, path, *args, **kwargs)

    monkeypatch.setattr(cls, "cat_file", flaky)
    store = open_store(url)  # (zarr's wrapper of a synchronous file system binds its methods when built)
    for call in (store.verify, store.repair):
        with pytest.raises(StoreAccessError, match=f"^{url}: SlowDown"):
            call()
    monkeypatch.undo()
    store = open_store(url)
    assert store.committed_shards(0) == set(range(store.manifest.num_shards))
    assert [p for p in store.verify() if p.epoch == 0] == []


# ---- a protocol whose package is missing ----------------------------------------------------------


def cli(*args: str, env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    """`distill-store ARGS` in a fresh process (`code` runs first: it may hide a package)."""
    prefix = f"{code}; " if code else ""
    program = f"import sys; {prefix}from logit_store.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", program, *args], capture_output=True, text=True, env=env or os.environ, timeout=120
    )


def test_a_missing_protocol_package_is_one_line_naming_it(tmp_path):
    import importlib.util

    assert importlib.util.find_spec("gcsfs") is None, "this test needs a protocol whose package is not installed"
    proc = cli("info", "gcs://bucket/x.zarr")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "gcs://bucket/x.zarr: the gcs:// protocol needs a package that is not installed" in proc.stderr
    assert "gcsfs" in proc.stderr
    local = create_store(tmp_path / "local", manifest())
    proc = cli("convert", str(tmp_path / "local"), "gcs://bucket/y.zarr")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "install gcsfs" in proc.stderr
    local.close()
    # s3:// without s3fs names the package and this toolkit's extra, and not the URL's credentials.
    hidden = "sys.modules['s3fs'] = None"  # as if s3fs were not installed: importing it fails
    proc = cli("verify", f"s3://{KEY}:{quote(SECRET, safe='')}@bucket/x.zarr", code=hidden)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "s3://***@bucket/x.zarr: the s3:// protocol needs a package that is not installed" in proc.stderr
    assert "s3fs" in proc.stderr and "uv sync --extra s3" in proc.stderr
    assert not any(form in proc.stderr for form in FORMS)
    with pytest.raises(StoreError, match=r"^memory2://x: Protocol not known: memory2$"):
        StoreLocation("memory2://x")


@pytest.mark.parametrize("secret", [quote(SECRET, safe=""), SECRET], ids=["percent-encoded", "raw"])
def test_credentials_in_an_s3_url_become_options(secret):
    url = f"s3://{KEY}:{secret}@bucket/dir/x.zarr"
    location = StoreLocation(url, {"endpoint_url": "http://127.0.0.1:1"})
    assert location.root == "bucket/dir/x.zarr"
    options = location.fs.storage_options  # (less the timeouts and attempts StoreLocation adds)
    assert {k: v for k, v in options.items() if k != "config_kwargs"} == {
        "endpoint_url": "http://127.0.0.1:1",
        "key": KEY,
        "secret": SECRET,
    }
    assert str(location) == "s3://***@bucket/dir/x.zarr"
    assert redact_text(f"cannot open '{url}': denied") == "cannot open 's3://***@bucket/dir/x.zarr': denied"
    assert StoreLocation("s3://bucket/x.zarr", {"anon": True}).fs.storage_options.get("anon") is True


# ---- a real S3 API: moto's server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1, a free port, for this module. Yields its endpoint, the s3fs options
    that reach it, and an environment that reaches it from a subprocess (AWS_* variables, read by botocore)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()  # returns once the server listens
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {"endpoint_url": endpoint, "key": "moto-key", "secret": "moto-secret"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    env |= {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        yield {"endpoint": endpoint, "options": options, "env": env}
    finally:
        server.stop()


@pytest.fixture
def bucket(s3, request):
    """A fresh bucket per test, named from the test."""
    import s3fs

    name = "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]
    s3fs.S3FileSystem(**s3["options"]).mkdir(name)
    return name


def keyed(s3: dict) -> dict:
    """The subprocess environment with moto's credentials in AWS_* variables."""
    return s3["env"] | {"AWS_ACCESS_KEY_ID": s3["options"]["key"], "AWS_SECRET_ACCESS_KEY": s3["options"]["secret"]}


def run_writer(url: str, env: dict, *args: str, fault: str | None = None) -> subprocess.Popen:
    """The script-mode writer of store_helpers; `fault` kills it at that commit (FAULT_COMMIT)."""
    env = env | ({FAULT_COMMIT: fault} if fault else {})
    return subprocess.Popen(
        [sys.executable, HELPER, url, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def finish(proc: subprocess.Popen, code: int = 0) -> str:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == code, err[-3000:]
    return out + err


def test_s3_two_writer_processes_then_a_reader_process(s3, bucket, reference):
    url = f"s3://{bucket}/x.zarr"
    store = create_store(url, manifest(), s3["options"])
    shards = range(store.manifest.num_shards)
    # No locks on object storage: each writer is given its own shards, interleaved so both write at once.
    procs = [run_writer(url, keyed(s3), "--shards", ",".join(str(s) for s in shards if s % 2 == r)) for r in (0, 1)]
    for proc in procs:
        finish(proc)
    reader = cli("info", url, "--json", env=keyed(s3))  # a reader in another process
    assert reader.returncode == 0, reader.stderr
    info = json.loads(reader.stdout)
    assert info["content_hashes"] == reference and info["location"] == url
    assert info["records"] == EPOCHS * 3000 and info["bytes_on_disk"] > 0
    assert cli("verify", url, env=keyed(s3)).stdout.startswith("OK: 2 epochs x 3000 records intact")
    # This process's store sees the other processes' commits (no stale listing).
    assert store.verify() == [] and store.committed_shards(1) == set(shards)
    ids = np.array([5, 2998, 1024])
    got, expected = store.read(0, ids), records_for(store.manifest, 0, ids)
    np.testing.assert_array_equal(got.values, expected.values)
    np.testing.assert_array_equal(got.indices, expected.indices)


@pytest.mark.parametrize("fault", ["after:3", "before:4"])
def test_s3_killed_writer_resumes_to_the_uninterrupted_content(s3, bucket, reference, fault):
    """Killed right after its 3rd commit, or with the 4th shard's objects written but not its marker."""
    url = f"s3://{bucket}/x.zarr"
    finish(run_writer(url, keyed(s3), fault=fault), code=-9)
    store = open_store(url, s3["options"])
    assert sum(len(store.committed_shards(e)) for e in range(EPOCHS)) == 3
    assert store.verify(), "an interrupted store is incomplete"
    finish(run_writer(url, keyed(s3)))
    store = open_store(url, s3["options"])
    assert store.verify() == []
    assert store.info()["content_hashes"] == reference


def test_refused_credentials_are_one_line(s3, bucket, local_store, monkeypatch):
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # from now on moto checks every request's key
    for url in (f"s3://{KEY}:{quote(SECRET, safe='')}@{bucket}/x.zarr", f"s3://{bucket}/x.zarr"):
        env = s3["env"] | ({} if "@" in url else {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET})
        for args in (["info", url], ["convert", str(local_store), url]):
            proc = cli(*args, env=env)
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
            assert f"{redact_text(url)}: " in proc.stderr
            assert "access denied, check the credentials" in proc.stderr, proc.stderr
            assert not any(form in proc.stdout + proc.stderr for form in FORMS), proc.stderr


def test_convert_to_s3_and_back(s3, bucket, local_store, reference, tmp_path):
    local = create_store(tmp_path / "local", manifest("lmdb"))
    for epoch in range(EPOCHS):
        write_epoch(local, epoch)
    local.close()
    url = f"s3://{bucket}/copy.zarr"
    to_s3 = cli("convert", str(tmp_path / "local"), url, env=keyed(s3))
    assert to_s3.returncode == 0, to_s3.stderr
    assert f"-> {url} (zarr)" in to_s3.stdout
    assert open_store(url, s3["options"]).info()["content_hashes"] == reference
    back = cli("convert", url, str(tmp_path / "back"), env=keyed(s3))
    assert back.returncode == 0, back.stderr
    assert open_store(tmp_path / "back").manifest.backend == "lmdb"
    assert open_store(tmp_path / "back").info()["content_hashes"] == reference
    again = cli("convert", url, str(tmp_path / "back"), env=keyed(s3))  # resumes: nothing left to copy
    assert again.returncode == 0, again.stderr
    # A local zarr store goes to a URL as zarr (lmdb is local only), byte for byte; asked for lmdb, one line.
    zarr_copy = cli("convert", str(local_store), f"s3://{bucket}/from-zarr.zarr", env=keyed(s3))
    assert zarr_copy.returncode == 0 and "(zarr)" in zarr_copy.stdout, zarr_copy.stderr
    assert open_store(f"s3://{bucket}/from-zarr.zarr", s3["options"]).info()["content_hashes"] == reference
    refused = cli("convert", str(local_store), f"s3://{bucket}/y", "--backend", "lmdb", env=keyed(s3))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert f"lmdb stores need a local path, got s3://{bucket}/y" in refused.stderr


def test_a_missing_bucket_or_an_unreachable_endpoint_is_one_line(s3, local_store):
    missing = cli("convert", str(local_store), "s3://no-such-bucket/x.zarr", env=keyed(s3))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert "s3://no-such-bucket/x.zarr: The specified bucket does not exist" in missing.stderr
    absent = cli("info", "s3://no-such-bucket/x.zarr", env=keyed(s3))
    assert absent.returncode == 2 and "s3://no-such-bucket/x.zarr is not a logit store" in absent.stderr
    closed = keyed(s3) | {"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}  # port 1: nothing listens
    url = f"s3://{KEY}:{quote(SECRET, safe='')}@bucket/x.zarr"
    unreachable = cli("verify", url, env=closed)
    assert unreachable.returncode == 2 and unreachable.stderr.count("\n") == 1
    assert 's3://***@bucket/x.zarr: Could not connect to the endpoint URL: "http://127.0.0.1:1/' in unreachable.stderr
    assert not any(form in unreachable.stderr for form in FORMS)


def test_a_connection_lost_mid_save_is_one_line_and_the_same_save_resumes(reference):
    """An endpoint that goes away amid a save's epoch 1: the write, and a read, are one error naming the store;
    what was committed stays committed, and once the endpoint is back the same writes finish the uninterrupted
    content. (A server of its own, stopped and started on the same port; moto keeps its buckets in this
    process.)"""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "moto-key", "secret": "moto-secret",
               "config_kwargs": {"retries": {"max_attempts": 1}}}  # fmt: skip
    s3fs.S3FileSystem(**options).mkdir("lost-connection")
    url = "s3://lost-connection/x.zarr"
    store = create_store(url, manifest(), options)
    write_epoch(store, 0)
    m, markers = store.manifest, store.commits(0)
    with pytest.raises(StoreAccessError) as lost, store.writer(1) as writer:
        for shard in range(m.num_shards):  # shard 0 is committed; then the endpoint goes, amid the writes
            ids = np.arange(*m.shard_range(shard))
            writer.write(ids, records_for(m, 1, ids), labels=ids % m.num_classes)
            if shard == 0:
                writer.flush()  # committed (on the writer's thread): now the endpoint goes
                server.stop()
    assert str(lost.value).startswith(f"{url}: ") and "\n" not in str(lost.value)
    assert f"http://{host}:{port}" in str(lost.value)  # the endpoint that could not be reached
    with pytest.raises(StoreAccessError, match=f"^{url}: Could not connect"):  # a reader (training) likewise
        store.read(0, np.array([5, 2998]))
    with pytest.raises(StoreAccessError, match=f"^{url}: Could not connect"):  # its data, the marker read before
        store.read_shard(0, 0, markers[(0, 0)])
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    try:
        again = open_store(url, options)
        assert again.committed_shards(0) == set(range(again.manifest.num_shards))
        assert again.committed_shards(1) == {0}
        write_epoch(again, 1)
        assert again.verify() == [] and again.info()["content_hashes"] == reference
    finally:
        server.stop()


def scan(s3: dict, bucket: str, *folders: Path) -> str:
    """Every byte in the bucket and the folders, decoded loosely."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3["options"])
    fs.invalidate_cache()
    objects = fs.find(bucket)
    assert objects, "the bucket holds the stores"
    text = "".join(fs.cat_file(path).decode("latin-1") for path in objects)
    files = [p for folder in folders for p in folder.rglob("*") if p.is_file()]
    return text + "".join(p.read_bytes().decode("latin-1") for p in files)


def test_credentials_are_never_written_or_printed(s3, bucket, reference, tmp_path):
    # In the URL: the endpoint from the environment, the key and secret from the URL only.
    url = f"s3://{KEY}:{quote(SECRET, safe='')}@{bucket}/in-url.zarr"
    outputs = finish(run_writer(url, s3["env"]))
    for args in (["info", url], ["info", url, "--json"], ["verify", url], ["convert", url, str(tmp_path / "copy")]):
        proc = cli(*args, env=s3["env"])
        assert proc.returncode == 0, proc.stderr
        outputs += proc.stdout + proc.stderr
    assert f"s3://***@{bucket}/in-url.zarr" in outputs
    missing = cli("info", f"s3://{KEY}:{quote(SECRET, safe='')}@{bucket}/none.zarr", env=s3["env"])
    assert missing.returncode == 2 and f"s3://***@{bucket}/none.zarr is not a logit store" in missing.stderr
    outputs += missing.stdout + missing.stderr
    assert open_store(tmp_path / "copy").info()["content_hashes"] == reference
    # In storage_options, in this process.
    options = s3["options"] | {"key": KEY, "secret": SECRET}
    store = create_store(f"s3://{bucket}/in-options.zarr", manifest(), options)
    for epoch in range(EPOCHS):
        write_epoch(store, epoch)
    store.refresh_statistics()
    assert store.info()["content_hashes"] == reference
    text = scan(s3, bucket, tmp_path)
    for form in FORMS:
        assert form not in text and form not in outputs, form


@pytest.mark.slow
def test_a_save_and_a_training_run_through_s3_write_no_credentials(s3, bucket, tmp_path):
    """distill-save-logits into s3://KEY:SECRET@..., then distill-train from it: the store equals the same
    save made locally, and neither the bucket, the run folder nor any output holds the credentials."""
    from train_helpers import base_recipe, run_cli, small_digits, write_recipe

    data = small_digits(tmp_path / "data")
    env = s3["env"] | {"DISTILL_CACHE": str(tmp_path / "data" / "cache"), "OMP_NUM_THREADS": "1"}
    url = f"s3://{KEY}:{quote(SECRET, safe='')}@{bucket}/teacher.zarr"
    save = ["--teacher", "timm:test_convnext", "--data", data["train"], "--epochs", "1", "--k", "3", "--aug", "basic",
            "--img-size", "32", "--batch-size", "32"]  # fmt: skip
    outputs = ""
    for out in (url, str(tmp_path / "local.zarr")):
        proc = run_cli("distill-save-logits", [*save, "--out", out], tmp_path, env_extra=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs += proc.stdout + proc.stderr
    local = open_store(tmp_path / "local.zarr").info()["content_hashes"]
    assert open_store(url, {"endpoint_url": s3["endpoint"]}).info()["content_hashes"] == local
    recipe = base_recipe(data, tmp_path / "run", method="tinyvit", epochs=1, teacher={"source": f"store:{url}"})
    proc = run_cli("distill-train", [str(write_recipe(tmp_path / "r.yaml", recipe))], tmp_path, env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outputs += proc.stdout + proc.stderr
    assert f"s3://***@{bucket}/teacher.zarr" in (tmp_path / "run" / "recipe.yaml").read_text()
    text = scan(s3, bucket, tmp_path / "run", tmp_path / "data" / "cache", tmp_path / "local.zarr")
    for form in FORMS:
        assert form not in text and form not in outputs, form
