"""Deterministic, resumable training streams.

The data a run sees is a pure function of (seed, ranks x workers, the sources), so a run stopped at any step
and resumed continues with exactly the batches it would have seen:

* The stream is split into N = world_size x max(1, num_workers) **partitions**, one per (rank, worker).
  Partition j reads shards j, j+N, ... of a per-pass permutation of the shards (or rows of a table), so no
  two workers read the same data; with fewer shards than partitions, every partition reads every shard and
  keeps every N-th sample. Each partition's stream is infinite: pass after pass, each reshuffled.
  Resampled (``resampled=True``, open_clip's ``--dataset-resampled``): each partition instead draws its units
  with replacement, by a generator seeded by (seed, source, partition, draw index); there are no exact passes.
* Several sources are mixed per sample by a seeded draw with the given weights; a seeded shuffle buffer
  shuffles within the partition. Both work on raw bytes, before decoding.
* Each sample that leaves the buffer gets an index n; its augmentation and caption choice use a generator
  seeded by (seed, j, n), so they do not depend on which process decodes it.
* Every batch carries (partition, position after it, counts of what was skipped since the last batch).
  Resuming a partition at position n replays the raw stream and the buffer without decoding anything.
* The DataLoader takes batches from its workers round-robin. After k batches, physical worker w plays
  partition (w + k) mod W, so the first batch after a resume comes from the partition that was next.

Broken inputs (unreadable/truncated/oversized images, empty captions, truncated shards) are skipped and
counted by reason; nothing is dropped silently (with ``shard_failure="fail"`` a broken or unreachable shard stops
the stream instead, with the shard's message). A stream that skips too much (a whole pass without a usable
sample, or too large a share: :mod:`clipforge.data.skipguard`) yields a :class:`StreamFailure` instead of
waiting forever for its next batch.

Inside a partition the stream is a sequence of ``(source index, item)`` pairs, where an item is a
:class:`RawSample`, a :class:`UnitError` or a :class:`PassEnd`; only raw samples enter the shuffle buffer.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from clipforge.data.captions import augment_tags, mentions_colour, mentions_side
from clipforge.data.raw import DataError, RawSample, UnitError, decode_image
from clipforge.data.skipguard import SkipGuard, SkipPolicy, StreamFailure
from clipforge.data.sources import Source

log = logging.getLogger("clipforge.data")

_MIX_STREAM, _BUFFER_STREAM, _SAMPLE_STREAM, _RESAMPLE_STREAM = 1_000_003, 2_000_003, 3_000_017, 4_000_037


class Batch(NamedTuple):
    """One micro-batch from one partition. ``counts``: skips by reason (and truncated captions) since the
    partition's previous batch."""

    images: torch.Tensor  # [b, 3, S, S] float32, normalised
    tokens: torch.Tensor  # [b, L] int64
    partition: int
    position: int  # samples that have left this partition's shuffle buffer after this batch
    counts: dict[str, int]
    # Each sample's (source name, key within the source: "shard-000003.tar/000123", "pairs.csv:17"), in order.
    keys: tuple[tuple[str, str], ...] = ()


class PassEnd(NamedTuple):
    """A source finished one pass of a partition, holding ``samples`` raw samples."""

    samples: int


Item = RawSample | UnitError | PassEnd


def _seed(*parts: int) -> int:
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1
    )


def unit_order(num_units: int, seed: int, source_index: int, pass_no: int) -> np.ndarray:
    """The order in which pass ``pass_no`` visits source ``source_index``'s units (the same on every partition)."""
    return np.random.default_rng([seed, source_index, pass_no]).permutation(num_units)


def partition_pass(
    source: Source, index: int, part: int, parts: int, seed: int, pass_no: int, resampled: bool = False
) -> Iterator[Any]:
    """One pass of partition ``part`` over ``source``: its share of a shuffled unit order, or with ``resampled``
    its share of draws with replacement (:func:`resampled_units`)."""
    if resampled:
        for unit in resampled_units(source.num_units(), seed, index, part, parts, pass_no):
            yield from source.iter_unit(unit)
        return
    order = unit_order(source.num_units(), seed, index, pass_no)
    units = len(order)
    if source.unit_kind == "row" or units >= parts:
        for unit in order[part::parts]:
            yield from source.iter_unit(int(unit))
        return
    kept = 0  # fewer shards than partitions: all read everything, each keeps every parts-th sample
    for position, unit in enumerate(order):
        for item in source.iter_unit(int(unit)):
            if isinstance(item, UnitError):
                if position % parts == part:  # one partition reports each broken shard
                    yield item
                continue
            if kept % parts == part:
                yield item
            kept += 1


