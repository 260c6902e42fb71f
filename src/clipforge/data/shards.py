"""Webdataset-style tar shards: a damage-tolerant reader, an atomic size-bounded writer, and their manifest.

Reading follows webdataset: consecutive members sharing a key (the member path up to the first "." of its
base name) form one sample. A shard is complete only if it ends with the end-of-archive zero block (see
:func:`clipforge.data.raw.iter_tar_members`); otherwise every complete sample before the damage is yielded, then
one :class:`UnitError`. Gzip-compressed shards (``.tar.gz``) are read too.

Writing: each shard is written under a temporary name, fsynced and renamed, so a shard either exists complete
or not at all; members carry fixed metadata (mtime 0, uid 0, mode 644), so the same input gives byte-identical
shards and sha256s. ``write_shards`` (shards from any source) lives in :mod:`clipforge.data.sources`, which
builds on this module.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from clipforge.data.raw import (
    BAD_CAPTION_ENCODING,
    DUPLICATE_MEMBER,
    END_OF_ARCHIVE,
    IMAGE_EXTENSIONS,
    MISSING_CAPTION,
    MISSING_IMAGE,
    MISSING_SHARD,
    NON_CONTIGUOUS_SAMPLE,
    TRUNCATED_SHARD,
    UNREADABLE_SHARD,
    DataError,
    RawSample,
    TarDamage,
    TarMember,
    UnitError,
    iter_tar_members,
    tar_member_bytes,
)
from clipforge.files import AtomicFile, atomic_path, leftover_temporaries

DEFAULT_MAX_BYTES = 256 * 2**20
DEFAULT_MAX_SAMPLES = 10_000
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "clipforge.shards"

_CAPTION_FIELDS = ("captions", "caption", "text")  # .json fields read as captions, first present wins


# ----------------------------------------------------------------------------------------------------------------
# Reading


def split_member_name(name: str) -> tuple[str, str]:
    """Webdataset's (key, suffix): the key is the path up to the first "." of the base name; suffix lower-cased.

    ``"a/b/000012.de.txt"`` -> ``("a/b/000012", "de.txt")``; a name without a dot has the suffix ``""``.
    """
    directory, slash, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return directory + slash + stem, suffix.lower()


@dataclass
class _Group:
    key: str
    occurrence: int  # 1 for the first run of members with this key in the shard, 2+ for later runs
    members: list[tuple[str, TarMember]] = field(default_factory=list)


def iter_shard(path: str | Path, *, label: str | None = None) -> Iterator[RawSample | UnitError]:
    """The samples of one tar shard in stored order, then at most one :class:`UnitError` if it is damaged.

    Never raises for bad data: a missing or unreadable file yields ``UnitError("missing_shard" /
    "unreadable_shard")``; damage after the first valid header yields every complete sample before it, then
    ``UnitError("truncated_shard", samples_read=n)``. The sample in progress at the damage is not yielded (its
    members may be incomplete). Sample keys are ``f"{label}/{key}"``, ``label`` defaulting to the file name.

    Per sample: the first member (in stored order) with an image extension is the image, other images go to
    ``extra``; captions come from ``.txt`` (UTF-8; a leading BOM is dropped) and then the ``.json`` field
    ``captions`` (a list), else ``caption``, else ``text``; a json first caption equal to the ``.txt`` caption
    is not repeated. The other json fields go to ``extra`` by name; other members go to ``extra`` by suffix
    (``"cls"``, ``"de.txt"``), as ``str`` for suffixes ending in ``txt`` (bytes if not UTF-8), else as bytes
    (a member whose suffix clashes with a json field is stored as ``"member:<suffix>"``).
    An unparsable ``.json`` is kept as bytes in ``extra["json"]``; links and other non-file members are listed
    in ``extra["skipped_members"]``. Members of one key must be contiguous (as in webdataset): a key that
    reappears later in the shard gives a second sample keyed ``f"{key}#2"`` with error
    ``non_contiguous_sample``; the same suffix twice in one sample gives error ``duplicate_member`` (the first
    is kept). Error precedence: duplicate_member, non_contiguous_sample, missing_image, bad_caption_encoding,
    missing_caption.
    """
    path = Path(path)
    label = label if label is not None else path.name
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed below; the generator may be abandoned mid-way
    except FileNotFoundError:
        yield UnitError(
            str(path), MISSING_SHARD, f"{path}: shard not found; check the path or re-create it", 0
        )
        return
    except OSError as exc:
        message = f"{path}: cannot open the shard ({exc.strerror or exc}); check that it is a readable file"
        yield UnitError(str(path), UNREADABLE_SHARD, message, 0)
        return
    with file:
        yield from iter_shard_stream(file, path, label)


def iter_shard_stream(file: BinaryIO, path: str | Path, label: str) -> Iterator[RawSample | UnitError]:
    """:func:`iter_shard` on an open binary stream (a local file, or a remote one: :mod:`clipforge.data.remote`);
    ``path`` names it in messages."""
    stream: BinaryIO = file
    try:
        compressed = file.peek(2)[:2] == b"\x1f\x8b" if hasattr(file, "peek") else False
    except OSError as exc:
        message = f"{path}: cannot read the shard ({exc.strerror or exc}); check the disk or re-create it"
        yield UnitError(str(path), UNREADABLE_SHARD, message, 0)
        return
    if compressed:
        stream = gzip.GzipFile(fileobj=file, mode="rb")  # type: ignore[assignment]
    yielded = 0
    seen: Counter[str] = Counter()
    group: _Group | None = None
    try:
        for member in iter_tar_members(stream, announce=True):
            if member.kind == "dir":
                continue
            key, suffix = split_member_name(member.name)
            if group is not None and key != group.key:  # a new key's header: the previous sample is complete
                yield _build_sample(group, label)
                yielded += 1
                group = None
            if member.data is None:
                continue
            if group is None:
                seen[key] += 1
                group = _Group(key, seen[key])
            group.members.append((suffix, member))
        if group is not None:
            yield _build_sample(group, label)
            yielded += 1
    except TarDamage as damage:
        where = f"byte {damage.offset}" + (" of the decompressed stream" if compressed else "")
        if damage.valid_headers == 0:
            message = (
                f"{path}: not a readable tar shard ({damage.what}, at {where}); check that it is a tar file "
                "(not an HTML error page or a partial download) and re-download or re-create it"
            )
            yield UnitError(str(path), UNREADABLE_SHARD, message, 0)
            return
        lost = f"; the incomplete sample {group.key!r} was not yielded" if group is not None else ""
        message = (
            f"{path}: truncated or corrupt shard: {damage.what} at {where}; the {yielded} complete samples "
            f"before it were read{lost}; re-download or re-create the shard"
        )
        yield UnitError(str(path), TRUNCATED_SHARD, message, yielded)


def _build_sample(group: _Group, label: str) -> RawSample:
    key = f"{label}/{group.key}" + (f"#{group.occurrence}" if group.occurrence > 1 else "")
    errors: set[str] = set()
    if group.occurrence > 1:
        errors.add(NON_CONTIGUOUS_SAMPLE)
    by_suffix: dict[str, TarMember] = {}
    extra: dict[str, Any] = {}
    skipped: list[str] = []
    for suffix, member in group.members:
        if member.kind != "file":
            skipped.append(f"{member.name} ({member.kind})")
        elif suffix in by_suffix:
            errors.add(DUPLICATE_MEMBER)
        else:
            by_suffix[suffix] = member
    image_member = next((m for s, m in by_suffix.items() if s in IMAGE_EXTENSIONS), None)
    captions: list[str] = []
    txt = by_suffix.get("txt")
    if txt is not None:
        try:
            captions.append(txt.data.decode("utf-8-sig"))
        except UnicodeDecodeError:
            errors.add(BAD_CAPTION_ENCODING)
            extra["txt"] = txt.data
    json_member = by_suffix.get("json")
    if json_member is not None:
        json_captions = _json_fields(json_member.data, extra)
        if json_captions and captions and json_captions[0] == captions[0]:
            json_captions = json_captions[1:]
        captions.extend(json_captions)
    for suffix, member in by_suffix.items():
        if member is image_member or suffix in ("txt", "json"):
            continue
        name = suffix if suffix not in extra else f"member:{suffix}"
        extra[name] = _text_or_bytes(member.data) if suffix.endswith("txt") else member.data
    if skipped:
        extra["skipped_members"] = tuple(skipped)
    if image_member is None:
        errors.add(MISSING_IMAGE)
    if not captions and txt is None:
        errors.add(MISSING_CAPTION)
    precedence = (
        DUPLICATE_MEMBER,
        NON_CONTIGUOUS_SAMPLE,
        MISSING_IMAGE,
        BAD_CAPTION_ENCODING,
        MISSING_CAPTION,
    )
    error = next((e for e in precedence if e in errors), None)
    image_name = f"{label}/{image_member.name if image_member is not None else group.key}"
    image = image_member.data if image_member is not None else None
    return RawSample(key, image, tuple(captions), image_name, error, extra)


def _json_fields(data: bytes, extra: dict[str, Any]) -> list[str]:
    """Parse a sample's .json: returns its captions and puts every other field in ``extra``."""
    try:
        parsed = json.loads(data.decode("utf-8-sig"))
    except (ValueError, RecursionError):  # not UTF-8 (a ValueError), not JSON, or absurdly deeply nested
        extra["json"] = data
        return []
    if not isinstance(parsed, dict):
        extra["json"] = parsed
        return []
    captions: list[str] = []
    caption_field = None
    for name in _CAPTION_FIELDS:
        value = parsed.get(name)
        if name == "captions" and isinstance(value, list) and all(isinstance(c, str) for c in value):
            captions, caption_field = list(value), name
            break
        if name != "captions" and isinstance(value, str):
            captions, caption_field = [value], name
            break
    for name, value in parsed.items():
        if name != caption_field:
            extra[name] = value
    return captions


