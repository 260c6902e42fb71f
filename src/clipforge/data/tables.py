"""CSV/TSV/JSONL tables of (image path, captions, other fields): the one table reader, for training and evaluation.

:func:`interpret_row` is the one rule for what a row means (its image path, its captions, its other fields such
as labels and class names); :class:`TableSource` serves rows as :class:`RawSample` s (training) and as
:class:`TableRow` s without reading any image (evaluation, which needs every row's label when it opens).

Each row is one unit. Opening a table scans it once, checks every row, and keeps only each row's byte offset
and line number, so tables of millions of rows stay small in memory and any row can be read on its own (by
any DataLoader worker) with one positioned read.

Bad rows: by default (``on_bad_row="error"``) a row that is not valid text in the table's encoding, has the
wrong number of fields, or (JSONL) is not a JSON object raises :class:`DataError` naming the file and line
while the table is opened: a table is usually hand-made, and a silently skipped row hides a bug. With
``on_bad_row="report"`` such rows stay units and read as ``RawSample(error="malformed_row")``, and
``notes`` says which lines they are. Blank lines are not rows. Any bytes at all give rows or a
:class:`DataError` whose message starts with the file (and names the line); never another exception.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from clipforge.data.raw import (
    MALFORMED_ROW,
    MISSING_CAPTION,
    MISSING_IMAGE,
    DataError,
    RawSample,
    read_image_file,
)

IMAGE_COLUMNS = ("image", "image_path", "filepath", "file", "path", "filename")
CAPTION_COLUMNS = ("caption", "captions", "text", "title", "description")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}
_UTF8 = {"utf-8", "utf8", "utf-8-sig", "utf_8", "utf_8_sig"}
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_MAX_NOTED_LINES = 10
_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")  # the empty match after a \r that no \n follows


def split_captions(text: str, separator: str | None) -> tuple[str, ...]:
    """``(text,)``, or the non-blank pieces of ``text`` split on ``separator`` (``("",)`` if none are left)."""
    if separator is None:
        return (text,)
    pieces = tuple(piece for piece in text.split(separator) if piece.strip())
    return pieces or ("",)


@dataclass(frozen=True)
class TableRow:
    """What one table row means, before any file is read. ``error`` is a :class:`RawSample` error category
    (``missing_image``, ``missing_caption``, ``malformed_row``) and ``problem`` says what is wrong in words,
    naming the column; ``fields`` are the columns other than the image and caption ones (labels, classes...)."""

    key: str
    line: int
    image_path: Path | None  # None: the row names no image file
    captions: tuple[str, ...]
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    problem: str | None = None


def interpret_row(
    key: str,
    line: int,
    fields: Mapping[str, Any],
    *,
    image_column: str,
    caption_columns: Sequence[str],
    caption_separator: str | None,
    root: Path,
) -> TableRow:
    """The one rule for what a table row means, for training and evaluation alike.

    Captions: each caption column in turn gives its text split by :func:`split_captions`, or (JSONL) its list
    of strings; an absent or null column gives nothing. A row whose caption columns all give nothing is
    ``missing_caption`` (unless there are no caption columns); a number, object or list of non-strings is
    ``malformed_row``. Image: an empty, absent or null path is ``missing_image``, a non-string one
    ``malformed_row`` (these win over caption problems); the path is stripped, ``~`` expanded, and taken
    relative to ``root`` unless absolute.
    """
    rest = {k: v for k, v in fields.items() if k != image_column and k not in caption_columns}
    captions: list[str] = []
    error = problem = None
    given = 0
    for column in caption_columns:
        value = fields.get(column)
        if isinstance(value, str):
            captions.extend(split_captions(value, caption_separator))
        elif isinstance(value, list) and all(isinstance(c, str) for c in value):
            captions.extend(value)
        elif value is not None:
            error = MALFORMED_ROW
            problem = f"caption column {column!r} holds {_shown(value)}; expected text or a list of texts"
            continue
        else:
            continue
        given += 1
    if caption_columns and not given and error is None:
        error, problem = MISSING_CAPTION, f"no caption in column(s) {', '.join(map(repr, caption_columns))}"
    image = fields.get(image_column)
    if not isinstance(image, str) or not image.strip():
        malformed = image is not None and not isinstance(image, str)
        what = f"holds {_shown(image)}, not an image path" if malformed else "is empty"
        return TableRow(key, line, None, tuple(captions), rest, MALFORMED_ROW if malformed else MISSING_IMAGE,
                        f"the image path in column {image_column!r} {what}")  # fmt: skip
    # os.path.expanduser, not Path's: an unknown "~user" stays as written instead of raising RuntimeError
    path = root / os.path.expanduser(image.strip())  # "a.jpg, caption" tables pad with spaces
    return TableRow(key, line, path, tuple(captions), rest, error, problem)


def _csv_lines(file: io.BufferedReader) -> Iterator[bytes]:
    """A CSV/TSV file's lines with their endings: ``\\n``, ``\\r\\n``, or a lone ``\\r`` (old Mac files, which
    csv reads in universal-newline mode), so the byte offsets of rows stay exact."""
    for piece in file:
        if b"\r" not in piece[:-2]:
            yield piece
        else:
            yield from (line for line in _LONE_CR.split(piece) if line)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _stamp(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_size, stat.st_mtime_ns


class TableSource:
    """A CSV (comma), TSV (tab) or JSONL table with an image-path column and caption column(s); one unit per row.

    Columns are found by name (case-insensitive; :data:`IMAGE_COLUMNS`, :data:`CAPTION_COLUMNS`, first match
    wins) unless ``image_column`` / ``caption_column`` (a name, or several) are given; ``columns`` names the
    columns of a CSV/TSV without a header row. ``captions="optional"`` lets a table have no caption column
    (evaluation tables with labels only). CSV/TSV use standard quoting (fields with commas, quotes or newlines
    in double quotes); a UTF-8 byte-order mark is ignored; ``encoding`` must be ASCII-compatible (utf-8,
    latin-1, ...). Image paths are relative to ``root`` if given, else to the table's folder (absolute paths
    are kept). What a row means is :func:`interpret_row`; its other fields go to ``RawSample.extra``. Keys are
    ``f"{label}:{line}"``, the line where the row starts (``label`` defaults to the file name).
    ``option_names`` are the caller's names for ``image_column`` / ``caption_column``, for messages.

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
        caption_column: str | Sequence[str] | None = None,
        caption_separator: str | None = None,
        root: str | Path | None = None,
        columns: Sequence[str] | None = None,
        encoding: str = "utf-8",
        on_bad_row: Literal["error", "report"] = "error",
        label: str | None = None,
        captions: Literal["required", "optional"] = "required",
        option_names: Mapping[str, str] | None = None,
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
        self._captions_required = captions == "required"
        self._option_names = {"image_column": "image_column", "caption_column": "caption_column"}
        self._option_names.update(option_names or {})
        self._columns = list(columns) if columns is not None else None
        self._header_line = 1
        # Byte offset where each row starts, plus one entry where the last one ends.
        self._starts = array("q")
        self._lines = array("q")  # line number where each row starts
        self._bad = array("b")  # 1 for a malformed row (on_bad_row="report")
        self._bad_lines: list[str] = []
        self._fd: int | None = None
        self._scan()
        notes = []
        if self._bad_lines:
            shown = ", ".join(self._bad_lines[:_MAX_NOTED_LINES])
            more = (
                "" if len(self._bad_lines) <= _MAX_NOTED_LINES else f" and {len(self._bad_lines) - 10} more"
            )
            notes.append(f"{self.path}: {len(self._bad_lines)} malformed rows read as errors: {shown}{more}")
        self.notes: tuple[str, ...] = tuple(notes)

    def _scan(self) -> None:
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
        except OSError as exc:  # no permission, an I/O error
            raise DataError(f"{self.path}: cannot read the table ({exc.strerror or exc})") from None

    @property
    def columns(self) -> list[str]:
        """The table's column names (CSV/TSV: the header; JSONL: every key any row has, in order of appearance)."""
        return list(self._header)

    @property
    def caption_column(self) -> str | None:
        """The first caption column (None when a table opened with ``captions="optional"`` has none)."""
        return self.caption_columns[0] if self.caption_columns else None

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
        entry = self.entry(index)
        if self._bad[index]:
            return RawSample(entry.key, None, (), entry.key, MALFORMED_ROW)
        if entry.image_path is None:
            shown = f"{entry.key} (no image path)"
            return RawSample(entry.key, None, entry.captions, shown, entry.error, entry.fields)
        image, image_error = read_image_file(entry.image_path)
        return RawSample(
            entry.key, image, entry.captions, str(entry.image_path), image_error or entry.error, entry.fields
        )

    def entry(self, index: int) -> TableRow:
        """Row ``index`` (0-based, data rows only) as :func:`interpret_row` reads it; no image file is read."""
        if not 0 <= index < len(self._lines):
            raise IndexError(f"{self.path}: row {index} out of range (the table has {len(self._lines)} rows)")
        line = self._lines[index]
        key = f"{self.label}:{line}"
        if self._bad[index]:
            return TableRow(key, line, None, (), {}, MALFORMED_ROW, "a malformed row (see the table's notes)")
        chunk = self._read(self._starts[index], self._starts[index + 1])
        text = self._decode(chunk, self._starts[index], line)
        if self._delimiter is None:
            fields = dict(json.loads(text))  # checked while scanning: a JSON object
        else:
            reader = csv.reader(io.StringIO(text, newline=""), delimiter=self._delimiter)
            values = next((r for r in reader if r), None)
            if values is None:  # the scan found a row here; only a changed file reads otherwise
                raise DataError(f"{self.path}:{line}: the row is gone; the table changed after it was opened")
            fields = dict(zip(self._header, values))
        return interpret_row(
            key, line, fields, image_column=self.image_column, caption_columns=self.caption_columns,
            caption_separator=self.caption_separator, root=self.root,
        )  # fmt: skip

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
            for number, raw in enumerate(_csv_lines(file), 1):
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
                header, self._header_line = [c.strip() for c in record], line
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
        duplicates = sorted(c for c, n in Counter(header).items() if n > 1)  # not header.count: O(columns²)
        if duplicates:
            where = f"{self.path}:{self._header_line}" if have_header else f"{self.path} (columns=)"
            raise DataError(f"{where}: duplicate column names {duplicates}; rename them so no field is lost")
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
                except RecursionError:  # json nests deeper than Python's stack
                    record, bad_reason = None, "not valid JSON here (nested too deeply)"
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
        found = ", ".join(repr(c) for c in header) or "(none)"
        where = (
            f"{self.path}:{self._header_line}" if have_header and self._delimiter is not None else self.path
        )
        names = self._option_names
        requested_image, requested_caption = self._requested
        requested_captions = [requested_caption] if isinstance(requested_caption, str) else requested_caption
        for requested, option in ((requested_image, "image_column"), (requested_caption, "caption_column")):
            wanted = [requested] if isinstance(requested, str) else list(requested or [])
            missing = [r for r in wanted if r not in header]
            if missing:
                shown = requested if isinstance(requested, str) else missing
                raise DataError(
                    f"{where}: {names[option]}={shown!r} is not a column; the columns are {found}"
                )
        hint = ""
        if any(c.lower() == "url" for c in header):
            hint = "; a 'url' column means image URLs: download them first (e.g. with img2dataset)"
        elif have_header:
            hint = "; if the file has no header row, pass columns=[...] naming its columns"

        def detect(candidates: Sequence[str], option: str, what: str, required: bool) -> str | None:
            lower = {c.lower(): c for c in reversed(header)}
            match = next((lower[c] for c in candidates if c in lower), None)
            if match is None and required:
                raise DataError(
                    f"{where}: no {what} column: the columns are {found}, none named one of "
                    f"{', '.join(candidates)}; pass {names[option]}='<name>'{hint}"
                )
            return match

        self.image_column: str = requested_image or detect(IMAGE_COLUMNS, "image_column", "image", True)  # type: ignore[assignment]
        if requested_captions is not None:
            self.caption_columns: tuple[str, ...] = tuple(requested_captions)
        else:
            detected = detect(CAPTION_COLUMNS, "caption_column", "caption", self._captions_required)
            self.caption_columns = (detected,) if detected is not None else ()

    def _check_not_url(self, value: Any, line: int) -> None:
        if isinstance(value, str) and _URL.match(value.strip()):
            raise DataError(
                f"{self.path}:{line}: the image column {self.image_column!r} holds URLs ({value[:80]!r}); "
                "clipforge reads local files: download the images first (e.g. with img2dataset)"
            )
