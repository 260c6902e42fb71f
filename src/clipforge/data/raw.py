"""The raw records every data source yields (encoded image bytes plus caption strings, nothing decoded), the
two functions training and evaluation share to read an image file and decode its bytes
(:func:`read_image_file`, :func:`decode_image`), and the tar format primitives the shard reader and writer share.

Problems are values, not exceptions: a sample that cannot be used carries an ``error`` category, and a shard
that breaks part-way yields a :class:`UnitError` after the samples it did deliver, so callers can count every
skipped thing by reason.
"""

from __future__ import annotations

import logging
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from clipforge.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

log = logging.getLogger("clipforge.data")

#: File extensions (lower case, no dot) read as the sample's image; the first one present in stored order wins.
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})

# Sample-level error categories (RawSample.error).
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
BAD_CAPTION_ENCODING = "bad_caption_encoding"
UNREADABLE_IMAGE_FILE = "unreadable_image_file"
UNREADABLE_CAPTION_FILE = "unreadable_caption_file"
DUPLICATE_MEMBER = "duplicate_member"
NON_CONTIGUOUS_SAMPLE = "non_contiguous_sample"
MALFORMED_ROW = "malformed_row"

# Unit-level error categories (UnitError.reason).
TRUNCATED_SHARD = "truncated_shard"
UNREADABLE_SHARD = "unreadable_shard"
MISSING_SHARD = "missing_shard"


class DataError(ValueError):
    """Data cannot be opened or read as asked; the message names the file or spec and the fix."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data spec matched no files (also a ``FileNotFoundError``, so either ``except`` catches it)."""


@dataclass(frozen=True)
class RawSample:
    """One image–text pair as stored: encoded image bytes and caption strings, nothing decoded."""

    key: str  # unique within its source, e.g. "shard-000003.tar/000123" or "train.csv:17"
    image: bytes | None  # encoded image bytes; None when unavailable (then ``error`` says why)
    captions: tuple[str, ...]  # caption texts as stored (primary first); may be empty or hold empty strings
    image_name: str  # for messages: tar member name or file path
    error: str | None = None  # I/O-level problem category (the constants above); None when usable
    extra: Mapping[str, Any] = field(
        default_factory=dict
    )  # other fields: json metadata, labels, translations


@dataclass(frozen=True)
class UnitError:
    """A whole unit (shard) failed, part-way or entirely; yielded after the samples it did deliver."""

    unit: str  # the shard path
    reason: str  # "truncated_shard" | "unreadable_shard" | "missing_shard"
    message: str  # human-readable, names the file and the fix
    samples_read: int  # samples yielded from this unit before the failure


# ----------------------------------------------------------------------------------------------------------------
# One sample's image: read from a file, decoded from bytes (the same two steps for training and evaluation)


