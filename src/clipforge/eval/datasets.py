"""Evaluation datasets: class-per-folder trees, CSV/TSV/JSONL tables with labels and/or captions, and webdataset
shards, opened by one function, :func:`open_eval_dataset`, and streamed in batches.

Images are never all held at once: a dataset keeps file paths (trees, tables) or shard paths, and images are
read and decoded in the DataLoader workers that preprocess them. Images that cannot be used are skipped and
counted by reason (``image_corrupt``, ``image_missing``, ``missing_image``, ``truncated_shard``, ...).

Layouts
-------
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

import csv
import functools
import hashlib
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.data.raw import IMAGE_EXTENSIONS, MISSING_CAPTION, DataError, DataNotFoundError, RawSample
from clipforge.data.shards import MANIFEST_NAME
from clipforge.data.sources import SHARD_SUFFIXES, Source, open_source
from clipforge.data.tables import CAPTION_COLUMNS, IMAGE_COLUMNS
from clipforge.images import ImageLoadError, load_image

log = logging.getLogger("clipforge.eval")

SPLIT_NAMES = ("train", "val", "validation", "test")
_RECORDS_PER_UNIT = 256  # class-folder/table records handed to a worker at a time
_POSITION_BITS = 32  # shard samples are ordered by (shard index << 32) | position in the shard
MISSING_LABEL = "missing_label"
BAD_LABEL = "bad_label"


@dataclass(frozen=True)
class EvalSample:
    """One evaluation image, decoded, with its label (None when the data has none) and captions."""

    key: str
    image: Image.Image
    label: int | None
    captions: tuple[str, ...]


@dataclass
class EvalBatch:
    """Preprocessed images and what belongs to them; ``order`` is each image's position in stored order (to
    restore it after several workers), ``skipped`` what this worker skipped since its previous batch."""

    images: torch.Tensor  # [b, 3, S, S] float32
    labels: torch.Tensor  # [b] int64, -1 where the sample has no label
    keys: list[str]
    captions: list[tuple[str, ...]]
    order: torch.Tensor  # [b] int64
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Item:
    """A raw sample: where its image comes from (bytes or a path), nothing decoded."""

    order: int
    key: str
    data: bytes | str | None  # encoded bytes, or a file path
    label: int | str | None  # raw: resolved by EvalDataset._label
    captions: tuple[str, ...]
    error: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# Backends: lists of records (class folders, tables) and data sources (shards, captioned folders)


@dataclass(frozen=True)
class _Record:
    key: str
    path: str
    label: int | str | None
    captions: tuple[str, ...]


class _RecordBackend:
    """Records held in memory (paths and labels, never images), handed out in units of a few hundred."""

    def __init__(self, records: Sequence[_Record], positions: Sequence[int] | None = None) -> None:
        self.records = list(records)
        self.positions = list(positions) if positions is not None else list(range(len(self.records)))

    def __len__(self) -> int:
        return len(self.records)

    def num_units(self) -> int:
        return math.ceil(len(self.records) / _RECORDS_PER_UNIT)

    def iter_unit(self, unit: int, limit: int | None = None) -> Iterator[_Item]:
        start = unit * _RECORDS_PER_UNIT
        for index in range(start, min(start + _RECORDS_PER_UNIT, len(self.records))):
            r = self.records[index]
            yield _Item(self.positions[index], r.key, r.path, r.label, r.captions)

    def subset(self, max_samples: int) -> _RecordBackend:
        """A class-balanced subset in stored order: classes take turns (each giving its next record in stored
        order) until ``max_samples`` are chosen, so every class is present when ``max_samples`` >= the number
        of classes; unlabelled records are one group, and so are taken in stored order."""
        if max_samples >= len(self.records):
            return self
        groups: dict[Any, list[int]] = {}
        for index, record in enumerate(self.records):
            groups.setdefault(record.label, []).append(index)
        turns = sorted(
            ((rank, group) for group, members in enumerate(groups.values()) for rank in range(len(members))),
        )
        members = list(groups.values())
        picks = sorted(members[group][rank] for rank, group in turns[:max_samples])
        return _RecordBackend([self.records[i] for i in picks], [self.positions[i] for i in picks])

    def find(self, keys: set[str]) -> Iterator[_Item]:
        for index, r in enumerate(self.records):
            if r.key in keys:
                yield _Item(self.positions[index], r.key, r.path, r.label, r.captions)


class _SourceBackend:
    """A :class:`~clipforge.data.sources.Source` (shards or a captioned folder) with a label rule."""

    def __init__(self, source: Source, label_of: Callable[[RawSample], int | str | None]) -> None:
        self.source = source
        self.label_of = label_of
        self.quota: list[int] | None = None  # samples to take from each unit (max_samples), None: all
        self._counts: list[int] | None = getattr(source, "counts", None)

    def unit_counts(self) -> list[int]:
        """Samples stored per unit: from the manifest, or counted once by reading the shards (not decoding)."""
        if self._counts is None:
            self._counts = [
                sum(1 for s in self.source.iter_unit(u) if isinstance(s, RawSample))
                for u in range(self.source.num_units())
            ]
        return self._counts

    def __len__(self) -> int:
        counts = self.unit_counts()
        return sum(counts) if self.quota is None else sum(self.quota)

    def num_units(self) -> int:
        return self.source.num_units()

    def iter_unit(self, unit: int, limit: int | None = None) -> Iterator[_Item]:
        quota = self.quota[unit] if self.quota is not None else None
        if quota == 0:
            return
        for position, sample in enumerate(self.source.iter_unit(unit)):
            order = (unit << _POSITION_BITS) | position
            if not isinstance(sample, RawSample):  # a UnitError: the rest of the shard is lost
                yield _Item(order, f"{sample.unit}#error", None, None, (), sample.reason)
                log.warning("%s", sample.message)
                return
            error = sample.error
            if error == MISSING_CAPTION and sample.image is not None:
                error = None  # an unlabelled, uncaptioned image is still an image
            raw_label = self.label_of(sample)
            yield _Item(order, sample.key, sample.image, raw_label, tuple(sample.captions), error)
            if quota is not None and position + 1 >= quota:
                return

    def subset(self, max_samples: int) -> _SourceBackend:
        """The first ``max_samples`` samples in stored order."""
        counts = self.unit_counts()
        if max_samples >= sum(counts):
            return self
        subset = _SourceBackend(self.source, self.label_of)
        subset._counts = counts
        left, quota = max_samples, []
        for count in counts:
            quota.append(min(count, left))
            left -= quota[-1]
        subset.quota = quota
        return subset

    def find(self, keys: set[str]) -> Iterator[_Item]:
        left = set(keys)
        for unit in range(self.num_units()):
            for item in self.iter_unit(unit):
                if item.key in left:
                    left.discard(item.key)
                    yield item
            if not left:
                return


_Backend = _RecordBackend | _SourceBackend


# ----------------------------------------------------------------------------------------------------------------
# The dataset


class EvalDataset:
    """An evaluation dataset; see the module docstring for the layouts. Iterate it for decoded
    :class:`EvalSample` s (bad images skipped, counted in :attr:`skipped`), or call :meth:`batches` for
    preprocessed tensors from DataLoader workers."""

    def __init__(
        self,
        name: str,
        form: str,
        backend: _Backend,
        classnames: list[str] | None,
        fingerprint_files: Sequence[Path],
        settings: Mapping[str, Any],
        notes: Sequence[str] = (),
        classnames_from: Callable[[], list[str] | None] | None = None,
        label_index: Mapping[str, int] | None = None,
    ) -> None:
        self.name = name
        self.form = form  # "class_folders" | "table" | "shards" | "image_folder"
        self._backend = backend
        self._classnames = classnames
        self._classnames_from = classnames_from
        self._label_index = dict(label_index) if label_index is not None else None
        self._fingerprint_files = list(fingerprint_files)
        self.settings = dict(settings)
        self.notes: list[str] = list(notes)
        self.skipped: Counter[str] = Counter()  # what the last iteration (__iter__) skipped, by reason

    def __len__(self) -> int:
        """Samples stored (those that later fail to decode included)."""
        return len(self._backend)

    def __repr__(self) -> str:
        return f"EvalDataset({self.name!r}, form={self.form!r}, samples={len(self)})"

    @property
    def classnames(self) -> list[str] | None:
        """Raw class names in label order (folder names, ``classes.json`` entries, ...); None if unknown."""
        if self._classnames is None and self._classnames_from is not None:
            self._classnames = self._classnames_from()
            self._classnames_from = None
        return self._classnames

    def subset(self, max_samples: int | None) -> EvalDataset:
        """At most ``max_samples`` samples: for folders and tables a class-balanced subset (classes take turns;
        every class is present when ``max_samples`` >= the number of classes), for shards the first ones in
        stored order. ``None``: the dataset itself."""
        if max_samples is None:
            return self
        if max_samples <= 0:
            raise ValueError(f"max_samples must be positive, got {max_samples}")
        copy = EvalDataset.__new__(EvalDataset)
        copy.__dict__.update(self.__dict__)
        copy._backend = self._backend.subset(max_samples)
        copy.settings = {**self.settings, "max_samples": max_samples}
        copy.skipped = Counter()
        return copy

    # -- identity ------------------------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """sha256 of what determines the samples: the files (relative path, size, mtime), the label settings and
        class names. Changing, adding or removing a file changes it."""
        digest = hashlib.sha256()
        digest.update(json.dumps({"form": self.form, **self.settings}, sort_keys=True, default=str).encode())
        digest.update(json.dumps(self._classnames, default=str).encode())
        for path in self._fingerprint_files:
            try:
                stat = path.stat()
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path}\0missing\n".encode())
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        """For reports: what was opened, how, and how big it is."""
        return {
            "spec": self.name,
            "form": self.form,
            "num_samples": len(self),
            "num_classes": len(self.classnames) if self.classnames is not None else None,
            "fingerprint": self.fingerprint(),
            "settings": self.settings,
            "notes": list(self.notes),
        }

    # -- reading -------------------------------------------------------------------------------------------------

    def _label(self, raw: int | str | None) -> tuple[int | None, str | None]:
        """(label, problem) for a raw label: an int, a digit string, or a class name."""
        if raw is None:
            return None, None
        if isinstance(raw, bool):
            return None, BAD_LABEL
        if isinstance(raw, (int, np.integer)):
            label = int(raw)
        elif isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
            label = int(raw.strip())
        elif isinstance(raw, str) and self._label_index is not None and raw in self._label_index:
            label = self._label_index[raw]
        else:
            return None, BAD_LABEL
        classnames = self.classnames
        if label < 0 or (classnames is not None and label >= len(classnames)):
            return None, BAD_LABEL
        return label, None

    def _decode(self, item: _Item) -> tuple[Image.Image | None, int | None, str | None]:
        label, problem = self._label(item.label)
        if item.error is not None:
            return None, None, item.error
        if problem is not None:
            return None, None, problem
        if item.data is None:
            return None, None, "missing_image"
        try:
            image = load_image(item.data, name=item.key if isinstance(item.data, bytes) else None)
        except ImageLoadError as exc:
            log.debug("skipped %s: %s", item.key, exc)
            return None, None, f"image_{exc.reason}"
        return image, label, None

    def __iter__(self) -> Iterator[EvalSample]:
        self.skipped = Counter()
        for unit in range(self._backend.num_units()):
            for item in self._backend.iter_unit(unit):
                image, label, reason = self._decode(item)
                if reason is not None:
                    self.skipped[reason] += 1
                    continue
                assert image is not None
                yield EvalSample(item.key, image, label, item.captions)
        if self.skipped:
            log.warning("%s: skipped %s", self.name, _format_counts(self.skipped))

    def load_images(self, keys: Sequence[str]) -> dict[str, Image.Image]:
        """The decoded images of ``keys`` (one pass over the data; keys that do not decode are left out)."""
        found: dict[str, Image.Image] = {}
        for item in self._backend.find(set(keys)):
            image, _, _ = self._decode(item)
            if image is not None:
                found[item.key] = image
        return found

    def batches(
        self, transform: Callable[[Image.Image], torch.Tensor], batch_size: int = 64, num_workers: int = 0
    ) -> Iterator[EvalBatch]:
        """Preprocessed batches, images read and decoded in ``num_workers`` DataLoader processes (0: here).

        Workers take units (shards, or runs of a few hundred files) in turn; each batch holds images of one
        worker, so batches arrive out of stored order; :attr:`EvalBatch.order` restores it. Every skipped sample
        is counted in some batch's ``skipped`` (a batch may hold only counts and no images).
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        stream = _BatchStream(self, transform, batch_size)
        if num_workers <= 0:
            yield from stream
            return
        workers = min(num_workers, max(1, self._backend.num_units()))
        loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_identity)
        yield from loader


