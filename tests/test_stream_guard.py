"""No unbounded waits on bad training data: a source with no usable sample, too many skips, a data-loader worker
that dies or stalls. Each stops with a TrainingError (exit status 1) naming the source, the rule and the counts."""

from __future__ import annotations

import csv
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from clipforge.cli import main as cli_main
from clipforge.data.raw import RawSample
from clipforge.data.skipguard import SkipGuard, SkipPolicy, StreamFailure
from clipforge.data.stream import SampleDecoder, TrainStream
from clipforge.tokenizer import get_tokenizer
from clipforge.train import TrainingError, resolve_train_config, train
from clipforge.train.data import next_batch, train_loader
from clipforge.transforms import get_transforms
from tests.datasets import digits_table

# ---------------------------------------------------------------------------------------------------------------
# The rules on their own


def test_whole_pass_rule_fires_one_past_a_pass_plus_the_buffer():
    guard = SkipGuard(["s"], SkipPolicy(max_skip_fraction=1.0), buffer_size=2)
    for _ in range(3):
        assert guard.record(0, "missing_image", "a.png") is None  # pass size not known yet
    assert guard.pass_end(0, 3) is None
    assert guard.record(0, "missing_image") is None  # 4 in a row
    assert guard.record(0, "missing_image") is None  # 5 = pass 3 + buffer 2
    failure = guard.record(0, "missing_image")
    assert isinstance(failure, StreamFailure)
    assert "no usable sample in a whole pass (3 samples" in failure.message
    assert "missing_image 6" in failure.message and "First missing_image: a.png" in failure.message
    assert failure.counts == {"missing_image": 6}


def test_a_good_sample_resets_the_whole_pass_rule():
    guard = SkipGuard(["s"], SkipPolicy(max_skip_fraction=1.0), buffer_size=0)
    guard.pass_end(0, 4)
    for _ in range(50):
        for _ in range(4):
            assert guard.record(0, "image_corrupt") is None
        assert guard.record(0, None) is None


def test_share_rule_fires_as_soon_as_the_share_is_certain_and_only_in_the_window():
    guard = SkipGuard(["s"], SkipPolicy(max_skip_fraction=0.5, window=10), buffer_size=0)
    for _ in range(5):
        assert guard.record(0, "image_corrupt") is None  # 5 of 10 is not more than half
    failure = guard.record(0, "image_corrupt")
    assert failure is not None and "6 of its first 6 samples were skipped" in failure.message
    late = SkipGuard(["s"], SkipPolicy(max_skip_fraction=0.5, window=10), buffer_size=0)
    for reason in [None] * 10 + ["image_corrupt"] * 20:  # past the window, only the whole-pass rule counts
        assert late.record(0, reason) is None


def test_an_empty_pass_fails_at_once_and_sources_are_told_apart():
    guard = SkipGuard(["good", "gone"], SkipPolicy(), buffer_size=10, partition=1, partitions=4)
    assert guard.pass_end(0, 5) is None
    failure = guard.pass_end(1, 0)
    assert failure is not None
    assert "source 'gone' gave no samples in a whole pass (data partition 1 of 4)" in failure.message


# ---------------------------------------------------------------------------------------------------------------
# The cases, end to end


