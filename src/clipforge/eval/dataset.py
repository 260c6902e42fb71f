"""An evaluation dataset (:class:`EvalDataset`): its samples, streamed in preprocessed batches, from either of two
backends -- lists of records (class folders, tables) or data sources (shards, captioned folders).
:func:`clipforge.eval.datasets.open_eval_dataset` builds one from a path.

Images are never all held at once: a dataset keeps file paths (trees, tables) or shard paths, and images are
read and decoded in the DataLoader workers that preprocess them. Images that cannot be used are skipped and
counted by reason (``image_corrupt``, ``image_missing``, ``missing_image``, ``truncated_shard``, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.data.raw import (
    MISSING_CAPTION,
    MISSING_IMAGE,
    UNREADABLE_IMAGE_FILE,
    RawSample,
    decode_image,
    read_image_file,
)
from clipforge.data.sources import Source

log = logging.getLogger("clipforge.eval")

_RECORDS_PER_UNIT = 256  # class-folder/table records handed to a worker at a time
_POSITION_BITS = 32  # shard samples are ordered by (shard index << 32) | position in the shard
MISSING_LABEL = "missing_label"
BAD_LABEL = "bad_label"
# A class-folder or table file that cannot be read is counted as load_image's path reasons always were.
_FILE_PROBLEMS = {MISSING_IMAGE: "image_missing", UNREADABLE_IMAGE_FILE: "image_unreadable"}


def parse_int_label(text: str) -> int | None:
    """``text`` as an integer label (``"3"``, ``" -1 "``), or None when it is not one (a class name)."""
    stripped = text.strip()
    if not stripped.lstrip("-").isdigit():
        return None
    try:
        return int(stripped)
    except ValueError:  # "²" is a digit to str.isdigit but not to int; so are 5,000-digit numbers
        return None


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
                entry = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
            except (OSError, ValueError):  # ValueError: a path no file can have (a NUL byte)
                entry = f"{path}\0missing\n"
            digest.update(entry.encode("utf-8", "surrogatepass"))
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
        elif isinstance(raw, str) and parse_int_label(raw) is not None:
            label = parse_int_label(raw)
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
        data, name = item.data, item.key
        if isinstance(data, str):  # a file of a class folder or table: read as the training sources read
            name = data
            data, error = read_image_file(Path(data))
            if data is None:
                return None, None, _FILE_PROBLEMS.get(error or "", error)
        image = decode_image(data, name)  # the training decoder's function
        if isinstance(image, str):
            return None, None, image
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