def _identity(batch: EvalBatch) -> EvalBatch:
    return batch


class _BatchStream(IterableDataset):
    def __init__(
        self, dataset: EvalDataset, transform: Callable[[Image.Image], torch.Tensor], batch_size: int
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[EvalBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        backend = self.dataset._backend
        pending: list[tuple[_Item, torch.Tensor, int | None]] = []
        skipped: Counter[str] = Counter()
        for unit in range(worker, backend.num_units(), workers):
            for item in backend.iter_unit(unit):
                image, label, reason = self.dataset._decode(item)
                if reason is not None:
                    skipped[reason] += 1
                    continue
                pending.append((item, self.transform(image), label))
                if len(pending) == self.batch_size:
                    yield _collate(pending, skipped)
                    pending, skipped = [], Counter()
        if pending or skipped:
            yield _collate(pending, skipped)


def _collate(pending: list[tuple[_Item, torch.Tensor, int | None]], skipped: Counter[str]) -> EvalBatch:
    if pending:
        images = torch.stack([tensor for _, tensor, _ in pending])
    else:
        images = torch.empty(0, 3, 1, 1)
    return EvalBatch(
        images=images,
        labels=torch.tensor([-1 if label is None else label for _, _, label in pending], dtype=torch.int64),
        keys=[item.key for item, _, _ in pending],
        captions=[item.captions for item, _, _ in pending],
        order=torch.tensor([item.order for item, _, _ in pending], dtype=torch.int64),
        skipped=dict(skipped),
    )


def _format_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())) or "nothing"


