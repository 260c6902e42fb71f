"""Resampled shards (sampling with replacement, open_clip's --dataset-resampled): deterministic for a seed, drawn
with replacement, resumed bitwise, and epochs defined by data.epoch_samples."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from clipforge.config import ConfigError
from clipforge.data.raw import RawSample
from clipforge.data.sources import open_source
from clipforge.data.stream import SampleDecoder, TrainStream, partition_pass, resampled_units
from clipforge.tokenizer import get_tokenizer
from clipforge.train import resolve_train_config, train
from clipforge.transforms import get_transforms
from tests.datasets import digits_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return digits_shards(tmp_path_factory.mktemp("shards"), n=120, per_shard=10)  # 12 shards


def make_stream(source, **kwargs) -> TrainStream:
    defaults = {"batch_size": 8, "seed": 3, "shuffle_buffer": 16, "resampled": True}
    decoder = SampleDecoder(get_transforms("tiny", train=True))
    return TrainStream([source], [1.0], decoder, get_tokenizer("tiny"), **(defaults | kwargs))


def test_draws_are_with_replacement_and_uniform():
    first = resampled_units(12, seed=5, source_index=0, part=0, parts=1, pass_no=0)
    assert len(first) == 12 and max(Counter(first).values()) >= 2  # a shard twice in one nominal pass
    assert resampled_units(12, 5, 0, 0, 1, 0) == first and resampled_units(12, 6, 0, 0, 1, 0) != first
    assert len(resampled_units(12, 5, 0, 1, 4, 0)) == 3  # each of 4 partitions: ceil(12 / 4) draws a pass
    draws = Counter(u for p in range(500) for u in resampled_units(12, 5, 0, 0, 1, p))
    counts = np.array([draws[u] for u in range(12)])
    assert counts.sum() == 6000 and abs(counts - 500).max() < 80  # sd ~ 21 per shard


def test_a_resampled_pass_reads_the_drawn_shards_in_draw_order(shards):
    source = open_source(shards)
    units = resampled_units(12, 5, 0, 0, 1, 0)
    keys = [it.key for it in partition_pass(source, 0, 0, 1, seed=5, pass_no=0, resampled=True)]
    assert keys == [s.key for u in units for s in source.iter_unit(u) if isinstance(s, RawSample)]
    assert len(keys) == 120 and len(set(keys)) < 120  # a shard drawn twice gives its samples twice
    plain = [it.key for it in partition_pass(source, 0, 0, 1, seed=5, pass_no=0)]
    assert len(set(plain)) == 120  # without resampling a pass is a permutation


def test_a_resampled_stream_is_deterministic_for_a_seed(shards):
    source = open_source(shards)
    a = list(itertools.islice(iter(make_stream(source)), 6))
    b = list(itertools.islice(iter(make_stream(source)), 6))
    assert all(torch.equal(x.images, y.images) and x.keys == y.keys for x, y in zip(a, b))
    c = list(itertools.islice(iter(make_stream(source, seed=4)), 6))
    assert [x.keys for x in a] != [x.keys for x in c]
    plain = list(itertools.islice(iter(make_stream(source, resampled=False)), 6))
    assert [x.keys for x in a] != [x.keys for x in plain]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resampled_stream_resumes_exactly(shards, workers):
    source = open_source(shards)

    def loader(**kwargs):
        stream = make_stream(source, num_workers=workers, **kwargs)
        return iter(DataLoader(stream, batch_size=None, num_workers=workers))

    reference = list(itertools.islice(loader(), 24))  # several nominal passes (15 samples each, 2 partitions)
    cut = 17
    positions = {b.partition: b.position for b in reference[:cut]}
    resumed = list(itertools.islice(loader(start_batch=cut, positions=positions), 7))
    for expected, got in zip(reference[cut:], resumed):
        assert got.keys == expected.keys and got.position == expected.position
        assert torch.equal(got.images, expected.images)


def _config(shards, out, name, **extra):
    return resolve_train_config(None, {
        "model": "tiny", "data.train": [str(shards)], "data.batch_size": 8, "data.num_workers": 0,
        "data.resampled": True, "data.shuffle_buffer": 16, "run.output_dir": str(out), "run.name": name,
        "run.progress": False, "run.report_to": [], "run.checkpoint_every": 100,
        "model_overrides": {"vision.layers": 1, "text.layers": 1}, **extra,
    })  # fmt: skip


def test_training_resampled_resumes_bitwise(shards, tmp_path):
    reference = train(_config(shards, tmp_path, "six", steps=6))
    train(_config(shards, tmp_path, "cut", steps=3))
    resumed = train(resume=tmp_path / "cut", overrides={"steps": 6})
    assert resumed.steps == 6
    expected, got = load_file(reference.model_path), load_file(resumed.model_path)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    plain = load_file(
        train(_config(shards, tmp_path, "plain", steps=6, **{"data.resampled": False})).model_path
    )
    assert not all(torch.equal(expected[k], plain[k]) for k in expected)  # resampling changed what was seen


def test_epochs_of_resampled_data_are_epoch_samples_long(shards, tmp_path):
    summary = train(_config(shards, tmp_path, "epochs", epochs=2, **{"data.epoch_samples": 20}))
    assert summary.steps == 5  # ceil(2 x 20 / 8)
    assert summary.epochs == pytest.approx(40 / 20)  # 5 steps x 8 pairs, counted in epochs of 20
    with pytest.raises(ConfigError, match="data.epoch_samples: resampled data .* has no passes"):
        _config(shards, tmp_path, "x", epochs=1)
    with pytest.raises(ConfigError, match="data.epoch_samples: sets the epoch of resampled data"):
        _config(shards, tmp_path, "x", steps=2, **{"data.resampled": False, "data.epoch_samples": 10})
    with pytest.raises(ConfigError, match="data.epoch_samples: invalid value"):
        _config(shards, tmp_path, "x", steps=2, **{"data.epoch_samples": -1})