def _text_or_bytes(data: bytes) -> str | bytes:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


# ----------------------------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class ShardInfo:
    """One written shard: file name (relative to the manifest), sample count, size and sha256."""

    name: str
    num_samples: int
    num_bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a :class:`ShardWriter` wrote: the shards, what was dropped and why, and how they were made.

    ``dropped`` counts skipped inputs by reason (a sample error such as ``missing_image``, ``image_corrupt``,
    ``empty_caption``; ``empty_caption_text`` counts empty caption strings removed from samples that kept
    others; unit reasons such as ``truncated_shard`` count units). ``oversized_samples`` counts samples larger
    than ``max_bytes`` on their own, each written alone to a shard over the limit.
    """

    shards: tuple[ShardInfo, ...]
    dropped: Mapping[str, int] = field(default_factory=dict)
    args: Mapping[str, Any] = field(default_factory=dict)
    oversized_samples: int = 0
    unit_errors: tuple[Mapping[str, Any], ...] = ()

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": 1,
            "num_samples": self.num_samples,
            "num_shards": len(self.shards),
            "shards": [vars(s) for s in self.shards],
            "dropped": dict(sorted(self.dropped.items())),
            "oversized_samples": self.oversized_samples,
            "unit_errors": [dict(u) for u in self.unit_errors],
            "args": dict(self.args),
        }

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read a ``manifest.json``; :class:`DataError` if it is unreadable or not a clipforge manifest."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:  # unreadable, or not UTF-8
            raise DataError(
                f"{path}: not a readable clipforge shard manifest ({exc}); delete it, or pass "
                "use_manifest=False to read the directory's .tar files without it"
            ) from exc
        return cls.loads(text, path)

    @classmethod
    def loads(cls, text: str, path: str | Path) -> Manifest:
        """A manifest from its JSON text (``path`` names it in errors: a file, or a URL)."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"its 'format' is not {MANIFEST_FORMAT!r}")
            if not isinstance(data["shards"], list):
                raise ValueError("its 'shards' is not a list")
            shards = tuple(_shard_info(entry, index) for index, entry in enumerate(data["shards"]))
            dropped = dict(data.get("dropped", {}))
            if not all(_is_count(n) for n in dropped.values()):
                raise ValueError("its 'dropped' counts are not all non-negative integers")
            oversized = data.get("oversized_samples", 0)
            if not _is_count(oversized):
                raise ValueError(f"its 'oversized_samples' is {oversized!r}, not a non-negative integer")
            unit_errors = data.get("unit_errors", [])
            if not isinstance(unit_errors, list) or not all(isinstance(u, dict) for u in unit_errors):
                raise ValueError("its 'unit_errors' is not a list of objects")
            return cls(shards, dropped, dict(data.get("args", {})), oversized, tuple(unit_errors))
        except RecursionError:  # JSON nested deeper than the interpreter's stack allows
            raise DataError(
                f"{path}: not a readable clipforge shard manifest (its JSON is nested too deeply); delete it, "
                "or pass use_manifest=False to read the directory's .tar files without it"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{path}: not a readable clipforge shard manifest ({exc}); delete it, or pass "
                "use_manifest=False to read the directory's .tar files without it"
            ) from exc


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shard_info(entry: Any, index: int) -> ShardInfo:
    """One ``shards`` entry, every field checked (a manifest comes from disk, so it may be damaged)."""
    if not isinstance(entry, dict) or set(entry) != {"name", "num_samples", "num_bytes", "sha256"}:
        raise ValueError(f"shard entry {index} is not an object with name, num_samples, num_bytes, sha256")
    name, sha256 = entry["name"], entry["sha256"]
    if not isinstance(name, str) or not name or "\x00" in name or not isinstance(sha256, str):
        raise ValueError(f"shard entry {index} has a name or sha256 that is not a non-empty string")
    if not (_is_count(entry["num_samples"]) and _is_count(entry["num_bytes"])):
        raise ValueError(f"shard entry {index} has counts that are not non-negative integers")
    return ShardInfo(name, entry["num_samples"], entry["num_bytes"], sha256)