# ----------------------------------------------------------------------------------------------------------------
# Opening


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
        if path.suffix.lower() in (".csv", ".tsv", ".jsonl"):
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
        return _open_class_folders(path, folders, images_here, given, split)
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


def _open_class_folders(
    root: Path, folders: list[Path], loose: list[Path], given: list[str] | None, split: str | None
) -> EvalDataset:
    records: list[_Record] = []
    files: list[Path] = []
    empty: list[str] = []
    ignored: Counter[str] = Counter()
    for label, folder in enumerate(folders):
        count = 0
        for directory, subdirs, names in os.walk(folder):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for file_name in sorted(names):
                file_path = Path(directory) / file_name
                if file_name.startswith("."):
                    continue
                if not _is_image(file_path):
                    ignored[file_path.suffix.lower() or "no extension"] += 1
                    continue
                relative = file_path.relative_to(root).as_posix()
                records.append(_Record(relative, str(file_path), label, ()))
                files.append(file_path)
                count += 1
        if count == 0:
            empty.append(folder.name)
    notes = []
    if loose:
        notes.append(f"{root}: {len(loose)} images outside the class folders were not read")
    if ignored:
        notes.append(f"{root}: files that are not images were not read: {_format_counts(ignored)}")
    if empty:
        notes.append(f"{root}: {len(empty)} class folders hold no images: {', '.join(empty[:10])}")
    folder_names = [p.name for p in folders]
    names = folder_names
    if given is not None:
        if len(given) != len(folders):
            raise DataError(
                f"{root}: {len(folders)} class folders but {len(given)} class names were given; give one name per "
                "folder, in the sorted order of the folder names"
            )
        names = given
    if not records:
        raise DataError(f"{root}: the class folders hold no images")
    settings = {"split": split, "class_folders": folder_names}
    return EvalDataset(str(root), "class_folders", _RecordBackend(records), names, files, settings, notes)


