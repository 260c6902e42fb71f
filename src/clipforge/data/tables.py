"""Row sources: CSV/TSV/JSONL tables of (image path, caption), and folders of images with sidecar captions.

Each row is one unit. Opening a table scans it once, checks every row, and keeps only each row's byte offset
and line number, so tables of millions of rows stay small in memory and any row can be read on its own (by
any DataLoader worker) with one positioned read.

Bad rows: by default (``on_bad_row="error"``) a row that is not valid text in the table's encoding, has the
wrong number of fields, or (JSONL) is not a JSON object raises :class:`DataError` naming the file and line
while the table is opened: a table is usually hand-made, and a silently skipped row hides a bug. With
``on_bad_row="report"`` such rows stay units and read as ``RawSample(error="malformed_row")``, and
``notes`` says which lines they are. Blank lines are not rows.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from clipforge.data.raw import (
    BAD_CAPTION_ENCODING,
    IMAGE_EXTENSIONS,
    MALFORMED_ROW,
    MISSING_CAPTION,
    MISSING_IMAGE,
    UNREADABLE_CAPTION_FILE,
    UNREADABLE_IMAGE_FILE,
    DataError,
    RawSample,
)

IMAGE_COLUMNS = ("image", "image_path", "filepath", "file", "path", "filename")
CAPTION_COLUMNS = ("caption", "captions", "text", "title", "description")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}
_UTF8 = {"utf-8", "utf8", "utf-8-sig", "utf_8", "utf_8_sig"}
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_MAX_NOTED_LINES = 10


def split_captions(text: str, separator: str | None) -> tuple[str, ...]:
    """``(text,)``, or the non-blank pieces of ``text`` split on ``separator`` (``("",)`` if none are left)."""
    if separator is None:
        return (text,)
    pieces = tuple(piece for piece in text.split(separator) if piece.strip())
    return pieces or ("",)


def read_image_file(path: Path) -> tuple[bytes | None, str | None]:
    """A file's bytes, or ``(None, "missing_image" | "unreadable_image_file")``; a 0-byte file gives ``b""``."""
    try:
        return path.read_bytes(), None
    except (FileNotFoundError, NotADirectoryError):
        return None, MISSING_IMAGE
    except OSError:  # a directory, no permission, an I/O error
        return None, UNREADABLE_IMAGE_FILE


