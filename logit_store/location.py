"""Where a store lives: a local directory or an fsspec URL, with credentials kept out of sight."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import fsspec
from fsspec.asyn import sync

from .errors import DistillError, StoreAccessError, StoreError, disk_full_named

# user@ or user:password@, the password up to the first @ even where it holds a '/' (as secret keys do).
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/@:\s]*:[^@\s]*?|[^/@\s]*)@")


def redact(url: str) -> str:
    """The URL with any user:password@ part and query string removed, for messages and manifests."""
    return _CREDENTIALS.sub(r"\g<scheme>***@", str(url)).split("?", 1)[0]


# Protocols whose file system takes credentials as `key` and `secret` options: there they may be given in
# the URL, s3://KEY:SECRET@bucket/path (percent-encoded, or raw where the secret holds no '@'), which s3fs
# itself does not read.
_KEY_SECRET_PROTOCOLS = ("s3", "s3a")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?P<user>[^/@:\s]*)(?::(?P<password>[^@\s]*?))?@")
_EXTRAS = {"s3": "s3", "s3a": "s3"}  # protocol -> this toolkit's extra that installs its package
# Where the errors of object stores' clients come from when they are not OSError (s3fs turns the service's
# answers into OSError, not a failed connection or missing credentials).
_CLIENT_PACKAGES = {"botocore", "aiobotocore", "aiohttp", "google", "gcsfs", "azure", "adlfs"}


# Protocols served by plain web servers: read by name only (they cannot be listed) and never written.
WEB_PROTOCOLS = ("http", "https")
# Requests in flight at once when many files are fetched by name (`StoreLocation.read_files`).
CONCURRENT_REQUESTS = 64


_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted (`redact`): for any message or file that may quote a location."""
    return _URL.sub(lambda match: redact(match.group(0)), text)