def _open_table(
    path: Path,
    label_field: str,
    given: list[str] | None,
    caption_field: str | Sequence[str] | None,
    caption_separator: str | None,
    image_field: str | None,
    split: str | None,
) -> EvalDataset:
    rows = list(_read_table_rows(path))
    if not rows:
        raise DataError(f"{path}: the table has no rows")
    columns: dict[str, None] = {}
    for _, row in rows:
        columns.update(dict.fromkeys(row))
    found = ", ".join(repr(c) for c in columns)
    image_column = image_field or _pick(columns, IMAGE_COLUMNS)
    if image_column is None or image_column not in columns:
        raise DataError(
            f"{path}: no image column (the columns are {found}); name it with image_field=... (--image-field)"
        )
    caption_columns: list[str] = []
    if caption_field is not None:
        caption_columns = [caption_field] if isinstance(caption_field, str) else list(caption_field)
        missing = [c for c in caption_columns if c not in columns]
        if missing:
            raise DataError(f"{path}: caption column(s) {missing} not found; the columns are {found}")
    else:
        detected = _pick(columns, CAPTION_COLUMNS)
        caption_columns = [detected] if detected is not None else []
    has_labels = label_field in columns
    raw_labels: list[Any] = [row.get(label_field) if has_labels else None for _, row in rows]
    raw_labels = [v.strip() if isinstance(v, str) else v for v in raw_labels]
    raw_labels = [None if v == "" else v for v in raw_labels]
    named = {v for v in raw_labels if isinstance(v, str) and not v.lstrip("-").isdigit()}
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
    root = path.parent
    records: list[_Record] = []
    files = [path]
    for (line, row), raw_label in zip(rows, raw_labels):
        image = row.get(image_column)
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{path}:{line}: empty or non-text image path in column {image_column!r}")
        image_path = (root / Path(image.strip()).expanduser()).as_posix()
        captions = _row_captions(row, caption_columns, caption_separator, path, line)
        records.append(_Record(f"{path.name}:{line}", image_path, raw_label, captions))
        files.append(Path(image_path))
    settings = {
        "split": split,
        "label_field": label_field if has_labels else None,
        "caption_fields": caption_columns,
        "caption_separator": caption_separator,
        "image_field": image_column,
    }
    return EvalDataset(str(path), "table", _RecordBackend(records), classnames, files, settings,
                       label_index=label_index)  # fmt: skip