def resampled_units(
    num_units: int, seed: int, source_index: int, part: int, parts: int, pass_no: int
) -> list[int]:
    """Pass ``pass_no`` of partition ``part`` when sampling with replacement (open_clip's ``--dataset-resampled``):
    ceil(units / parts) units, each drawn uniformly by a generator seeded by (seed, source, partition, draw
    index), so a partition's draws are the same on every run and a replayed resume sees them again. A "pass" is
    only the partition's nominal share (the skip guard's unit of counting); the same unit can come twice in it."""
    draws = -(-num_units // parts)
    first = pass_no * draws
    return [
        int(
            np.random.default_rng([seed, _RESAMPLE_STREAM, source_index, part, first + d]).integers(num_units)
        )
        for d in range(draws)
    ]


def _source_stream(
    source: Source, index: int, part: int, parts: int, seed: int, resampled: bool = False
) -> Iterator[tuple[int, Item]]:
    pass_no = 0
    while True:
        samples = 0
        for item in partition_pass(source, index, part, parts, seed, pass_no, resampled):
            if isinstance(item, RawSample):
                samples += 1
            yield index, item
        yield index, PassEnd(samples)
        pass_no += 1


def raw_stream(
    sources: Sequence[Source],
    weights: Sequence[float],
    part: int,
    parts: int,
    seed: int,
    resampled: bool = False,
) -> Iterator[tuple[int, Item]]:
    """Partition ``part``'s infinite stream of (source index, item), sources mixed by ``weights``: a seeded draw
    picks the source of each raw sample or unit error; pass-end events take no draw. ``resampled``: units are
    drawn with replacement (:func:`resampled_units`)."""
    streams = [_source_stream(s, i, part, parts, seed, resampled) for i, s in enumerate(sources)]
    if len(streams) == 1:
        yield from streams[0]
        return
    probs = np.asarray(weights, dtype=np.float64)
    probs = probs / probs.sum()
    rng = np.random.default_rng([seed, _MIX_STREAM, part])
    while True:
        stream = streams[int(rng.choice(len(streams), p=probs))]
        pair = next(stream)
        while isinstance(pair[1], PassEnd):
            yield pair
            pair = next(stream)
        yield pair


def shuffled(
    items: Iterator[tuple[int, Item]], size: int, seed: int, part: int
) -> Iterator[tuple[int, Item]]:
    """A shuffle buffer of ``size`` over an infinite stream of (source, item); events pass straight through."""
    if size <= 1:
        yield from items
        return
    rng = np.random.default_rng([seed, _BUFFER_STREAM, part])
    buffer: list[tuple[int, Item]] = []
    for pair in items:
        if not isinstance(pair[1], RawSample):
            yield pair
            continue
        if len(buffer) < size:
            buffer.append(pair)
            continue
        slot = int(rng.integers(size))
        out, buffer[slot] = buffer[slot], pair
        yield out


@dataclass(frozen=True)
class SampleDecoder:
    """Raw sample -> (image tensor, caption) or a skip reason. ``transform`` takes (PIL image, generator).

    Per sample, with the sample's generator: pick the caption (``caption``), then augment a comma-separated tag
    list (``tag_dropout``, ``tag_shuffle``: :func:`clipforge.data.captions.augment_tags`), then transform the
    image. With ``caption_guard`` the transform is also told whether that final caption allows a flip (it names
    no side) and colour jitter (it names no colour): ``transform(image, generator, allow_flip=...,
    allow_color_jitter=...)``, as :class:`clipforge.transforms.TrainTransform` accepts.
    """

    transform: Callable[..., torch.Tensor]
    caption: str = "first"
    max_pixels: int | None = 89_478_485
    fill_color: tuple[int, int, int] = (255, 255, 255)
    caption_guard: bool = False
    tag_dropout: float = 0.0
    tag_shuffle: bool = False

    def __call__(self, raw: RawSample, generator: torch.Generator) -> tuple[torch.Tensor, str] | str:
        if raw.error is not None:
            return raw.error
        captions = [c for c in raw.captions if c and c.strip()]
        if not captions:
            return "empty_caption"
        if raw.image is None:
            return "missing_image"
        image = decode_image(
            raw.image, raw.image_name, fill_color=self.fill_color, max_pixels=self.max_pixels
        )
        if isinstance(image, str):
            return image  # the skip reason
        if self.caption == "random" and len(captions) > 1:
            caption = captions[int(torch.randint(len(captions), (1,), generator=generator))]
        else:
            caption = captions[0]
        if self.tag_dropout or self.tag_shuffle:
            caption = augment_tags(caption, generator, self.tag_dropout, self.tag_shuffle)
        if not self.caption_guard:
            return self.transform(image, generator), caption
        allow = {"allow_flip": not mentions_side(caption), "allow_color_jitter": not mentions_colour(caption)}
        return self.transform(image, generator, **allow), caption


class TrainStream(IterableDataset):
    """Batches for one rank: an infinite, deterministic, resumable stream (see the module docstring)."""

    def __init__(
        self,
        sources: Sequence[Source],
        weights: Sequence[float],
        decoder: SampleDecoder,
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        start_batch: int = 0,
        positions: Mapping[int, int] | None = None,
        skip_policy: SkipPolicy | None = None,
        resampled: bool = False,
        shard_failure: Literal["skip", "fail"] = "skip",
    ) -> None:
        super().__init__()
        if not sources:
            raise DataError("no training sources given")
        self.sources = list(sources)
        self.weights = list(weights) if weights else [1.0] * len(sources)
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.workers = max(1, num_workers)
        self.shuffle_buffer = shuffle_buffer
        self.start_batch = start_batch
        self.positions = dict(positions or {})
        self.skip_policy = skip_policy or SkipPolicy()
        self.resampled = resampled  # draw shards with replacement (see resampled_units)
        if shard_failure not in ("skip", "fail"):
            raise DataError(f"shard_failure must be 'skip' or 'fail', got {shard_failure!r}")
        self.shard_failure = shard_failure  # a broken shard: skipped and counted, or the stream stops

    @property
    def num_partitions(self) -> int:
        return self.world_size * self.workers

    def partition_for(self, worker_id: int) -> int:
        """The partition physical worker ``worker_id`` of this rank plays (rotated after ``start_batch``)."""
        return self.rank * self.workers + (worker_id + self.start_batch) % self.workers

    def __iter__(self) -> Iterator[Batch | StreamFailure]:
        info = get_worker_info()
        part = self.partition_for(info.id if info is not None else 0)
        return self.iter_partition(part)

    def iter_partition(self, part: int) -> Iterator[Batch | StreamFailure]:
        """Partition ``part``'s batches; ends with one :class:`StreamFailure` if the skip guard stops it."""
        items = shuffled(
            raw_stream(self.sources, self.weights, part, self.num_partitions, self.seed, self.resampled),
            self.shuffle_buffer,
            self.seed,
            part,
        )
        position = self.positions.get(part, 0)
        replayed = 0
        while replayed < position:  # resume: replay without decoding; events were counted before
            if isinstance(next(items)[1], RawSample):
                replayed += 1
        guard = SkipGuard(
            [s.name for s in self.sources], self.skip_policy,
            buffer_size=self.shuffle_buffer, partition=part, partitions=self.num_partitions,
        )  # fmt: skip
        counts: Counter[str] = Counter()
        images: list[torch.Tensor] = []
        captions: list[str] = []
        keys: list[tuple[str, str]] = []
        truncated_before = getattr(self.tokenizer, "num_truncated", 0)
        for source, item in items:
            if isinstance(item, PassEnd):
                failure = guard.pass_end(source, item.samples)
            elif isinstance(item, UnitError):
                counts[item.reason] += 1
                log.warning("%s", item.message)
                if self.shard_failure == "skip" or self.sources[source].unit_kind != "shard":
                    continue
                failure = _shard_failure(item, counts)
            else:
                generator = torch.Generator().manual_seed(_seed(self.seed, _SAMPLE_STREAM, part, position))
                position += 1
                decoded = self.decoder(item, generator)
                skipped = decoded if isinstance(decoded, str) else None
                failure = guard.record(source, skipped, item.image_name)
                if skipped is not None:
                    counts[skipped] += 1
                else:
                    images.append(decoded[0])
                    captions.append(decoded[1])
                    keys.append((self.sources[source].name, item.key))
            if failure is not None:
                yield failure
                return
            if len(images) == self.batch_size:
                tokens = self.tokenizer(captions)
                truncated = getattr(self.tokenizer, "num_truncated", 0)
                if truncated > truncated_before:
                    counts["truncated_caption"] += truncated - truncated_before
                    truncated_before = truncated
                yield Batch(torch.stack(images), tokens, part, position, dict(counts), tuple(keys))
                counts.clear()
                images, captions, keys = [], [], []


def _shard_failure(error: UnitError, counts: Counter[str]) -> StreamFailure:
    return StreamFailure(
        f"a shard failed and data.shard_failure=fail stops the run: {error.message}. Fix or remove the shard, "
        "or set data.shard_failure=skip to skip and count broken shards",
        dict(counts),
    )


def default_weights(sources: Sequence[Source]) -> list[float]:
    """Proportional to the sources' sizes when all are known, else equal."""
    sizes = [s.num_samples() for s in sources]
    if all(size for size in sizes):
        return [float(size) for size in sizes]  # type: ignore[arg-type]
    return [1.0] * len(sources)