def write_file(path: str, data: bytes) -> None:
    """Write a new file and make it durable (one place, so tests can make the disk full here)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class StoreLocation:
    """A root directory reached through fsspec (local paths use the local filesystem).

    `web`: an http(s):// location (a static file server, a bucket's public URL, a hub's file URLs). It is read
    by name only: nothing a reader needs comes from listing a folder (no web server has to answer one), and
    nothing is ever written there."""

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        url = os.fspath(url)
        self.url = url
        self.storage_options = storage_options or {}
        self.is_local = "://" not in url or url.startswith("file://")
        self.web = url.split("://", 1)[0].lower() in WEB_PROTOCOLS
        if self.is_local:
            self.root = os.path.abspath(url.removeprefix("file://"))
            self.fs = fsspec.filesystem("file")
        else:
            if self.web:
                _check_web_url(url)
            target, options = _split_credentials(url, self.storage_options)
            s3 = target.split("://", 1)[0].lower() in _KEY_SECRET_PROTOCOLS
            if s3:
                _check_s3_endpoint(url, options)
                options = _with_timeouts(options)
            elif self.web:
                options = _with_web_timeouts(options)
            try:
                self.fs, self.root = fsspec.core.url_to_fs(target, **options)
            except ImportError as err:  # fsspec names the package its protocol needs: "Install s3fs to access S3"
                raise StoreError(_missing_package(url, err)) from None
            except ValueError as err:  # an unknown protocol
                raise StoreError(f"{redact(url)}: {err}") from None
            if s3:  # an attribute, not an option, of s3fs (zarr's asynchronous copy takes it over: zarr_backend)
                self.fs.retries = S3_TRIES

    def __str__(self) -> str:
        return redact(self.url)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        self._forget_listings()
        with self.reaching():
            return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        with self.reaching():
            return self.fs.cat_file(self.path(*parts))

    def read_files(self, keys: Sequence[tuple[str, ...]]) -> list[bytes | OSError | None]:
        """The files at `keys` (each the parts of a path under the root), asked for together: concurrently on
        an asynchronous file system (HTTP, S3), one by one on another. None for a file that does not exist (a
        404); a local file that cannot be read is its OSError; a remote location out of reach raises
        StoreAccessError (so an unreachable server never reads as absent files)."""
        out: list[bytes | OSError | None] = []
        for result in self._each("cat_file", [self.path(*key) for key in keys]):
            if isinstance(result, FileNotFoundError):
                out.append(None)
            elif isinstance(result, OSError) and self.is_local:
                out.append(result)
            elif isinstance(result, Exception):
                with self.reaching():
                    raise result
            else:
                out.append(result)
        return out

    def sizes(self, keys: Sequence[tuple[str, ...]]) -> list[int]:
        """Sizes in bytes of the files at `keys`, asked for together as `read_files` asks; 0 for an absent one."""
        out = []
        for result in self._each("size", [self.path(*key) for key in keys]):
            if isinstance(result, Exception) and not isinstance(result, FileNotFoundError):
                with self.reaching():
                    raise result
            out.append(result if isinstance(result, int) else 0)
        return out

    def _each(self, method: str, paths: list[str]) -> list[Any]:
        """`fs.<method>(path)` for every path: its result, or the exception it raised."""
        if not self.fs.async_impl:
            return [_result_of(getattr(self.fs, method), path) for path in paths]
        call = getattr(self.fs, f"_{method}")
        return sync(self.fs.loop, _gather, [lambda path=path: call(path) for path in paths])

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole file; locally through a rename, so a reader never sees half of it."""
        target = self.path(*parts)
        if not self.is_local:
            with self.reaching():
                self.fs.pipe_file(target, data)
            return
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        try:
            with disk_full_named(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                write_file(tmp, data)
                os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)  # no temporary file outlives a failed write
            except OSError as err:  # none there; a read-only mount says EROFS even then: the write's error tells
                if not isinstance(err, FileNotFoundError) and err.errno != errno.EROFS:
                    raise
            raise
        dir_fd = os.open(os.path.dirname(target), os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def list_files(self, *parts: str) -> list[str]:
        base = self.path(*parts)
        self._forget_listings()
        with self.reaching():
            return sorted(self.fs.find(base)) if self.fs.exists(base) else []

    def bytes_used(self) -> int:
        self._forget_listings()
        with self.reaching():
            return int(sum(self.fs.du(self.root, total=False).values()))

    @contextmanager
    def reaching(self, absent_is_error: bool = False) -> Iterator[None]:
        """An object store that cannot be reached, that refuses the credentials or lacks the bucket is the
        location's fault: one line naming it. (FileNotFoundError passes unless `absent_is_error`: callers
        read it as absent. Local errors pass.)"""
        try:
            yield
        except DistillError:  # named already (an inner `reaching`'s StoreAccessError is an OSError too)
            raise
        except Exception as err:
            remote = isinstance(err, OSError) or type(err).__module__.split(".")[0] in _CLIENT_PACKAGES
            if self.is_local or not remote or (isinstance(err, FileNotFoundError) and not absent_is_error):
                raise
            detail = " ".join(str(err).split()) or type(err).__name__
            if isinstance(err, PermissionError):  # s3fs: 403, a refused key (botocore says only "Forbidden")
                detail = f"access denied, check the credentials ({detail})"
            elif "Timeout" in type(err).__name__ and (self.web or "s3" in tuple(self.fs.protocol)):  # name the limit
                detail = f"{detail} (no answer within {remote_timeout():g} s; {TIMEOUT_ENV} sets the limit)"
            raise StoreAccessError(f"{self}: {redact_text(detail)}") from None

    def _forget_listings(self) -> None:
        """Drop the listings an object store's file system caches (s3fs keeps them for good): other
        processes write beside this one, and a commit must be seen as soon as its marker is down."""
        if not self.is_local:
            self.fs.invalidate_cache()


def _result_of(call: Any, path: str) -> Any:
    try:
        return call(path)
    except Exception as err:
        return err


async def _gather(calls: list[Any]) -> list[Any]:
    """Await every call, at most CONCURRENT_REQUESTS at a time: its result, or the exception it raised."""
    limit = asyncio.Semaphore(CONCURRENT_REQUESTS)

    async def one(call: Any) -> Any:
        async with limit:
            try:
                return await call()
            except Exception as err:
                return err

    return await asyncio.gather(*(one(call) for call in calls))


def _check_web_url(url: str) -> None:
    """An http(s) URL whose host and port parse (a password holding '/' would put them in its path)."""
    try:
        parts = urlsplit(url)
        valid = parts.hostname is not None and (parts.port or 0) >= 0
    except ValueError:
        valid = False
    if not valid:
        raise StoreError(
            f"{redact(url)}: not a valid URL (its host and port do not parse); in a user name or password, "
            "percent-encode '/' as %2F, '@' as %40 and ':' as %3A"
        )


def _split_credentials(url: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The URL without s3://KEY:SECRET@, and the options with them as `key` and `secret`; other
    URLs as they are (fsspec reads user:password@ itself where a protocol has them, e.g. ftp)."""
    match = _USERINFO.match(url)
    if match is None or match.group("scheme").lower() not in _KEY_SECRET_PROTOCOLS:
        return url, options
    found = {"key": unquote(match.group("user")), "secret": unquote(match.group("password") or "")}
    return f"{match.group('scheme')}://{url[match.end() :]}", {**options, **{k: v for k, v in found.items() if v}}


# An endpoint that accepts a connection and never answers would hang a run for s3fs's 5 tries x botocore's
# 5 attempts x 15 s (aiohttp, for http(s): 300 s a request): here a request fails after TIMEOUT seconds
# without a byte, tried S3_ATTEMPTS times by botocore (its standard mode: backoff, throttling retried) and once
# by s3fs, so a frozen endpoint is a StoreAccessError within about S3_ATTEMPTS x TIMEOUT (+ backoff); a web
# server's, within TIMEOUT. Storage options given override them.
TIMEOUT_ENV = "LOGIT_STORE_TIMEOUT"
DEFAULT_TIMEOUT = 20.0
S3_ATTEMPTS = 3
S3_TRIES = 1  # s3fs's own tries around botocore's attempts (its default, 5, multiplies them)


def positive_env(name: str, parse: type[int] | type[float], default: int | float, expected: str) -> int | float:
    """The environment variable `name` read by `parse`, finite and > 0; `default` when unset; another value is
    one StoreError naming the variable and `expected`."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = 0
    if not 0 < value < float("inf"):
        raise StoreError(f"{name}={raw!r}: expected {expected} (unset, {default:g})")
    return value


def remote_timeout() -> float:
    """Seconds a request to an S3 or web store may wait to connect, or for the next bytes: LOGIT_STORE_TIMEOUT,
    else 20."""
    return positive_env(TIMEOUT_ENV, float, DEFAULT_TIMEOUT, "a number of seconds > 0")


def _with_timeouts(options: dict[str, Any]) -> dict[str, Any]:
    """s3fs options with this toolkit's timeouts and attempts under the ones given (in the options, or in
    fsspec's configuration, which s3fs would otherwise apply and these would hide)."""
    timeout, conf = remote_timeout(), fsspec.config.conf.get("s3", {})
    attempts = {"max_attempts": S3_ATTEMPTS, "mode": "standard"}
    config = {"connect_timeout": timeout, "read_timeout": timeout, "retries": attempts}
    for given in (conf, options):
        config |= given.get("config_kwargs") or {}
    return {**options, "config_kwargs": config}


def _with_web_timeouts(options: dict[str, Any]) -> dict[str, Any]:
    """HTTP options whose aiohttp session gives up after `remote_timeout()` s to connect or between bytes, unless
    the options give a client timeout of their own."""
    import aiohttp  # fsspec's http needs it: imported with it, on first use

    client = dict(options.get("client_kwargs") or {})
    timeout = remote_timeout()
    client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout))
    return {**options, "client_kwargs": client}


