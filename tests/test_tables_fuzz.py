"""Hostile bytes in a table: whatever a .csv/.tsv/.jsonl file holds, opening it for training (TableSource) or for
evaluation (open_eval_dataset) and reading every row gives rows or a DataError whose message starts with the
file (and names the line where one is at fault), never another exception and never a hang. Hypothesis mutates
real tables (quoting, several captions, labels, JSON lists) byte by byte; the cases it and review found are
pinned below it."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipforge.data.raw import DataError, read_image_file
from clipforge.data.tables import TableSource
from clipforge.eval.datasets import open_eval_dataset
from tests.datasets import digit_images

IMAGES, LABELS = digit_images(4)

SEEDS = [
    # CSV: BOM, quoted comma/quote/newline, blank line, absolute and missing paths, labels by name
    (
        "\ufeffFilePath,Title,label\n"
        '0.png,"a dog, running ""fast""\non two lines",one\n'
        "\n"
        "1.png,a cat|a kitten,two\n"
        "missing.png,gone,one\n"
    ).encode(),
    # TSV with integer labels and a caption separator inside a field
    b"image\tcaption\tlabel\n0.png\tone | two |\t0\n1.png\tthree\t1\n2.png\t\t2\n",
    # JSONL: caption lists, null captions, extra fields, an unlabelled row
    "\n".join(
        json.dumps(row, ensure_ascii=False)
        for row in (
            {"image": "0.png", "captions": ["c1", "c2"], "label": 1, "split": "train"},
            {"image": "1.png", "captions": None, "label": 0},
            {"image": "2.png", "captions": "caf\u00e9 \u2028 a line separator in a caption"},
            {"image": "3.png", "captions": ["x"]},
        )
    ).encode()
    + b"\n",
]
# Bytes that mean something to one of the readers, so mutations reach their edge cases quickly.
TOKENS = [
    b'"', b",", b"\t", b"\n", b"\r", b"\r\n", b"\x00", b"{", b"}", b"[", b"]", b":", b"\\", b"|", b"~",
    b"\xff", b"\xc3", b"\xef\xbb\xbf", b"null", b"1e999", b"-", b"\xc2\xb2", b"/dev/zero", b"http://x/", b"~nobody_x/",
    b"[" * 3000, b'"' * 50, b"image", b"label", b"caption", b"9" * 5000,
]  # fmt: skip
# Whole rows a hostile or careless writer produces: nesting deeper than Python's stack, paths no file can have,
# a home folder that does not exist, devices, non-text values, digits int() refuses, duplicate headers.
LINES = [
    b"[" * 3000, b"{}", b"null", b'{"image": null}', b'{"image": 5, "caption": {"a": 1}, "label": [1]}',
    b'{"image": "0\\u0000.png", "caption": "x", "label": 0}', b'{"image": "\\ud800.png", "caption": "a"}',
    b'{"image": "~nobody_x/0.png", "captions": ["x", 3]}', b'{"image": "/dev/zero", "caption": "z", "label": "\xc2\xb2"}',
    b'{"image": "1.png", "label": true, "caption": ""}', b'{"image": "1.png", "label": "' + b"9" * 5000 + b'"}',
    b"~nobody_x/0.png,a,one", b"0.png,a,\xc2\xb2", b"/dev/zero,zero,0", b"1.png,\"unterminated", b"image,image,label",
    b"0.png\x00,a,1", b"2.png\tb\t" + b"9" * 5000, b"http://example.com/a.png,a,1", b"3.png,,",
]  # fmt: skip


SEED_SUFFIXES = [".csv", ".tsv", ".jsonl"]


@st.composite
def mutated_tables(draw: st.DrawFn) -> tuple[bytes, str]:
    """(bytes, suffix): a seed table mutated a few times, mostly under its own suffix (so mutations get past
    the header), sometimes under another one."""
    seed = draw(st.integers(0, len(SEEDS) - 1))
    suffix = draw(st.sampled_from([SEED_SUFFIXES[seed]] * 4 + SEED_SUFFIXES))
    data = bytearray(SEEDS[seed])
    header_end = data.index(b"\n") + 1 if seed < 2 else 0
    for _ in range(draw(st.integers(1, 6))):
        in_body = draw(st.integers(0, 9)) < 9  # mostly after the header, so the rows get read
        position = draw(st.integers(min(header_end, len(data)) if in_body else 0, len(data)))
        kind = draw(st.sampled_from(["insert", "line", "delete", "replace", "duplicate", "truncate"]))
        if (
            kind == "line"
        ):  # a token as a whole line, or at the start of one (a field's or a row's first bytes)
            starts = [0] + [i + 1 for i, byte in enumerate(data) if byte == ord("\n")]
            position = starts[draw(st.integers(1 if in_body and len(starts) > 1 else 0, len(starts) - 1))]
            data[position:position] = draw(st.sampled_from(LINES)) + b"\n"
        elif kind == "insert":
            data[position:position] = draw(st.sampled_from(TOKENS) | st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 16))]
        elif kind == "replace" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        elif kind == "duplicate":
            end = min(len(data), position + draw(st.integers(1, 40)))
            data[end:end] = data[position:end]
        elif kind == "truncate":
            del data[position:]
    return bytes(data), suffix


def _check(path: Path, read) -> None:
    """``read(path)`` may raise only a DataError whose message starts with the file, and must be quick."""
    started = time.perf_counter()
    try:
        read(path)
    except DataError as exc:
        message = str(exc)
        assert message.startswith(str(path)), message
        assert re.match(rf"{re.escape(str(path))}(:\d+)?[: ]", message), message
    assert time.perf_counter() - started < 5, f"{path}: reading took {time.perf_counter() - started:.1f} s"


def _read_for_training(path: Path, **options) -> None:
    source = TableSource(path, **options)
    for index in range(source.num_units()):
        source.row(index)
        source.entry(index)


def _read_for_evaluation(path: Path) -> None:
    dataset = open_eval_dataset(path, caption_separator="|")
    list(dataset)
    list(dataset.subset(2))
    dataset.fingerprint()
    dataset.describe()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    for index, image in enumerate(IMAGES):
        image.save(folder / f"{index}.png")
    return folder


def test_seed_tables_read_as_expected(image_folder: Path) -> None:
    """The seeds themselves are good tables (so the mutations start from real data)."""
    csv_path = image_folder / "seed.csv"
    csv_path.write_bytes(SEEDS[0])
    source = TableSource(csv_path, caption_separator="|")
    assert [source.row(i).captions for i in range(3)] == [
        ('a dog, running "fast"\non two lines',),
        ("a cat", "a kitten"),
        ("gone",),
    ]
    dataset = open_eval_dataset(csv_path, caption_separator="|")
    assert dataset.classnames == ["one", "two"] and [s.label for s in dataset] == [0, 1]
    assert dataset.skipped == {"image_missing": 1}
    jsonl = image_folder / "seed.jsonl"
    jsonl.write_bytes(SEEDS[2])
    captions = [("c1", "c2"), (), ("caf\u00e9 \u2028 a line separator in a caption",), ("x",)]
    assert [s.captions for s in open_eval_dataset(jsonl)] == captions


@settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(table=mutated_tables())
def test_any_bytes_give_rows_or_a_data_error_naming_the_file(
    image_folder: Path, table: tuple[bytes, str]
) -> None:
    data, suffix = table
    path = image_folder / f"table{suffix}"
    path.write_bytes(data)
    _check(path, _read_for_training)
    _check(path, lambda p: _read_for_training(p, on_bad_row="report", caption_separator="|"))
    _check(path, _read_for_evaluation)


_DEEP = b'{"image": "0.png", "caption": ' + b"[" * 100_000 + b"\n"
_NOT_JSON = r"deep.jsonl:1: not valid JSON"
_WIDE = r"wide.csv:1: duplicate column names \['c'\]"


@pytest.mark.parametrize(
    "name, content, training_error, evaluation_error",
    [
        ("deep.jsonl", _DEEP, _NOT_JSON, _NOT_JSON),
        ("nul.csv", b"image,caption\n0\x00.png,a\n", None, None),
        ("home.csv", b"image,caption\n~nobody_clipforge/0.png,a\n", None, None),
        ("wide.csv", b",".join([b"c"] * 200_000) + b"\n", _WIDE, _WIDE),
        ("list_label.jsonl", b'{"image": "0.png", "caption": "a", "label": [1]}\n', None,
         r"list_label.jsonl:1: column 'label' holds list"),
        ("digit.csv", "image,caption,label\n0.png,a,\u00b2\n1.png,b,3\n".encode(), None,
         "mixes class names and integer labels"),
        ("devzero.csv", b"image,caption\n/dev/zero,a\n", None, None),
        ("cr.csv", b"image,caption\r0.png,a\r1.png,b\r", None, None),
    ],
)  # fmt: skip
def test_hostile_tables_found_by_review_and_fuzzing(
    image_folder, name, content, training_error, evaluation_error
) -> None:
    """Each of these raised another exception (RecursionError, ValueError, RuntimeError, TypeError), took
    minutes (O(columns²)) or read forever (/dev/zero) before; now: rows, or the DataError shown."""
    path = image_folder / name
    path.write_bytes(content)
    _check(path, lambda p: _read_for_training(p, on_bad_row="report"))
    for read, expected in ((_read_for_training, training_error), (_read_for_evaluation, evaluation_error)):
        if expected is None:
            read(path)
            continue
        with pytest.raises(DataError, match=expected):
            read(path)


def test_table_rows_naming_special_files_never_block(image_folder: Path) -> None:
    """A FIFO or device named by a row is unreadable, not read: a plain open of a FIFO waits for a writer."""
    fifo = image_folder / "pipe.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    assert read_image_file(fifo) == (None, "unreadable_image_file")
    assert read_image_file(Path("/dev/zero")) == (None, "unreadable_image_file")
    assert read_image_file(image_folder / "a\x00b.png") == (None, "missing_image")
    assert read_image_file(image_folder / "0.png")[0][:8] == b"\x89PNG\r\n\x1a\n"
    table = image_folder / "pipe.csv"
    table.write_text("image,caption,label\npipe.png,a pipe,0\n0.png,a digit,1\n")
    assert TableSource(table).row(0).error == "unreadable_image_file"
    dataset = open_eval_dataset(table)
    assert [s.key for s in dataset] == ["pipe.csv:3"] and dataset.skipped == {"image_unreadable": 1}


def test_lone_carriage_returns_end_csv_lines(tmp_path: Path) -> None:
    """Old Mac files end lines with a lone \\r; a \\r inside quotes stays in the field; keys are start lines."""
    table = tmp_path / "mac.csv"
    table.write_bytes(b'image,caption\r0.png,"a\rb"\r1.png,b\r\n2.png,c\n')
    source = TableSource(table)
    rows = [source.row(i) for i in range(source.num_units())]
    assert [(r.key, r.captions) for r in rows] == [
        ("mac.csv:2", ("a\rb",)),
        ("mac.csv:4", ("b",)),
        ("mac.csv:5", ("c",)),
    ]