def read_image_file(path: Path) -> tuple[bytes | None, str | None]:
    """A file's bytes, or ``(None, "missing_image" | "unreadable_image_file")``; a 0-byte file gives ``b""``.

    Only regular files are read: a directory, FIFO or device (``/dev/zero``, ``/dev/stdin``) named by a table
    row is ``unreadable_image_file``, never a hang; a path no file can have (a NUL byte, text the file system
    cannot encode) is ``missing_image``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO would block a plain open
    except (FileNotFoundError, NotADirectoryError):
        return None, MISSING_IMAGE
    except OSError:  # no permission, an I/O error, a name too long
        return None, UNREADABLE_IMAGE_FILE
    except ValueError:  # an embedded NUL byte, or a name the file system encoding cannot express
        return None, MISSING_IMAGE
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, UNREADABLE_IMAGE_FILE
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read(), None
    except OSError:
        return None, UNREADABLE_IMAGE_FILE
    finally:
        os.close(fd)


def decode_image(
    data: bytes,
    name: str,
    *,
    fill_color: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image | str:
    """Encoded bytes -> an 8-bit RGB image (:func:`clipforge.images.load_image`), or the reason to skip the
    sample, ``"image_" + ImageLoadError.reason`` (``image_corrupt``, ``image_empty``, ``image_too_large``, ...)."""
    try:
        return load_image(data, name=name, fill_color=fill_color, max_pixels=max_pixels)
    except ImageLoadError as exc:
        log.debug("skipped %s: %s", name, exc)
        return f"image_{exc.reason}"


# ----------------------------------------------------------------------------------------------------------------
# The tar format. Written from scratch rather than on tarfile's reader, because tarfile treats a file cut at a
# member boundary, or inside a later header, as a clean end of archive and would lose the rest of a truncated
# shard without a word. Here an archive is complete only when the end-of-archive zero block is reached.

TAR_BLOCK = 512
END_OF_ARCHIVE = bytes(2 * TAR_BLOCK)
_ZERO_BLOCK = bytes(TAR_BLOCK)
_READ_CHUNK = 1 << 24  # member data is read in pieces, so a damaged size field cannot ask for a huge buffer
#: The largest member a shard may hold (twice the writer's default shard size): a header claiming more is
#: corrupt, and refusing it keeps a damaged size field (or a gzip bomb) from filling memory.
MAX_MEMBER_BYTES = 512 * 2**20
_META_TYPES = {b"x", b"g", b"L", b"K", b"V"}  # pax headers, GNU long name/link, volume label
_OTHER_TYPES = {b"1": "hard link", b"2": "symlink", b"3": "char device", b"4": "block device", b"6": "fifo"}
_OTHER_TYPES |= {b"S": "GNU sparse file", b"M": "multi-volume continuation"}


class TarDamage(Exception):
    """The tar stream is truncated or corrupt at ``offset`` (bytes of the uncompressed stream)."""

    def __init__(self, what: str, offset: int) -> None:
        super().__init__(what)
        self.what = what
        self.offset = offset
        self.valid_headers = 0  # checksum-valid headers before the damage: 0 means "maybe not a tar at all"


@dataclass
class TarMember:
    """One tar member as stored; ``offset`` is where its header starts in the (uncompressed) stream."""

    name: str
    kind: str  # "file", "dir", or a description of another member type ("symlink", ...)
    data: bytes | None  # None only in the header announcement (see iter_tar_members)
    offset: int


def _read_exact(stream: BinaryIO, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes (fewer only at the end of the stream); read errors become :class:`TarDamage`."""
    parts: list[bytes] = []
    remaining = size
    try:
        while remaining > 0:
            chunk = stream.read(min(remaining, _READ_CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            remaining -= len(chunk)
    except (OSError, EOFError, zlib.error) as exc:  # gzip damage, or an I/O error from the disk
        raise TarDamage(f"read error ({type(exc).__name__}: {exc})", offset + size - remaining) from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _octal(field_bytes: bytes, what: str, offset: int) -> int:
    if field_bytes[:1] == b"\x80":  # GNU base-256 for large numbers
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.split(b"\x00", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarDamage(f"corrupt member header (bad {what} field {text[:16]!r})", offset) from None


def _decode_name(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _checksum_ok(header: bytes, offset: int) -> bool:
    stored = _octal(header[148:156], "checksum", offset)
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)
    signed = unsigned - 256 * sum(1 for b in blanked if b > 127)
    return stored in (unsigned, signed)


def _parse_pax(data: bytes, offset: int) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    position = 0
    try:
        while position < len(data) and data[position] != 0:
            space = data.index(b" ", position)
            length = int(data[position:space])
            record = data[space + 1 : position + length]
            if length <= 0 or not record.endswith(b"\n"):
                raise ValueError("bad record")
            key, _, value = record[:-1].partition(b"=")
            records[key.decode("utf-8", "replace")] = value
            position += length
    except ValueError:
        raise TarDamage("corrupt pax extended header", offset) from None
    return records


def iter_tar_members(
    stream: BinaryIO, *, announce: bool = False, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[TarMember]:
    """The members of a tar stream in stored order, pax/GNU long names applied, meta members consumed.

    With ``announce=True`` each member is first yielded with ``data=None`` as soon as its header is read (so a
    caller grouping members learns that the previous group is complete before this member's data arrives),
    then again with its data. Raises :class:`TarDamage` (with the offset and the number of valid headers
    before it) when the stream ends before the end-of-archive zero block, a header fails its checksum, or a
    read fails, or a member's size is negative or over ``max_member_bytes``; every member yielded with data
    before that is complete. One zero block ends the archive (the standard asks for two; GNU tar also accepts
    one).
    """
    offset = 0
    valid_headers = 0
    long_name: str | None = None
    pax: dict[str, bytes] = {}
    try:
        while True:
            header = _read_exact(stream, TAR_BLOCK, offset)
            if not header:
                raise TarDamage(
                    "the file ends without the end-of-archive marker (cut at a member boundary)", offset
                )
            if len(header) < TAR_BLOCK:
                raise TarDamage("the file ends inside a member header", offset)
            if header == _ZERO_BLOCK:
                return
            if not _checksum_ok(header, offset):
                raise TarDamage("corrupt member header (checksum mismatch)", offset)
            valid_headers += 1
            typeflag = header[156:157]
            size = _octal(header[124:136], "size", offset)
            name = _decode_name(header[0:100].split(b"\x00", 1)[0])
            prefix = header[345:500].split(b"\x00", 1)[0]
            if (
                header[257:263] == b"ustar\x00" and prefix
            ):  # POSIX ustar splits long names (GNU uses the field)
                name = _decode_name(prefix) + "/" + name
            kind = "meta"
            if typeflag not in _META_TYPES:
                if "size" in pax:
                    size = _pax_int(pax["size"], offset)
                name = _decode_name(pax["path"]) if "path" in pax else long_name or name
                long_name, pax = None, {}
                kind = "dir" if typeflag == b"5" else _OTHER_TYPES.get(typeflag, "file")  # unknown: a file
                if announce:
                    yield TarMember(name, kind, None, offset)
            _check_size(size, name, max_member_bytes, offset)
            data = _read_exact(stream, size, offset + TAR_BLOCK)
            if len(data) < size:
                raise TarDamage(f"the file ends inside the data of member {name!r}", offset)
            padding = -size % TAR_BLOCK
            if len(_read_exact(stream, padding, offset + TAR_BLOCK + size)) < padding:
                raise TarDamage(f"the file ends inside the padding after member {name!r}", offset)
            member_offset, offset = offset, offset + TAR_BLOCK + size + padding
            if typeflag == b"x":
                pax = _parse_pax(data, member_offset)
            elif typeflag == b"L":
                long_name = _decode_name(data.split(b"\x00", 1)[0])
            elif kind != "meta":
                yield TarMember(name, kind, data, member_offset)
    except TarDamage as damage:
        damage.valid_headers = valid_headers
        raise


def _check_size(size: int, name: str, max_member_bytes: int, offset: int) -> None:
    if size < 0:
        raise TarDamage(f"corrupt member header (member {name!r} has a negative size, {size})", offset)
    if size > max_member_bytes:
        raise TarDamage(
            f"member {name!r} claims {size:,} bytes, more than the {max_member_bytes:,} a shard member may "
            "have (a corrupt size field, or not a clipforge/webdataset shard)",
            offset,
        )


def _pax_int(value: bytes, offset: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise TarDamage("corrupt pax extended header (size)", offset) from None


def tar_member_bytes(name: str, data: bytes) -> bytes:
    """One regular-file member (header, data, padding) with fixed metadata, so output is reproducible."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return header + data + bytes(-len(data) % TAR_BLOCK)
