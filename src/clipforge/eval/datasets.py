"""Evaluation datasets: class-per-folder trees, CSV/TSV/JSONL tables with labels and/or captions, and webdataset
shards, opened by one function, :func:`open_eval_dataset`, and streamed in batches.

The dataset object, its backends and batching are :mod:`clipforge.eval.dataset`; its names are importable from
here too, where users have always found them.

Layouts
-------
Tables and class folders are the training data sources (:class:`~clipforge.data.tables.TableSource`, whose
:func:`~clipforge.data.tables.interpret_row` says what a row means, and
:class:`~clipforge.data.folders.ClassFolderSource`); this module adds only the label rules.

* **Class folders**: ``ROOT/<class>/**/<image>``; class names are the folder names, sorted (or ``classnames``).
* **Tables**: an image-path column (``image``, ``image_path``, ``filepath``, ``file``, ``path``, ``filename``),
  a label column (``label_field``: an int, or a class name), caption column(s) (``caption_field``, or detected:
  ``caption``, ``captions``, ``text``, ``title``, ``description``); several captions per image come from a
  ``caption_separator`` (CSV) or a JSON list (JSONL). Paths are relative to the table's folder.
* **Shards** (``.tar`` / folder / ``{000..009}`` pattern): label from the sample's json field ``label_field``
  (an int) or its ``.cls`` member; class names from ``classes.json`` (``{label_field: [names]}`` or a list) or
  ``classes.txt`` (one name per line) beside the shards or in their parent folder, else from the json ``class``
  field. The built-in dataset's layout ``DIR/{train,val,test}/shard-*.tar`` + ``DIR/classes.json`` is read with
  ``split=``.
* A folder of images with ``.txt`` captions (no labels), for retrieval.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipforge.data.folders import ClassFolderSource
from clipforge.data.raw import IMAGE_EXTENSIONS, MALFORMED_ROW, DataError, DataNotFoundError, RawSample
from clipforge.data.shards import MANIFEST_NAME
from clipforge.data.sources import SHARD_SUFFIXES, open_source
from clipforge.data.tables import TABLE_SUFFIXES, TableRow, TableSource
from clipforge.eval.dataset import (
    BAD_LABEL,
    MISSING_LABEL,
    EvalBatch,
    EvalDataset,
    EvalSample,
    _Record,
    _RecordBackend,
    _SourceBackend,
    parse_int_label,
)

SPLIT_NAMES = ("train", "val", "validation", "test")


def open_eval_dataset(
    spec: str | Path,
    *,
    split: str | None = None,
    label_field: str = "label",
    classnames: Sequence[str] | str | Path | None = None,
    caption_field: str | Sequence[str] | None = None,
    caption_separator: str | None = None,
    image_field: str | None = None,
) -> EvalDataset:
    """Open an evaluation dataset from a folder, table or shard spec (see the module docstring).

    ``split`` picks ``spec/split`` (e.g. the built-in dataset's ``test``). ``classnames`` is a list, or a file
    (see :func:`read_classnames_file`), overriding the names the data gives. Raises :class:`DataError` (a
    ``ValueError``) naming the file and the fix, :class:`DataNotFoundError` when nothing is there.
    """
    text = str(spec)
    given = _given_classnames(classnames)
    if any(c in text for c in "*?[{"):
        if split is not None:
            raise DataError(f"{text!r}: split={split!r} picks a subfolder of a folder spec, not of a pattern")
        return _open_shards(text, None, label_field, given, split)
    path = Path(text).expanduser()
    if split is not None:
        base = path
        path = base / split
        if not path.is_dir():
            found = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
            raise DataNotFoundError(
                f"{base}: no split folder {split!r}" + (f"; the subfolders are {found}" if found else "")
            )
    if not path.exists():
        raise DataNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name.lower().endswith(SHARD_SUFFIXES):
            return _open_shards(text if split is None else str(path), path, label_field, given, split)
        if path.suffix.lower() in TABLE_SUFFIXES:
            return _open_table(path, label_field, given, caption_field, caption_separator, image_field, split)
        raise DataError(
            f"{path}: cannot read this kind of file as evaluation data; expected a .csv/.tsv/.jsonl table, "
            ".tar shards, or a folder"
        )
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if (
        any(p.is_file() and p.name.lower().endswith(SHARD_SUFFIXES) for p in entries)
        or (path / MANIFEST_NAME).exists()
    ):
        return _open_shards(str(path), path, label_field, given, split)
    folders = sorted(p for p in entries if p.is_dir())
    images_here = [p for p in entries if p.is_file() and _is_image(p)]
    if split is None and folders and not images_here and {p.name for p in folders} <= set(SPLIT_NAMES):
        raise DataError(
            f"{path}: holds the splits {[p.name for p in folders]}; pick one with split=... (--split on the "
            "command line)"
        )
    if folders:
        return _open_class_folders(path, given, split)
    if images_here:
        source = (
            open_source(path, caption_separator=caption_separator) if caption_separator else open_source(path)
        )
        files = sorted(p for p in path.rglob("*") if p.is_file())
        settings = {"split": split, "caption_separator": caption_separator}
        return EvalDataset(
            str(path), "image_folder", _SourceBackend(source, _no_label), given, files, settings,
            notes=list(getattr(source, "notes", ())),
        )  # fmt: skip
    raise DataError(f"{path}: no images, class folders, shards or tables found")


def _is_image(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def _given_classnames(classnames: Sequence[str] | str | Path | None) -> list[str] | None:
    if classnames is None:
        return None
    if isinstance(classnames, (str, Path)):
        return read_classnames_file(classnames)
    names = [str(n) for n in classnames]
    if not names:
        raise DataError("classnames is empty; give one name per class")
    return names


def read_classnames_file(path: str | Path, label_field: str = "label") -> list[str]:
    """Class names in label order from ``.txt`` (one per line, blank lines skipped) or ``.json`` (a list, or
    ``{label_field: [names]}`` as in ``classes.json``)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataNotFoundError(f"{path}: class-name file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the class-name file ({exc}); save it as UTF-8 text") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict):
            if label_field in data:
                data = data[label_field]
            elif len(data) == 1:
                data = next(iter(data.values()))
            else:
                raise DataError(
                    f"{path}: holds class lists for {sorted(data)} but none for the label field {label_field!r}; "
                    "pass --label-field naming one of them"
                )
        if not isinstance(data, list) or not all(isinstance(n, str) and n.strip() for n in data) or not data:
            raise DataError(f"{path}: expected a non-empty list of class-name strings (in label order)")
        return [n.strip() for n in data]
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names (expected one per line, in label order)")
    return names