# ----------------------------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Writes samples to ``{prefix}-000000.tar``, ``{prefix}-000001.tar``, ... in ``out_dir``; see :meth:`write`.

    A shard is closed before a sample would push it past ``max_bytes`` (the exact tar file size, end-of-archive
    blocks included) or ``max_samples``; a sample never straddles shards. A sample bigger than ``max_bytes`` on
    its own is written alone to a shard that exceeds the limit (with a warning), and counted in the manifest's
    ``oversized_samples``. Each shard is written to a hidden temporary file, fsynced, then renamed.
    :meth:`close` writes ``manifest.json``; leaving a ``with`` block by an exception calls :meth:`abort`
    instead (completed shards stay, no manifest is written, the partial shard is removed).

    ``out_dir`` must not already hold ``{prefix}-*.tar`` files or a manifest unless ``overwrite=True``, which
    deletes them first.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "shard",
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        *,
        overwrite: bool = False,
        args: Mapping[str, Any] | None = None,
    ) -> None:
        if max_bytes <= 0 or max_samples <= 0:
            raise ValueError(f"max_bytes and max_samples must be positive, got {max_bytes} and {max_samples}")
        if not prefix or "/" in prefix or os.sep in prefix:
            raise ValueError(f"prefix must be a plain file-name prefix, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        self.args = {"prefix": prefix, "max_bytes": max_bytes, "max_samples": max_samples, **(args or {})}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob(f"{prefix}-*.tar")) + sorted(self.out_dir.glob(MANIFEST_NAME))
        existing += leftover_temporaries(self.out_dir, f"{prefix}-*.tar")  # left by a crashed writer
        if existing and not overwrite:
            raise DataError(
                f"{self.out_dir} already holds {len(existing)} shard/manifest file(s) (e.g. {existing[0].name}); "
                "write to an empty directory, or pass overwrite=True to delete them first"
            )
        for stale in existing:
            stale.unlink()
        self.dropped: Counter[str] = Counter()
        self.unit_errors: list[UnitError] = []
        self._shards: list[ShardInfo] = []
        self._oversized = 0
        self._file: AtomicFile | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._keys: set[str] = set()
        self._closed = False

    def write(
        self,
        key: str,
        image: bytes,
        image_ext: str,
        captions: str | Sequence[str],
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Add one sample as ``key.<image_ext>``, ``key.txt`` (first caption) and, when needed, ``key.json``.

        ``key`` may contain "/" but no "." in its last component. ``key.json`` is written when there is more
        than one caption or ``extra`` holds non-bytes values: ``{"captions": [...all...], **extra}``. Bytes
        values in ``extra`` become members ``key.<name>`` (name lower case, no "/", not an image/txt/json
        suffix). :func:`iter_shard` reads all of this back as the same key, bytes, captions and extra
        (tuples in ``extra`` come back as lists).
        """
        if self._closed:
            raise ValueError("ShardWriter is closed")
        payload = _encode_sample(key, image, image_ext, captions, extra or {})
        if self._file is not None and (
            len(self._keys) >= self.max_samples
            or self._size + len(payload) + len(END_OF_ARCHIVE) > self.max_bytes
        ):
            self._finish_shard()
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in one shard; keys must be unique")
        if self._file is None:
            self._start_shard()
        if len(payload) + len(END_OF_ARCHIVE) > self.max_bytes:
            self._oversized += 1
            warnings.warn(
                f"sample {key!r} ({len(payload):,} bytes as tar members) is larger than max_bytes="
                f"{self.max_bytes:,}; it is written alone to a shard over the limit",
                stacklevel=2,
            )
        assert self._file is not None
        self._file.write(payload)
        self._hash.update(payload)
        self._size += len(payload)
        self._keys.add(key)

    def record_dropped(self, reason: str, count: int = 1) -> None:
        """Count ``count`` inputs skipped for ``reason``; the counts go into the manifest."""
        self.dropped[reason] += count

    def record_unit_error(self, error: UnitError) -> None:
        """Count a failed input unit (e.g. a truncated source shard) and keep its message for the manifest."""
        self.dropped[error.reason] += 1
        self.unit_errors.append(error)

    def close(self) -> Manifest:
        """Finish the last shard and write ``manifest.json``; returns the manifest. Idempotent."""
        if not self._closed:
            if self._file is not None:
                self._finish_shard()
            self._closed = True
            with atomic_path(self.out_dir / MANIFEST_NAME) as temporary:
                temporary.write_bytes(json.dumps(self.manifest.to_dict(), indent=1).encode("utf-8"))
        return self.manifest

    def abort(self) -> None:
        """Stop without a manifest: remove the partial shard; completed shards stay."""
        if self._file is not None:
            self._file.discard()
            self._file = None
        self._closed = True

    @property
    def manifest(self) -> Manifest:
        """The manifest of the shards completed so far."""
        unit_errors = tuple(dict(vars(e)) for e in self.unit_errors)
        return Manifest(
            tuple(self._shards), dict(self.dropped), dict(self.args), self._oversized, unit_errors
        )

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def _start_shard(self) -> None:
        self._file = AtomicFile(self.out_dir / self._shard_name(len(self._shards)))
        self._hash = hashlib.sha256()
        self._size = 0
        self._keys = set()

    def _finish_shard(self) -> None:
        assert self._file is not None
        self._file.write(END_OF_ARCHIVE)
        self._hash.update(END_OF_ARCHIVE)
        self._size += len(END_OF_ARCHIVE)
        path = self._file.commit()
        self._file = None
        self._shards.append(ShardInfo(path.name, len(self._keys), self._size, self._hash.hexdigest()))


def _encode_sample(
    key: str, image: bytes, image_ext: str, captions: str | Sequence[str], extra: Mapping[str, Any]
) -> bytes:
    """The tar members of one sample, as bytes (headers, data, padding)."""
    last = key.rpartition("/")[2]
    if not last or "." in last or key.startswith("/") or "\x00" in key or ".." in key.split("/"):
        raise ValueError(f"invalid sample key {key!r}: need a relative path whose last part has no '.'")
    ext = image_ext.lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"image extension {image_ext!r} is not one of {sorted(IMAGE_EXTENSIONS)}")
    caption_list = [captions] if isinstance(captions, str) else list(captions)
    members = [(f"{key}.{ext}", bytes(image))]
    if caption_list:
        members.append((f"{key}.txt", caption_list[0].encode("utf-8")))
    fields: dict[str, Any] = {}
    for name, value in extra.items():
        if isinstance(value, (bytes, bytearray)):
            if not is_member_suffix(name):
                raise ValueError(
                    f"extra field {name!r} holds bytes, so it is written as member '{key}.{name}', but that is "
                    "not a valid suffix (lower case, no '/', not an image/txt/json suffix)"
                )
            members.append((f"{key}.{name}", bytes(value)))
        elif name == "captions":
            raise ValueError("extra may not have a 'captions' field: it is where the captions are stored")
        else:
            fields[name] = value
    if fields or len(caption_list) > 1:
        try:
            document = json.dumps({"captions": caption_list, **fields}, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"extra fields of sample {key!r} are not JSON-serialisable: {exc}") from exc
        members.append((f"{key}.json", document.encode("utf-8")))
    return b"".join(tar_member_bytes(name, data) for name, data in members)


def is_member_suffix(name: str) -> bool:
    """Whether ``name`` can be written as a member suffix that reads back under the same name."""
    return (
        bool(name)
        and name == name.lower()
        and "/" not in name
        and not name.startswith(".")
        and "\x00" not in name
        and name not in IMAGE_EXTENSIONS
        and name not in ("txt", "json")
    )


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_SAMPLES",
    "MANIFEST_NAME",
    "Manifest",
    "ShardInfo",
    "ShardWriter",
    "is_member_suffix",
    "iter_shard",
    "iter_shard_stream",
    "sha256_file",
    "split_member_name",
]
