"""Shards behind URLs (``https://``, ``s3://``, ``gs://``: any protocol fsspec knows), read as streams that retry
with exponential backoff and resume where they stopped.

A shard is read a member at a time, as a local one is (bounded memory: nothing is downloaded whole). A
connection error or a 5xx answer re-opens the shard at the byte already reached: with an HTTP ``Range`` request
(a server that ignores it sends the whole file again, and the bytes already delivered are skipped), or a seek
on filesystems that seek (s3, gcs). No sample is ever delivered twice or skipped. A shard that still fails after
``retries`` re-opens, or fails for good (404, 403), ends with ``UnitError("unreachable_shard")`` after the
samples read before the failure; the training stream counts it as a broken shard, or stops the run
(``data.shard_failure``).
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from clipforge.data.raw import DataError, RawSample, UnitError
from clipforge.data.shards import MANIFEST_NAME, Manifest, iter_shard_stream

log = logging.getLogger("clipforge.data")

UNREACHABLE_SHARD = "unreachable_shard"
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# The package that gives fsspec each protocol (fsspec names them too, but not as a pip command).
_PACKAGES = {
    "http": "aiohttp",
    "https": "aiohttp",
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
}
_PACKAGES |= {"az": "adlfs", "abfs": "adlfs", "hf": "huggingface_hub"}
_BLOCK = 4 * 2**20  # bytes per request on seekable filesystems (s3, gcs)
_SKIP_CHUNK = 1 << 20
_MAX_MANIFEST_BYTES = 256 * 2**20
_NOT_FOUND = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_wait = time.sleep  # looked up at each retry (tests replace it)
_NETWORK_MODULES = ("aiohttp", "botocore", "aiobotocore", "google", "requests", "urllib3", "fsspec", "s3fs")


def is_url(spec: object) -> bool:
    """Whether ``spec`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(spec, str) and _URL.match(spec) is not None


def url_name(url: str) -> str:
    """The last part of a URL's path (``https://h/d/shard-000001.tar?sig=x`` -> ``shard-000001.tar``)."""
    return urlsplit(url).path.rstrip("/").rpartition("/")[2] or url


@dataclass(frozen=True)
class RemoteOptions:
    """How hard a remote shard is tried: ``retries`` re-opens after a failure, waiting ``backoff_s`` x 2^k."""

    retries: int = 3
    backoff_s: float = 1.0
    storage_options: Mapping[str, Any] = field(default_factory=dict)  # passed to fsspec (credentials, ...)


def filesystem(url: str, options: RemoteOptions | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path) for ``url``; :class:`DataError` naming the pip package when it is missing."""
    protocol = url.split("://", 1)[0].lower()
    package = _PACKAGES.get(protocol, f"the fsspec implementation for {protocol}://")
    fix = f"pip install {package}" if protocol in _PACKAGES else f"install {package}"
    try:
        import fsspec
    except ImportError:
        raise DataError(f"{url}: reading URLs needs fsspec: pip install 'clipforge[remote]'") from None
    try:
        return fsspec.core.url_to_fs(url, **dict(options.storage_options if options else {}))
    except ImportError as exc:
        extra = " (or pip install 'clipforge[remote]')" if package == "aiohttp" else ""
        raise DataError(
            f"{url}: reading {protocol}:// URLs needs the {package} package, which is not installed: "
            f"{fix}{extra} ({exc})"
        ) from exc
    except ValueError as exc:
        raise DataError(f"{url}: fsspec cannot read {protocol}:// URLs ({exc}); {fix}") from exc


class RemoteShardError(Exception):
    """A remote read failed for good. Not an ``OSError``, so the tar reader never takes it for shard damage."""

    def __init__(self, url: str, what: str, attempts: int, not_found: bool) -> None:
        super().__init__(f"{url}: {what}")
        self.url, self.what, self.attempts, self.not_found = url, what, attempts, not_found


def describe_failure(error: BaseException) -> tuple[bool, bool, str]:
    """(worth retrying, not found, what happened) for an error from a filesystem; re-raises errors that are not
    I/O (a bug is not a network failure)."""
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and len(chain) < 8:
        chain.append(link)
        link = link.__cause__ or link.__context__
    for link in chain:
        status = getattr(link, "status", None)
        if isinstance(status, int) and 100 <= status < 600:
            reason = getattr(link, "message", "") or ""
            what = f"HTTP {status}" + (f" {reason}" if reason else "")
            return status >= 500 or status in (408, 429), status == 404, what
    network = [e for e in chain if isinstance(e, (OSError, TimeoutError)) or _from_network_library(e)]
    if not network:
        raise error
    what = f"{type(error).__name__}: {error}".rstrip(": ")
    if isinstance(error, _NOT_FOUND):
        connection = any(
            isinstance(e, (ConnectionError, TimeoutError)) or _from_network_library(e) for e in chain[1:]
        )
        if not connection:
            return False, isinstance(error, FileNotFoundError), what
    return True, False, what


def _from_network_library(error: BaseException) -> bool:
    return type(error).__module__.split(".")[0] in _NETWORK_MODULES


class RetryingStream(io.RawIOBase):
    """A remote file read front to back; each failure re-opens it at the byte reached, after a backoff.
    ``failures`` counts failures since the last byte arrived (so the backoff starts again once the shard makes
    progress); more than ``retries`` raise :class:`RemoteShardError`."""

    def __init__(self, url: str, options: RemoteOptions) -> None:
        super().__init__()
        self.url = url
        self.options = options
        self.fs, self.path = filesystem(url, options)
        self.streaming = url.split("://", 1)[0].lower() in ("http", "https")
        self.position = 0
        self.failures = 0
        self.attempts = 0
        self._file: Any = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            try:
                if self._file is None:
                    self.attempts += 1
                    self._file = self._open_at(self.position)
                data = self._file.read(len(view))
            except Exception as error:
                self._failed(error)
                continue
            view[: len(data)] = data
            self.position += len(data)
            if data:
                self.failures = 0
            return len(data)

    def close(self) -> None:
        self._close_file()
        super().close()

    def _open_at(self, position: int) -> Any:
        if not self.streaming:
            file = self.fs.open(self.path, "rb", block_size=_BLOCK)
            if position:
                file.seek(position)
            return file
        headers = {"Range": f"bytes={position}-"} if position else {}
        file = self.fs.open(self.path, "rb", block_size=0, headers=headers)
        response = getattr(file, "r", None)  # fsspec's streaming HTTP file keeps the aiohttp response here
        resumed = getattr(response, "status", 200) == 206
        if position and resumed:
            start = (
                getattr(response, "headers", {}).get("Content-Range", "").partition(" ")[2].partition("-")[0]
            )
            resumed = start == str(position)
            if not resumed:
                file.close()
                file = self.fs.open(self.path, "rb", block_size=0)
        if position and not resumed:  # the server sent the file from its start: skip what was delivered
            log.info("%s: the server does not resume at a byte; re-reading %d bytes", self.url, position)
            remaining = position
            while remaining:
                chunk = file.read(min(remaining, _SKIP_CHUNK))
                if not chunk:
                    raise ConnectionError(f"the file is shorter than the {position} bytes already read")
                remaining -= len(chunk)
        return file

    def _failed(self, error: Exception) -> None:
        retry, not_found, what = describe_failure(error)
        self._close_file()
        self.failures += 1
        if not retry or self.failures > self.options.retries:
            raise RemoteShardError(self.url, what, self.attempts, not_found) from error
        delay = self.options.backoff_s * 2 ** (self.failures - 1)
        log.warning("%s: %s at byte %d; retry %d of %d in %.2g s", self.url, what, self.position,
                    self.failures, self.options.retries, delay)  # fmt: skip
        _wait(delay)

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except Exception:
                log.debug("%s: closing the broken connection failed", self.url, exc_info=True)


def iter_remote_shard(url: str, *, label: str, options: RemoteOptions) -> Iterator[RawSample | UnitError]:
    """:func:`~clipforge.data.shards.iter_shard` for a URL: the shard's samples, streamed; a shard that cannot be
    read after the retries ends with ``UnitError("unreachable_shard")`` after the samples read before it."""
    stream = RetryingStream(url, options)
    delivered = 0
    try:
        with io.BufferedReader(stream, buffer_size=1 << 20) as file:
            for item in iter_shard_stream(file, url, label):
                delivered += isinstance(item, RawSample)
                yield item
    except RemoteShardError as error:
        yield UnitError(url, UNREACHABLE_SHARD, unreachable_message(error, delivered), delivered)


def unreachable_message(error: RemoteShardError, delivered: int) -> str:
    if error.not_found:
        fix = "check the URL (and a brace pattern's range)"
    else:
        fix = "check the URL, the network and your credentials, or raise data.remote_retries / data.remote_backoff_s"
    read = f"; the {delivered} samples before the failure were read" if delivered else ""
    return (
        f"{error.url}: shard unreachable after {error.attempts} attempt(s) ({error.what}){read}; {fix}. "
        "data.shard_failure=skip (the default) skips and counts such shards, fail stops the run"
    )


def read_remote_bytes(url: str, options: RemoteOptions, limit: int = _MAX_MANIFEST_BYTES) -> bytes | None:
    """A small remote file's bytes (with the retries), or None when it does not exist."""
    try:
        with RetryingStream(url, options) as stream:
            data = io.BufferedReader(stream).read(limit + 1)
    except RemoteShardError as error:
        if error.not_found:
            return None
        raise DataError(
            f"{error.url}: cannot read it ({error.what}); check the URL and the network"
        ) from error
    if len(data) > limit:
        raise DataError(f"{url}: larger than {limit:,} bytes; is it a clipforge manifest.json?")
    return data


@dataclass(frozen=True)
class RemoteShards:
    """What a remote spec names: shard URLs, their sample counts when a manifest gives them, notes for logs."""

    urls: list[str]
    counts: list[int] | None
    notes: list[str]


def open_remote_shards(
    urls: list[str], spec: str, options: RemoteOptions, use_manifest: bool = True
) -> RemoteShards:
    """The shards a URL spec names: ``urls`` (the spec, brace-expanded). A URL ending in ``manifest.json``, or a
    folder URL (no shard suffix), reads that manifest's shard list; shard URLs take their counts from a
    ``manifest.json`` beside them when there is one that lists them all (else sizes are unknown)."""
    for url in urls:
        filesystem(url, options)  # a missing package fails now, naming it, not in a loader worker
    first = urls[0]
    if len(urls) == 1 and not url_name(first).lower().endswith((".tar", ".tar.gz", ".tgz")):
        manifest_url = first if url_name(first) == MANIFEST_NAME else first.rstrip("/") + "/" + MANIFEST_NAME
        data = read_remote_bytes(manifest_url, options)
        if data is None:
            raise DataError(
                f"{spec!r}: no {MANIFEST_NAME} at {manifest_url}, and a remote folder cannot be listed; name the "
                "shards with a brace pattern (https://host/data/shard-{000000..000099}.tar), or put the "
                f"{MANIFEST_NAME} that `clipforge data shards` writes beside them"
            )
        manifest = _parse(data, manifest_url)
        base = manifest_url.rpartition("/")[0]
        listed = [f"{base}/{s.name}" for s in manifest.shards]
        return RemoteShards(
            listed, [s.num_samples for s in manifest.shards], _dropped_notes(manifest, manifest_url)
        )
    bases = {url.rpartition("/")[0] for url in urls}
    if not use_manifest or len(bases) != 1 or "?" in first:
        return RemoteShards(list(urls), None, [])
    manifest_url = f"{bases.pop()}/{MANIFEST_NAME}"
    data = read_remote_bytes(manifest_url, options)
    if data is None:
        return RemoteShards(list(urls), None, [])
    manifest = _parse(data, manifest_url)
    counts = {s.name: s.num_samples for s in manifest.shards}
    names = [url_name(url) for url in urls]
    if not all(name in counts for name in names):
        note = f"{manifest_url} does not list every shard of {spec!r}; their sizes are unknown"
        return RemoteShards(list(urls), None, [note])
    return RemoteShards(list(urls), [counts[n] for n in names], _dropped_notes(manifest, manifest_url))


def _parse(data: bytes, url: str) -> Manifest:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{url}: not a readable clipforge shard manifest (not UTF-8); pass use_manifest=False"
        ) from exc
    return Manifest.loads(text, url)


def _dropped_notes(manifest: Manifest, url: str) -> list[str]:
    return [f"{url}: {n} inputs were dropped when writing ({r})" for r, n in manifest.dropped.items()]