def _table(folder: Path, rows: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return path


def test_cli_one_row_naming_a_missing_image_exits_1_with_counts(tmp_path, capsys):
    """The defect as filed: one row, the image missing, default workers: it used to sit at 0/1 forever."""
    table = _table(tmp_path / "data", [("nope.png", "a cat")])
    started = time.monotonic()
    status = cli_main(
        ["train", "--model", "tiny", "--data", str(table), "--steps", "1", "--output-dir", str(tmp_path / "runs"),
         "--name", "r"]
    )  # fmt: skip
    assert status == 1
    assert time.monotonic() - started < 60
    message = capsys.readouterr().err
    assert "source '" in message and "pairs.csv" in message
    assert "Skipped by reason: missing_image" in message and "nope.png" in message
    assert "check the paths" in message and "No step was taken" in message


def test_folder_of_unreadable_images_stops(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for index in range(4):
        (folder / f"{index}.png").write_bytes(b"not a png at all")
        (folder / f"{index}.txt").write_text(f"a drawing number {index}")
    config = resolve_train_config(
        None,
        {"data.train": [str(folder)], "data.num_workers": 0, "steps": 1, "run.output_dir": str(tmp_path / "runs"),
         "run.progress": False},
    )  # fmt: skip
    with pytest.raises(
        TrainingError, match=r"Skipped by reason: image_not_image \d+\. First image_not_image"
    ):
        train(config)


@pytest.mark.slow
def test_one_dead_source_among_good_ones_is_named(tmp_path):
    """With the share rule off, a source that never decodes still stops the run (whole-pass rule), by name."""
    good = digits_table(tmp_path / "good", n=40)
    bad = _table(tmp_path / "bad", [(f"missing_{i}.png", "a digit") for i in range(5)])
    config = resolve_train_config(
        None,
        {"data.train": [str(good), str(bad)], "data.weights": [0.9, 0.1], "data.num_workers": 0,
         "data.max_skip_fraction": 1.0, "data.shuffle_buffer": 8, "data.batch_size": 8, "steps": 500,
         "run.output_dir": str(tmp_path / "runs"), "run.progress": False, "run.checkpoint_every": 1000},
    )  # fmt: skip
    with pytest.raises(
        TrainingError, match=r"source '.*bad.*pairs\.csv' gave no usable sample in a whole pass"
    ):
        train(config)


@pytest.mark.slow
def test_skips_under_the_share_train_normally(tmp_path):
    """A few broken rows among good ones are skipped and counted, and the run finishes."""
    good = digits_table(tmp_path / "good", n=30)
    rows = list(csv.reader(good.read_text().splitlines()))[1:]
    rows = [(str(good.parent / name), text) for name, text in rows] + [("gone.png", "a digit")] * 3
    table = _table(tmp_path / "mixed", rows)
    config = resolve_train_config(
        None,
        {"data.train": [str(table)], "data.num_workers": 0, "data.batch_size": 8, "steps": 3,
         "run.output_dir": str(tmp_path / "runs"), "run.progress": False},
    )  # fmt: skip
    summary = train(config)
    assert summary.steps == 3 and summary.skipped.get("missing_image", 0) >= 1


# ---------------------------------------------------------------------------------------------------------------
# Loader workers that die or stall


class _HostileSource:
    """One unit, one row; reading it kills the worker process or makes it hang."""

    unit_kind = "row"

    def __init__(self, behaviour: str) -> None:
        self.name = f"hostile-{behaviour}"
        self.behaviour = behaviour

    def num_units(self) -> int:
        return 1

    def num_samples(self) -> int:
        return 1

    def iter_unit(self, index: int) -> Iterator[RawSample]:
        if self.behaviour == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
        yield RawSample("x", None, ("a",), "x")


def _loader(source, timeout_s: float):
    decoder = SampleDecoder(get_transforms("tiny", train=True))
    stream = TrainStream([source], [1.0], decoder, get_tokenizer("tiny"), batch_size=2, seed=0, num_workers=1)
    return iter(train_loader(stream, 1, torch.device("cpu"), timeout_s))


def test_a_worker_killed_by_a_signal_is_a_clear_error(tmp_path):
    started = time.monotonic()
    with pytest.raises(
        TrainingError, match="data-loader worker failed.*(killed by signal|exited unexpectedly)"
    ):
        next_batch(_loader(_HostileSource("die"), 0), 0, tmp_path)
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_a_stalled_worker_times_out(tmp_path):
    started = time.monotonic()
    with pytest.raises(
        TrainingError, match=r"stopping at step 4: .*timed out after 2 seconds.*Checkpoints so far"
    ):
        next_batch(_loader(_HostileSource("stall"), 2), 3, tmp_path)
    assert time.monotonic() - started < 30


# ---------------------------------------------------------------------------------------------------------------
# A distributed rank that never arrives


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_that_never_arrives_is_named(monkeypatch, rank):
    from clipforge.distributed import DistributedError, init_distributed

    port = _free_port()
    if rank == 1:  # rank 0 holds the store but rank 2 never comes; rank 1 is told which
        import datetime

        import torch.distributed as dist

        host = dist.TCPStore("127.0.0.1", port, 3, is_master=True, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=10))  # fmt: skip
        host.set("clipforge/arrived/0/0", "1")
    env = {"RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    expected = "rank(s) 1, 2 of 3 never joined" if rank == 0 else "rank(s) 2 of 3 never joined"
    with pytest.raises(
        DistributedError, match=rf"rank {rank}: {re.escape(expected)} at 127\.0\.0\.1:{port} within 2 s"
    ):
        init_distributed("gloo", timeout_s=2)
    assert time.monotonic() - started < 20


@pytest.mark.slow
def test_no_rank_zero_to_reach_is_a_clear_error(monkeypatch):
    from clipforge.distributed import DistributedError, init_distributed

    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(DistributedError, match="rank 1: could not reach the rendezvous at 127.0.0.1"):
        init_distributed("gloo", timeout_s=2)