def _open_class_folders(root: Path, given: list[str] | None, split: str | None) -> EvalDataset:
    source = ClassFolderSource(root)  # the labels come from the folder names, through the data source
    entries = source.entries()
    records = [_Record(e.key, str(e.path), e.label, ()) for e in entries]
    names = source.classnames
    if given is not None:
        if len(given) != len(names):
            raise DataError(
                f"{root}: {len(names)} class folders but {len(given)} class names were given; give one name per "
                "folder, in the sorted order of the folder names"
            )
        names = given
    settings = {"split": split, "class_folders": source.classnames}
    files = [e.path for e in entries]
    return EvalDataset(
        str(root), "class_folders", _RecordBackend(records), names, files, settings, source.notes
    )


_TABLE_OPTION_NAMES = {"image_column": "image_field", "caption_column": "caption_field"}


def _open_table(
    path: Path,
    label_field: str,
    given: list[str] | None,
    caption_field: str | Sequence[str] | None,
    caption_separator: str | None,
    image_field: str | None,
    split: str | None,
) -> EvalDataset:
    """A table read by the training reader (:class:`~clipforge.data.tables.TableSource`): what a row means is
    :func:`~clipforge.data.tables.interpret_row`; the label column is one of the row's other fields."""
    source = TableSource(
        path, image_column=image_field, caption_column=caption_field, caption_separator=caption_separator or None,
        captions="optional", option_names=_TABLE_OPTION_NAMES,
    )  # fmt: skip
    rows = [source.entry(index) for index in range(source.num_units())]
    has_labels = label_field in source.columns
    raw_labels = [_raw_label(path, row, label_field) for row in rows]
    named = {v for v in raw_labels if isinstance(v, str) and parse_int_label(v) is None}
    numeric = any(v is not None and v not in named for v in raw_labels)
    classnames = given
    label_index = None
    if named:
        if numeric:
            raise DataError(
                f"{path}: column {label_field!r} mixes class names and integer labels; use one or the other"
            )
        classnames = given if given is not None else sorted(named)
        label_index = {name: index for index, name in enumerate(classnames)}
        unknown = sorted(named - set(label_index))
        if unknown:
            raise DataError(
                f"{path}: label(s) {unknown[:5]} in column {label_field!r} are not among the {len(label_index)} "
                "class names given; fix the table or the class-name file"
            )
    records: list[_Record] = []
    files = [path]
    for row, raw_label in zip(rows, raw_labels):
        if row.image_path is None or row.error == MALFORMED_ROW:
            raise DataError(f"{path}:{row.line}: {row.problem}")
        captions = tuple(c for c in row.captions if c.strip())  # a blank caption is no caption
        records.append(_Record(f"{path.name}:{row.line}", row.image_path.as_posix(), raw_label, captions))
        files.append(row.image_path)
    settings = {
        "split": split,
        "label_field": label_field if has_labels else None,
        "caption_fields": list(source.caption_columns),
        "caption_separator": caption_separator,
        "image_field": source.image_column,
    }
    return EvalDataset(str(path), "table", _RecordBackend(records), classnames, files, settings,
                       notes=source.notes, label_index=label_index)  # fmt: skip


