"""Scale by simulation (issue 16, item 8): how the training stream splits 10,000 shards over 256 ranks x 4
workers, checked without processes, with a resume in the middle; and a real 4-process gloo run whose ranks,
between them, see every row of a table exactly once per epoch."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from clipforge.data.raw import RawSample
from clipforge.data.stream import TrainStream, partition_pass
from tests.datasets import digits_table
from tests.test_distributed import _run_ranks, _set_torchrun_env

SHARDS, PER_SHARD, RANKS, WORKERS, PASSES = 10_000, 3, 256, 4, 3


class _Shards:
    """A source of SHARDS shards of PER_SHARD samples whose keys say where they came from."""

    name, unit_kind = "web", "shard"

    def num_units(self) -> int:
        return SHARDS

    def num_samples(self) -> int:
        return SHARDS * PER_SHARD

    def iter_unit(self, index: int):
        for member in range(PER_SHARD):
            yield RawSample(f"{index:05d}/{member}", b"", (f"caption {index}",), f"{index}.tar")


def _decode(raw: RawSample, generator: torch.Generator):
    return torch.zeros(1), raw.captions[0]


def _tokenize(captions: list[str]) -> torch.Tensor:
    return torch.zeros(len(captions), 1, dtype=torch.long)


def _stream(rank: int, start_batch: int = 0, positions=None, shuffle_buffer: int = 0) -> TrainStream:
    return TrainStream(
        [_Shards()], [1.0], _decode, _tokenize, batch_size=PER_SHARD, seed=7, rank=rank, world_size=RANKS,
        num_workers=WORKERS, shuffle_buffer=shuffle_buffer, start_batch=start_batch, positions=positions,
    )  # fmt: skip


def _rank_batches(stream: TrainStream, count: int) -> list:
    """What a DataLoader with WORKERS workers yields for this rank: batches taken from its workers in turn."""
    iterators = [stream.iter_partition(stream.partition_for(worker)) for worker in range(WORKERS)]
    return [next(iterators[k % WORKERS]) for k in range(count)]


def test_every_sample_is_in_exactly_one_partition_in_each_pass():
    parts = RANKS * WORKERS
    for pass_no in range(PASSES):
        seen: Counter[str] = Counter()
        shards_per_part = []
        for part in range(parts):
            keys = [item.key for item in partition_pass(_Shards(), 0, part, parts, seed=7, pass_no=pass_no)]
            seen.update(keys)
            shards_per_part.append(len(keys) // PER_SHARD)
        assert len(seen) == SHARDS * PER_SHARD and set(seen.values()) == {1}, f"pass {pass_no}"
        assert set(shards_per_part) == {SHARDS // parts, SHARDS // parts + 1}  # 9 or 10 shards each


@pytest.mark.slow  # 30 s: 92k samples through 1,024 partitions
def test_batches_cover_each_pass_once_and_a_resume_continues_every_rank_exactly():
    # Per partition, the samples of its first PASSES passes, taken from its batches in order (no shuffle
    # buffer, so passes do not blend at their boundaries), must be the pass's shards; over all partitions,
    # every sample once per pass.
    parts = RANKS * WORKERS
    per_pass: list[Counter[str]] = [Counter() for _ in range(PASSES)]
    stream = _stream(rank=0)
    for part in range(parts):
        lengths = [PER_SHARD * sum(1 for _ in range(part, SHARDS, parts))] * PASSES
        batches = stream.iter_partition(part)
        keys: list[str] = []
        while len(keys) < sum(lengths):
            keys.extend(key for _, key in next(batches).keys)
        start = 0
        for pass_no, length in enumerate(lengths):
            per_pass[pass_no].update(keys[start : start + length])
            start += length
    for pass_no, seen in enumerate(per_pass):
        assert len(seen) == SHARDS * PER_SHARD and set(seen.values()) == {1}, f"pass {pass_no}"

    # A resume after 7 batches on every rank (shuffle buffer on) continues with the batches it would have seen.
    stop, total = 7, 16
    for rank in range(0, RANKS, 17):
        whole = _rank_batches(_stream(rank, shuffle_buffer=8), total)
        before = whole[:stop]
        positions = {batch.partition: batch.position for batch in before}
        after = _rank_batches(_stream(rank, stop, positions, shuffle_buffer=8), total - stop)
        assert [b.keys for b in before + after] == [b.keys for b in whole], f"rank {rank}"
        assert [b.partition for b in whole] == [rank * WORKERS + k % WORKERS for k in range(total)]


# ---- four real processes ----


def _rank_worker(rank: int, world: int, port: int, table: str, out: str) -> None:
    import clipforge.train.loop as loop
    from clipforge.train import resolve_train_config, train

    _set_torchrun_env(rank, world, port)
    real_next_batch, seen = loop.next_batch, []

    def next_batch(batches, step, run_dir):
        batch = real_next_batch(batches, step, run_dir)
        seen.append([key for _, key in batch.keys])
        return batch

    loop.next_batch = next_batch
    config = resolve_train_config(None, {
        "model": "tiny", "data.train": [table], "data.batch_size": 16, "data.num_workers": 0,
        "data.shuffle_buffer": 0, "steps": 12, "run.output_dir": out, "run.name": "four", "run.progress": False,
        "run.report_to": [], "model_overrides": {"vision.layers": 1, "text.layers": 1}, "threads": 1,
    })  # fmt: skip
    try:
        train(config)
        outcome = {"steps": seen}
    except Exception as error:  # reported to the test
        outcome = {"error": f"{type(error).__name__}: {error}"}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(outcome))
    os._exit(0)


@pytest.mark.slow
def test_four_gloo_ranks_see_every_row_once_per_epoch(tmp_path):
    table = digits_table(tmp_path / "digits", n=96)  # 96 rows = 6 steps of 16 (4 ranks x 4)
    exitcodes = _run_ranks(_rank_worker, (str(table), str(tmp_path)), world=4, deadline_s=300)
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(4)]
    assert exitcodes == [0] * 4, (exitcodes, outcomes)
    assert all("steps" in outcome for outcome in outcomes), outcomes
    for epoch in range(2):
        keys = [
            key
            for outcome in outcomes
            for step in outcome["steps"][6 * epoch : 6 * epoch + 6]
            for key in step
        ]
        assert len(keys) == 96 and len(set(keys)) == 96, f"epoch {epoch}"
    assert json.loads((tmp_path / "four" / "summary.json").read_text())["steps"] == 12