_ENDPOINT_SOURCES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # botocore's, after the options and fsspec's


def _check_s3_endpoint(url: str, options: dict[str, Any]) -> None:
    """An S3 endpoint that is not an http(s) URL is one line naming where it was set (botocore would raise
    a bare ValueError at the first request)."""
    conf = fsspec.config.conf.get("s3", {})
    sources = [
        ("storage option endpoint_url", options.get("endpoint_url")),
        ("storage option client_kwargs.endpoint_url", (options.get("client_kwargs") or {}).get("endpoint_url")),
        ("FSSPEC_S3_ENDPOINT_URL" if "FSSPEC_S3_ENDPOINT_URL" in os.environ else "fsspec's s3 endpoint_url",
         conf.get("endpoint_url")),
        *((name, os.environ.get(name)) for name in _ENDPOINT_SOURCES),
    ]  # fmt: skip
    name, endpoint = next(((n, e) for n, e in sources if e), (None, None))
    if endpoint is None:
        return
    parts = urlsplit(str(endpoint))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StoreError(
            f"{redact(url)}: {name}={redact(str(endpoint))!r}: expected the S3 endpoint as an http:// or https:// "
            "URL (such as http://127.0.0.1:9000)"
        )


def _missing_package(url: str, err: ImportError) -> str:
    """One line naming what to install for the URL's protocol."""
    protocol = url.split("://", 1)[0].lower()
    extra = _EXTRAS.get(protocol)
    how = f"this toolkit's `{extra}` extra installs it: uv sync --extra {extra}, or pip install 'distill-toolkit[{extra}]'"
    reason = " ".join(str(err).split()) or "its package is not installed"
    return f"{redact(url)}: the {protocol}:// protocol needs a package that is not installed: {reason}" + (
        f" ({how})" if extra else ""
    )