def _raw_label(path: Path, row: TableRow, label_field: str) -> Any:
    """A row's label as stored: stripped text (empty: none), a JSON number, or None."""
    value = row.fields.get(label_field)
    if isinstance(value, str):
        value = value.strip() or None
    if isinstance(value, (list, dict)):
        raise DataError(
            f"{path}:{row.line}: column {label_field!r} holds {type(value).__name__} {str(value)[:40]}; expected "
            "an integer label or a class name"
        )
    return value


def _open_shards(
    spec: str, path: Path | None, label_field: str, given: list[str] | None, split: str | None
) -> EvalDataset:
    source = open_source(spec)
    shard_paths = list(getattr(source, "paths", []))
    folder = (
        path if path is not None and path.is_dir() else (shard_paths[0].parent if shard_paths else Path("."))
    )
    label_of = _ShardLabel(label_field)
    classnames, origin = given, "given"
    if classnames is None:
        classnames, origin = _classes_beside(folder, label_field)
    backend = _SourceBackend(source, label_of)
    files = list(shard_paths) + [p for p in (folder / MANIFEST_NAME,) if p.exists()]
    settings = {"split": split, "label_field": label_field, "classnames_from": origin}
    classnames_from = None
    if classnames is None:
        classnames_from = functools.partial(_classes_from_class_field, backend)
    return EvalDataset(spec, "shards", backend, classnames, files, settings,
                       notes=list(getattr(source, "notes", ())), classnames_from=classnames_from)  # fmt: skip


class _ShardLabel:
    """A shard sample's raw label: its json field ``label_field``, else its ``.cls`` member (a class, not a
    closure, so datasets pickle for spawned DataLoader workers)."""

    def __init__(self, label_field: str) -> None:
        self.label_field = label_field

    def __call__(self, sample: RawSample) -> int | str | None:
        value = sample.extra.get(self.label_field)
        if value is None:
            value = sample.extra.get("cls")
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace").strip()
        return value


def _no_label(sample: RawSample) -> None:
    return None


def _classes_beside(folder: Path, label_field: str) -> tuple[list[str] | None, str]:
    for directory in (folder, folder.parent):
        for name in ("classes.json", "classes.txt"):
            candidate = directory / name
            if candidate.is_file():
                return read_classnames_file(candidate, label_field), str(candidate)
    return None, "none"


def _classes_from_class_field(backend: _SourceBackend) -> list[str] | None:
    """Class names from the samples' json ``class`` field, by label (one pass over the shards, no decoding)."""
    names: dict[int, str] = {}
    for unit in range(backend.num_units()):
        for sample in backend.source.iter_unit(unit):
            if not isinstance(sample, RawSample):
                continue
            name, label = sample.extra.get("class"), backend.label_of(sample)
            if isinstance(label, str):
                label = parse_int_label(label)
            elif isinstance(label, bool) or not isinstance(label, int):
                label = None
            if (
                isinstance(name, str)
                and label is not None
                and label >= 0
                and names.setdefault(label, name) != name
            ):
                raise DataError(
                    f"{sample.key}: label {label} is class {name!r} here but {names[label]!r} elsewhere; "
                    "fix the shards' json 'class' fields or give the class names with a classes.json"
                )
    if not names:
        return None
    return [names.get(i, f"class {i}") for i in range(max(names) + 1)]


__all__ = [
    "BAD_LABEL",
    "MISSING_LABEL",
    "SPLIT_NAMES",
    "EvalBatch",
    "EvalDataset",
    "EvalSample",
    "open_eval_dataset",
    "read_classnames_file",
]