def _stamp(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_size, stat.st_mtime_ns


class TableSource:
    """A CSV (comma), TSV (tab) or JSONL table with an image-path column and a caption column; one unit per row.

    Columns are found by name (case-insensitive; :data:`IMAGE_COLUMNS`, :data:`CAPTION_COLUMNS`, first match
    wins) unless ``image_column`` / ``caption_column`` are given; ``columns`` names the columns of a CSV/TSV
    without a header row. CSV/TSV use standard quoting (fields with commas, quotes or newlines in double
    quotes); a UTF-8 byte-order mark is ignored; ``encoding`` must be ASCII-compatible (utf-8, latin-1, ...).
    Image paths are relative to ``root`` if given, else to the table's folder (absolute paths are kept). A
    caption field holding several captions is split on ``caption_separator``; a JSONL caption may also be a
    list of strings. Other fields go to ``RawSample.extra``. Keys are ``f"{label}:{line}"``, the line where
    the row starts (``label`` defaults to the file name).

    Per row: an empty or missing image field -> ``missing_image``; a missing file -> ``missing_image``; an
    unreadable one -> ``unreadable_image_file``; a missing (JSONL) or null caption -> ``missing_caption``;
    an empty caption field is read as ``""`` (the consumer counts it).
    """

    unit_kind: Literal["row"] = "row"

    def __init__(
        self,
        path: str | Path,
        *,
        image_column: str | None = None,
        caption_column: str | None = None,
        caption_separator: str | None = None,
        root: str | Path | None = None,
        columns: Sequence[str] | None = None,
        encoding: str = "utf-8",
        on_bad_row: Literal["error", "report"] = "error",
        label: str | None = None,
    ) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in TABLE_SUFFIXES:
            raise DataError(f"{self.path}: not a table (expected one of {sorted(TABLE_SUFFIXES)})")
        if on_bad_row not in ("error", "report"):
            raise ValueError(f"on_bad_row must be 'error' or 'report', got {on_bad_row!r}")
        if caption_separator == "":
            raise ValueError("caption_separator must be a non-empty string or None")
        self.name = str(path)
        self.label = label if label is not None else self.path.name
        self.root = Path(root) if root is not None else self.path.parent
        self.caption_separator = caption_separator
        self.encoding = encoding
        self.on_bad_row = on_bad_row
        self._delimiter = TABLE_SUFFIXES[suffix]
        self._requested = (image_column, caption_column)
        self._columns = list(columns) if columns is not None else None
        # Byte offset where each row starts, plus one entry where the last one ends.
        self._starts = array("q")
        self._lines = array("q")  # line number where each row starts
        self._bad = array("b")  # 1 for a malformed row (on_bad_row="report")
        self._bad_lines: list[str] = []
        self._fd: int | None = None
        try:
            with open(self.path, "rb") as file:
                self._stamp = _stamp(os.fstat(file.fileno()))
                if self._delimiter is None:
                    self._scan_jsonl(file)
                else:
                    self._scan_delimited(file)
        except FileNotFoundError:
            raise DataError(f"{self.path}: table not found; check the path") from None
        except IsADirectoryError:
            raise DataError(f"{self.path}: is a directory, not a table file") from None
        notes = []
        if self._bad_lines:
            shown = ", ".join(self._bad_lines[:_MAX_NOTED_LINES])
            more = (
                "" if len(self._bad_lines) <= _MAX_NOTED_LINES else f" and {len(self._bad_lines) - 10} more"
            )
            notes.append(f"{self.path}: {len(self._bad_lines)} malformed rows read as errors: {shown}{more}")
        self.notes: tuple[str, ...] = tuple(notes)

    # -- Source protocol --------------------------------------------------------------------------------------

    def num_units(self) -> int:
        return len(self._lines)

    def num_samples(self) -> int | None:
        return len(self._lines)

    def iter_unit(self, index: int) -> Iterator[RawSample]:
        yield self.row(index)

    # -- rows ----------------------------------------------------------------------------------------------------

    def row(self, index: int) -> RawSample:
        """Row ``index`` (0-based, data rows only) as a sample; the image file is read here."""
        if not 0 <= index < len(self._lines):
            raise IndexError(f"{self.path}: row {index} out of range (the table has {len(self._lines)} rows)")
        key = f"{self.label}:{self._lines[index]}"
        if self._bad[index]:
            return RawSample(key, None, (), key, MALFORMED_ROW)
        chunk = self._read(self._starts[index], self._starts[index + 1])
        text = self._decode(chunk, self._starts[index], self._lines[index])
        if self._delimiter is None:
            record = json.loads(text)
            fields = dict(record)
        else:
            values = next(
                r for r in csv.reader(io.StringIO(text, newline=""), delimiter=self._delimiter) if r
            )
            fields = dict(zip(self._header, values))
        return self._sample(key, fields)

    def _sample(self, key: str, fields: dict[str, Any]) -> RawSample:
        image_value = fields.pop(self.image_column, None)
        caption_value = fields.pop(self.caption_column, None)
        captions: tuple[str, ...] = ()
        error = None
        if isinstance(caption_value, str):
            captions = split_captions(caption_value, self.caption_separator)
        elif isinstance(caption_value, list) and all(isinstance(c, str) for c in caption_value):
            captions = tuple(caption_value)
        elif caption_value is None:
            error = MISSING_CAPTION
        else:
            error = MALFORMED_ROW  # a JSON number, object, or list of non-strings
        if not isinstance(image_value, str) or not image_value.strip():
            shown = f"{key} (no image path)"
            if image_value is not None and not isinstance(image_value, str):
                return RawSample(key, None, captions, shown, MALFORMED_ROW, fields)
            return RawSample(key, None, captions, shown, MISSING_IMAGE, fields)
        path = self.root / Path(image_value.strip()).expanduser()  # "a.jpg, caption" tables pad with spaces
        image, image_error = read_image_file(path)
        return RawSample(key, image, captions, str(path), image_error or error, fields)

    def _read(self, start: int, end: int) -> bytes:
        if self._fd is None:
            fd = os.open(self.path, os.O_RDONLY)
            if _stamp(os.fstat(fd)) != self._stamp:  # the row offsets would point at the wrong bytes
                os.close(fd)
                raise DataError(f"{self.path}: the table changed after it was opened; open it again")
            self._fd = fd
        return os.pread(self._fd, end - start, start)  # positioned: safe to share across threads

    def _decode(self, data: bytes, start: int, line: int) -> str:
        try:
            if start == 0 and self.encoding.lower() in _UTF8:
                return data.decode("utf-8-sig")
            return data.decode(self.encoding)
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{self.path}:{line}: not valid {self.encoding} text ({exc.reason} at byte {exc.start} of the "
                f"line); re-save the table as UTF-8, pass encoding=... (e.g. 'latin-1'), or pass "
                "on_bad_row='report' to count such rows as errors instead"
            ) from None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"] = None  # each process opens its own descriptor
        return state

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # type: ignore[arg-type]

    # -- scanning ------------------------------------------------------------------------------------------------

    def _line_text(self, raw: bytes, offset: int, number: int) -> str | None:
        """A line's text; None for invalid text when bad rows are reported (never for the first line)."""
        try:
            return self._decode(raw, offset, number)
        except DataError:
            if self.on_bad_row == "error" or offset == 0:
                raise
            return None

    def _mark(self, start: int, line: int, bad_reason: str | None) -> None:
        if bad_reason is not None:
            if self.on_bad_row == "error":
                raise DataError(
                    f"{self.path}:{line}: {bad_reason}; fix the row, or pass on_bad_row='report' to count such "
                    "rows as errors instead"
                )
            self._bad_lines.append(f"line {line} ({bad_reason})")
        self._starts.append(start)
        self._lines.append(line)
        self._bad.append(0 if bad_reason is None else 1)

    def _scan_delimited(self, file: io.BufferedReader) -> None:
        # csv's reader pulls exactly the lines of one row per call and no more, so the position of the next
        # line it will pull, read before each call, is where the next row starts.
        position = {"offset": 0, "line": 1, "bad": False}

        def texts() -> Iterator[str]:
            for number, raw in enumerate(file, 1):
                text = self._line_text(raw, position["offset"], number)
                if text is None:
                    text, position["bad"] = raw.decode(self.encoding, "replace"), True
                position["offset"] += len(raw)
                position["line"] = number + 1
                yield text

        reader = csv.reader(texts(), delimiter=self._delimiter)
        header = [c.strip() for c in self._columns] if self._columns is not None else None
        if header is not None:
            self._set_header(header, have_header=False)
        while True:
            start, line = position["offset"], position["line"]
            position["bad"] = False
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                self._mark(start, line, f"not a valid {self._kind} row ({exc})")
                continue
            if not any(field.strip() for field in record):
                continue  # a blank line
            if header is None:
                header = [c.strip() for c in record]
                self._set_header(header, have_header=True)
                continue
            bad_reason = None
            if position["bad"]:
                bad_reason = f"not valid {self.encoding} text"
            elif len(record) != len(header):
                bad_reason = (
                    f"the row has {len(record)} fields but the header has {len(header)} ({', '.join(header)}); "
                    f"quote fields that contain {self._delimiter!r} or line breaks"
                )
            elif not self._lines:
                self._check_not_url(dict(zip(header, record)).get(self.image_column), line)
            self._mark(start, line, bad_reason)
        if header is None:
            raise DataError(f"{self.path}: the table is empty (no header row)")
        if not self._lines:
            raise DataError(f"{self.path}: the table has a header but no rows")
        self._starts.append(position["offset"])

    def _set_header(self, header: list[str], have_header: bool) -> None:
        duplicates = sorted({c for c in header if header.count(c) > 1})
        if duplicates:
            raise DataError(
                f"{self.path}: duplicate column names {duplicates}; rename them so no field is lost"
            )
        self._header = header
        self._resolve_columns(header, have_header)

    @property
    def _kind(self) -> str:
        return {",": "CSV", "\t": "TSV"}.get(self._delimiter or "", "JSONL")

    def _scan_jsonl(self, file: io.BufferedReader) -> None:
        keys: dict[str, None] = {}
        first: dict[str, Any] | None = None
        offset = 0
        for number, raw in enumerate(file, 1):
            start, offset = offset, offset + len(raw)
            text = self._line_text(raw, start, number)
            if text is not None and not text.strip():
                continue
            bad_reason = None
            if text is None:
                bad_reason = f"not valid {self.encoding} text"
            else:
                try:
                    record = json.loads(text)
                except ValueError as exc:
                    record, bad_reason = None, f"not valid JSON ({exc})"
                if isinstance(record, dict):
                    keys.update(dict.fromkeys(record))
                    first = first if first is not None else record
                elif bad_reason is None:
                    bad_reason = f"a JSON {type(record).__name__}, not an object"
            self._mark(start, number, bad_reason)
        self._starts.append(offset)
        if not self._lines:
            raise DataError(f"{self.path}: the table has no rows")
        self._header = list(keys)
        self._resolve_columns(self._header, have_header=True)
        if first is not None:
            self._check_not_url(first.get(self.image_column), self._lines[0])

    def _resolve_columns(self, header: list[str], have_header: bool) -> None:
        found = ", ".join(repr(c) for c in header)
        chosen = []
        for requested, candidates, option in (
            (self._requested[0], IMAGE_COLUMNS, "image_column"),
            (self._requested[1], CAPTION_COLUMNS, "caption_column"),
        ):
            if requested is not None:
                if requested not in header:
                    raise DataError(
                        f"{self.path}: {option}={requested!r} is not a column; the columns are {found}"
                    )
                chosen.append(requested)
                continue
            lower = {c.lower(): c for c in reversed(header)}
            match = next((lower[c] for c in candidates if c in lower), None)
            if match is None:
                hint = ""
                if any(c.lower() == "url" for c in header):
                    hint = "; a 'url' column means image URLs: download them first (e.g. with img2dataset)"
                elif have_header:
                    hint = "; if the file has no header row, pass columns=[...] naming its columns"
                raise DataError(
                    f"{self.path}: cannot find the {option.split('_')[0]} column: the columns are {found}, none "
                    f"named one of {', '.join(candidates)}; pass {option}='<name>' to open_source{hint}"
                )
            chosen.append(match)
        self.image_column, self.caption_column = chosen

    def _check_not_url(self, value: Any, line: int) -> None:
        if isinstance(value, str) and _URL.match(value.strip()):
            raise DataError(
                f"{self.path}:{line}: the image column {self.image_column!r} holds URLs ({value[:80]!r}); "
                "clipforge reads local files: download the images first (e.g. with img2dataset)"
            )


class ImageFolderSource:
    """A folder of images with sidecar captions (``cat.jpg`` + ``cat.txt``), searched recursively; one unit
    per image, in sorted order of relative path.

    An image without a caption file reads as ``error="missing_caption"`` (with its bytes); a caption file
    without an image as ``error="missing_image"``; a caption that is not UTF-8 as ``bad_caption_encoding``.
    The whole caption file is one caption (a leading BOM dropped), or it is split on ``caption_separator``
    (e.g. ``"\\n"`` for one caption per line). Hidden files and folders (".name") and files that are neither
    images nor ``.txt`` are not read; ``notes`` counts them. Keys are ``f"{label}/{relative path}"``.
    """

    unit_kind: Literal["row"] = "row"

    def __init__(
        self, root: str | Path, *, caption_separator: str | None = None, label: str | None = None
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory of images")
        self.name = str(root)
        self.label = label if label is not None else (self.root.resolve().name or str(self.root))
        self.caption_separator = caption_separator
        images: list[str] = []
        captions: dict[str, str] = {}  # relative path without suffix -> relative .txt path
        spare_captions: list[str] = []
        ignored: Counter[str] = Counter()
        for directory, subdirectories, files in os.walk(self.root):
            hidden = [d for d in subdirectories if d.startswith(".")]
            ignored["hidden"] += len(hidden)
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            relative_dir = Path(directory).relative_to(self.root)
            for file_name in sorted(files):
                relative = (relative_dir / file_name).as_posix()
                suffix = Path(file_name).suffix.lower().lstrip(".")
                if file_name.startswith("."):
                    ignored["hidden"] += 1
                elif suffix in IMAGE_EXTENSIONS:
                    images.append(relative)
                elif suffix == "txt":
                    stem = relative[: -len(".txt")]
                    if stem in captions:  # cat.txt and cat.TXT: the first (sorted) is the caption
                        spare_captions.append(relative)
                    else:
                        captions[stem] = relative
                else:
                    ignored[f".{suffix}" if suffix else "no extension"] += 1
        used: set[str] = set()
        units: list[tuple[str, str | None]] = []  # (image or orphan caption path, caption path)
        for image in images:
            stem = image.rsplit(".", 1)[0]
            caption = captions.get(stem)
            if caption is not None:
                used.add(caption)
            units.append((image, caption))
        orphans = [(c, c) for c in [*captions.values(), *spare_captions] if c not in used]
        self._units = sorted(units + orphans)
        self._orphans = {c for c, _ in orphans}
        if not self._units:
            raise DataError(f"{self.root}: no images (.{', .'.join(sorted(IMAGE_EXTENSIONS))}) found")
        notes = []
        if ignored:
            counts = ", ".join(f"{what}: {n}" for what, n in sorted(ignored.items()) if n)
            if counts:
                notes.append(f"{self.root}: files not read (neither images nor .txt captions): {counts}")
        if orphans:
            notes.append(f"{self.root}: {len(orphans)} .txt files have no image; each reads as missing_image")
        self.notes: tuple[str, ...] = tuple(notes)

    def num_units(self) -> int:
        return len(self._units)

    def num_samples(self) -> int | None:
        return len(self._units)

    def iter_unit(self, index: int) -> Iterator[RawSample]:
        yield self.row(index)

    def row(self, index: int) -> RawSample:
        """Unit ``index`` as a sample; the image and caption files are read here."""
        relative, caption_file = self._units[index]
        key = f"{self.label}/{relative}"
        captions: tuple[str, ...] = ()
        error = None
        if caption_file is None:
            error = MISSING_CAPTION
        else:
            caption_bytes, caption_error = read_image_file(self.root / caption_file)
            if caption_bytes is None:
                error = MISSING_CAPTION if caption_error == MISSING_IMAGE else UNREADABLE_CAPTION_FILE
            else:
                try:
                    captions = split_captions(caption_bytes.decode("utf-8-sig"), self.caption_separator)
                except UnicodeDecodeError:
                    error = BAD_CAPTION_ENCODING
        if relative in self._orphans:
            return RawSample(key, None, captions, str(self.root / relative), MISSING_IMAGE)
        image, image_error = read_image_file(self.root / relative)
        return RawSample(key, image, captions, str(self.root / relative), image_error or error)
