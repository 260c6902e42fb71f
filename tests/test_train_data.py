"""The training data stream: disjoint partitions, determinism, exact resume (with worker rotation), and exact
skip counts on damaged shards."""

from __future__ import annotations

import itertools
import re
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader

from clipforge.data.raw import RawSample
from clipforge.data.shards import ShardWriter
from clipforge.data.skipguard import StreamFailure
from clipforge.data.sources import open_source
from clipforge.data.stream import SampleDecoder, TrainStream, partition_pass, unit_order
from clipforge.tokenizer import get_tokenizer
from clipforge.transforms import get_transforms
from tests.datasets import caption, digit_images, digits_shards, digits_table, png_bytes


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return digits_shards(tmp_path_factory.mktemp("shards"), n=120, per_shard=10)


def make_stream(source, **kwargs) -> TrainStream:
    defaults = {"batch_size": 8, "seed": 3, "shuffle_buffer": 16}
    decoder = SampleDecoder(get_transforms("tiny", train=True))
    return TrainStream([source], [1.0], decoder, get_tokenizer("tiny"), **(defaults | kwargs))


def first_pass_keys(source, part: int, parts: int) -> list[str]:
    return [
        it.key
        for it in partition_pass(source, 0, part, parts, seed=5, pass_no=0)
        if isinstance(it, RawSample)
    ]


@pytest.mark.parametrize("parts", [1, 3, 4, 13])
def test_partitions_are_disjoint_and_cover_a_pass(shards, parts):
    """Shards are split across partitions (ranks x workers); with more partitions than shards, samples are."""
    source = open_source(shards)
    per_part = [first_pass_keys(source, part, parts) for part in range(parts)]
    every = [key for keys in per_part for key in keys]
    assert len(every) == len(set(every)) == 120


def test_table_rows_are_partitioned(tmp_path):
    source = open_source(digits_table(tmp_path, n=30))
    per_part = [first_pass_keys(source, part, 4) for part in range(4)]
    assert sorted(k for keys in per_part for k in keys) == sorted({k for keys in per_part for k in keys})
    assert sum(map(len, per_part)) == 30


def test_stream_is_deterministic(shards):
    a = list(itertools.islice(iter(make_stream(open_source(shards))), 5))
    b = list(itertools.islice(iter(make_stream(open_source(shards))), 5))
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and torch.equal(x.tokens, y.tokens)
        assert x.position == y.position
    c = list(itertools.islice(iter(make_stream(open_source(shards), seed=4)), 1))
    assert not torch.equal(a[0].images, c[0].images)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cut", [3, 4, 7])
def test_resume_continues_exactly_with_worker_rotation(shards, workers, cut):
    """Stop after `cut` batches, resume from the recorded positions: the same batches follow."""
    source = open_source(shards)

    def loader(**kwargs):
        stream = make_stream(source, num_workers=workers, **kwargs)
        return iter(DataLoader(stream, batch_size=None, num_workers=workers))

    reference = list(itertools.islice(loader(), cut + 5))
    positions = {}
    for batch in reference[:cut]:
        positions[batch.partition] = batch.position
    resumed = list(itertools.islice(loader(start_batch=cut, positions=positions), 5))
    for expected, got in zip(reference[cut:], resumed):
        assert got.partition == expected.partition
        assert torch.equal(got.images, expected.images)
        assert torch.equal(got.tokens, expected.tokens)
        assert got.position == expected.position


def test_too_many_partitions_for_a_table_is_a_clear_error(tmp_path):
    source = open_source(digits_table(tmp_path, n=3))
    stream = make_stream(source, world_size=2, num_workers=3, rank=1)
    failure = next(stream.iter_partition(stream.partition_for(2)))
    assert isinstance(failure, StreamFailure)
    assert re.search("no samples in a whole pass.*fewer workers", failure.message)


def damaged_shards(folder):
    """Three shards visited in a known order; the first two hold planted damage, the last is clean."""
    images, labels = digit_images(60)
    good = [png_bytes(im) for im in images]
    planted = {
        "image_corrupt": 2,
        "image_empty": 1,
        "image_not_image": 1,
        "empty_caption": 2,
        "truncated_shard": 1,
    }
    with ShardWriter(
        folder, max_samples=1000
    ) as writer:  # shard 0: good + corrupt/empty/not-image/blank captions
        for i in range(16):
            writer.write(f"a{i:04d}", good[i], "png", caption(labels[i], i))
        writer.write("bad0", good[0][:100], "png", "a cut image")
        writer.write("bad1", good[1][:60], "png", "another cut image")
        writer.write("bad2", b"", "png", "a zero-size image")
        writer.write("bad3", b"<html>not found</html>", "png", "an error page")
        writer.write("bad4", good[2], "png", "   ")
        writer.write("bad5", good[3], "png", "")
    (folder / "manifest.json").unlink()  # shards are found by listing the folder
    first = folder / "shard-000000.tar"
    # shard 1: 10 good samples, then cut inside the 11th sample's data -> truncated
    truncated = folder / "shard-000001.tar"
    with ShardWriter(folder / "tmp", max_samples=1000) as writer:
        for i in range(16, 27):
            writer.write(f"b{i:04d}", good[i], "png", caption(labels[i], i))
    data = (folder / "tmp" / "shard-000000.tar").read_bytes()
    with tarfile.open(folder / "tmp" / "shard-000000.tar") as tar:
        last = tar.getmembers()[-2]  # the 11th sample's image
    truncated.write_bytes(data[: last.offset_data + 50])
    with ShardWriter(folder / "tmp2", max_samples=1000) as writer:  # shard 2: clean
        for i in range(27, 60):
            writer.write(f"c{i:04d}", good[i], "png", caption(labels[i], i))
    (folder / "tmp2" / "shard-000000.tar").rename(folder / "shard-000002.tar")
    for tmp in ("tmp", "tmp2"):
        for path in (folder / tmp).iterdir():
            path.unlink()
        (folder / tmp).rmdir()
    assert first.exists()
    return folder, planted, 16 + 10  # valid samples before the clean shard


def test_skip_counts_are_exact_on_damaged_shards(tmp_path):
    folder, planted, valid_before_clean = damaged_shards(tmp_path / "damaged")
    source = open_source(folder)
    seed = next(s for s in range(100) if unit_order(3, s, 0, 0)[-1] == 2)  # the clean shard comes last
    stream = make_stream(source, seed=seed, shuffle_buffer=0, batch_size=4)
    counts: dict[str, int] = {}
    seen = 0
    for batch in stream.iter_partition(0):
        for reason, n in batch.counts.items():
            counts[reason] = counts.get(reason, 0) + n
        seen += batch.images.shape[0]
        if seen >= valid_before_clean + 4:  # into the clean shard, still in the first pass
            break
    assert counts == planted