def _pick(columns: Mapping[str, Any], candidates: Sequence[str]) -> str | None:
    lower = {c.lower(): c for c in reversed(list(columns))}
    return next((lower[c] for c in candidates if c in lower), None)


def _read_table_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV/TSV (header row first) or JSONL table."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the table ({exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8"
        ) from None
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: a JSON {type(record).__name__}, not an object")
            yield number, record
        return
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        if header is None:
            header = [v.strip() for v in values]
            continue
        if len(values) != len(header):
            raise DataError(
                f"{path}:{reader.line_num}: {len(values)} fields but the header has {len(header)}; quote fields "
                f"that contain {delimiter!r}"
            )
        yield reader.line_num, dict(zip(header, values))


def _row_captions(
    row: Mapping[str, Any], columns: Sequence[str], separator: str | None, path: Path, line: int
) -> tuple[str, ...]:
    captions: list[str] = []
    for column in columns:
        value = row.get(column)
        if value is None:
            continue
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            captions.extend(value)
        elif isinstance(value, str):
            pieces = value.split(separator) if separator else [value]
            captions.extend(p.strip() for p in pieces)
        else:
            raise DataError(
                f"{path}:{line}: caption column {column!r} holds {value!r}; expected text or a list"
            )
    return tuple(c for c in captions if c)


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
            if isinstance(name, str) and isinstance(label, (int, str)) and str(label).strip().isdigit():
                label = int(label)
                if names.setdefault(label, name) != name:
                    raise DataError(
                        f"{sample.key}: label {label} is class {name!r} here but {names[label]!r} elsewhere; "
                        "fix the shards' json 'class' fields or give the class names with a classes.json"
                    )
    if not names:
        return None
    return [names.get(i, f"class {i}") for i in range(max(names) + 1)]
