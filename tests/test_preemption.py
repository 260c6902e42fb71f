"""Preemption (issue 15, item 2): SIGTERM or SIGINT during training finishes the step, writes a checkpoint, exits
with 128 + the signal, and ``--resume latest`` then continues bitwise-identically. Real signals, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipforge.train import Preempted, resolve_train_config, train
from clipforge.train.checkpoint import load_resume
from tests.datasets import digits_shards
from tests.test_distributed import _run_ranks, _set_torchrun_env

pytestmark = pytest.mark.slow  # trains or loads reference models: the full suite only

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return digits_shards(tmp_path_factory.mktemp("digits"), n=240, per_shard=30)


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.Popen([sys.executable, "-m", "clipforge", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)  # fmt: skip


def _train_args(shards: Path, out: Path, name: str) -> list[str]:
    return [
        "train", "--model", "tiny", "--data", str(shards), "--batch-size", "16", "--workers", "2",
        "--steps", "30", "--checkpoint-every", "10", "--output-dir", str(out), "--name", name,
        "--set", "run.log_every=1", "--set", "run.progress=false", "--set", "threads=1",
        "--set", "data.shuffle_buffer=32", "--set", "optim.warmup_steps=3",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("reference")
    run = _cli(_train_args(shards, out, "reference"))
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output
    return load_file(out / "reference" / "model.safetensors")


def _wait_for_steps(metrics: Path, steps: int, victim: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if metrics.exists() and sum(1 for _ in metrics.open()) >= steps:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach step {steps}: {victim.communicate()[0]}")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_then_resume_is_bitwise_identical(shards, tmp_path, reference, signum):
    """SIGTERM to the trainer alone (as ``kill`` or a scheduler does); SIGINT to the whole process group, data
    workers included (as Ctrl-C in a terminal does): the workers must not die of it."""
    victim = _cli(_train_args(shards, tmp_path, "victim"), start_new_session=True)
    _wait_for_steps(tmp_path / "victim" / "metrics.jsonl", 13, victim)  # after the step-10 checkpoint
    if signum == signal.SIGINT:
        os.killpg(victim.pid, signum)
    else:
        victim.send_signal(signum)
    output, _ = victim.communicate(timeout=120)
    assert victim.returncode == 128 + signum, output
    name = signal.Signals(signum).name
    assert f"{name} received: stopped after step" in output and "continue with --resume latest" in output
    stopped = int(output.split("stopped after step ")[1].split(",")[0])
    assert 13 <= stopped < 30
    folder = tmp_path / "victim" / "checkpoints"
    assert (folder / f"step_{stopped:08d}.pt").is_file() and (folder / f"step_{stopped:08d}.sha256").is_file()
    assert not (tmp_path / "victim" / "model.safetensors").exists()
    assert not list(folder.glob(".*"))  # no temporaries left
    steps = [json.loads(line)["step"] for line in (tmp_path / "victim" / "metrics.jsonl").open()]
    assert steps == list(range(1, stopped + 1))

    resumed = _cli(["train", "--resume", "latest", "--output-dir", str(tmp_path), "--name", "victim",
                    "--set", "run.progress=false"])  # fmt: skip
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert f"resumed from {folder / f'step_{stopped:08d}.pt'} at step {stopped}" in output
    got = load_file(tmp_path / "victim" / "model.safetensors")
    assert reference.keys() == got.keys()
    for key in reference:
        assert torch.equal(reference[key], got[key]), key


def _config(shards: Path, out: Path, **extra):
    return resolve_train_config(None, {
        "model": "tiny", "data.train": [str(shards)], "data.batch_size": 8, "data.num_workers": 0, "steps": 8,
        "run.output_dir": str(out), "run.name": "run", "run.progress": False, "run.checkpoint_every": 100,
        "model_overrides": {"vision.layers": 1, "text.layers": 1}, **extra,
    })  # fmt: skip


def _signal_at(step: int, signum: int = signal.SIGTERM):
    def hook(context):
        if context.step == step:
            os.kill(os.getpid(), signum)
        return {}

    return hook


def test_sigterm_in_process_raises_preempted_with_the_checkpoint(shards, tmp_path):
    config = _config(shards, tmp_path, **{"run.eval_every": 1})
    with pytest.raises(Preempted) as caught:
        train(config, hooks=[_signal_at(3)])
    error = caught.value
    assert (error.signum, error.step, error.exit_status) == (signal.SIGTERM, 3, 143)
    assert error.checkpoint == tmp_path / "run" / "checkpoints" / "step_00000003.pt"
    assert "SIGTERM received: stopped after step 3, checkpoint" in str(error)
    path, state = load_resume(tmp_path / "run")
    assert path == error.checkpoint and state["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back

    summary = train(resume=tmp_path / "run")
    assert summary.steps == 8 and summary.resumed_from == str(error.checkpoint)
    reference = train(_config(shards, tmp_path, **{"run.name": "reference"}))
    expected, got = load_file(reference.model_path), load_file(summary.model_path)
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_a_signal_on_a_checkpoint_step_writes_no_second_checkpoint(shards, tmp_path):
    config = _config(shards, tmp_path, **{"run.eval_every": 1, "run.checkpoint_every": 2})
    with pytest.raises(Preempted) as caught:
        train(config, hooks=[_signal_at(4, signal.SIGINT)])
    assert caught.value.exit_status == 130 and caught.value.step == 4
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_00000002.pt", "step_00000002.sha256", "step_00000004.pt", "step_00000004.sha256"]


def test_a_signal_on_the_last_step_finishes_the_run(shards, tmp_path):
    config = _config(shards, tmp_path, **{"run.eval_every": 1})
    summary = train(config, hooks=[_signal_at(8)])
    assert summary.steps == 8 and Path(summary.model_path).is_file()


# ---- under torchrun: one rank's loader dies with the signal, the other's does not ----


def _ddp_worker(rank: int, world: int, port: int, shards: str, out: str, name: str, drop_on_rank: int,
                resume: bool) -> None:  # fmt: skip
    """One rank of a 2-rank run (gloo). With ``drop_on_rank`` >= 0, that rank gets SIGTERM while fetching step 4's
    batch and its loader "dies" with it (a TrainingError, as when the signal kills a worker); the other rank's
    batch arrives. Writes this rank's outcome to ``out/rank{rank}.json``."""
    import clipforge.train.loop as loop
    from clipforge.train import TrainingError as Error

    _set_torchrun_env(rank, world, port)
    real_next_batch = loop.next_batch

    def next_batch(batches, step, run_dir):
        if rank == drop_on_rank and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            raise Error("stopping at step 4: a data-loader worker failed (killed by signal: Terminated)")
        return real_next_batch(batches, step, run_dir)

    loop.next_batch = next_batch
    outcome: dict = {}
    try:
        if resume:
            summary = train(resume=Path(out) / name)
        else:
            summary = train(_config(Path(shards), Path(out), **{"run.name": name}))
        outcome = {"steps": summary.steps, "resumed_from": summary.resumed_from}
    except Preempted as error:
        outcome = {"preempted_at": error.step, "exit_status": error.exit_status, "checkpoint": str(error.checkpoint)}
    except Exception as error:  # reported to the test
        outcome = {"error": f"{type(error).__name__}: {error}"}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(outcome))
    os._exit(0)


def _ddp_run(shards: Path, out: Path, name: str, drop_on_rank: int = -1, resume: bool = False) -> list[dict]:
    for rank in range(2):
        (out / f"rank{rank}.json").unlink(missing_ok=True)
    exitcodes = _run_ranks(_ddp_worker, (str(shards), str(out), name, drop_on_rank, resume), world=2, deadline_s=180)
    outcomes = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2) if exitcodes[rank] == 0]
    assert exitcodes == [0, 0], (exitcodes, outcomes)
    return outcomes


@pytest.mark.parametrize("drop_on_rank", [0, 1])
def test_a_step_dropped_on_one_rank_is_dropped_on_all_and_resume_is_exact(shards, tmp_path, drop_on_rank):
    outcomes = _ddp_run(shards, tmp_path, "run", drop_on_rank)
    checkpoint = str(tmp_path / "run" / "checkpoints" / "step_00000003.pt")
    assert outcomes == [{"preempted_at": 3, "exit_status": 143, "checkpoint": checkpoint}] * 2

    reference = _ddp_run(shards, tmp_path, "reference")  # the same run, uninterrupted
    assert reference == [{"steps": 8, "resumed_from": None}] * 2
    outcomes = _ddp_run(shards, tmp_path, "run", resume=True)
    assert outcomes == [{"steps": 8, "resumed_from": checkpoint}] * 2
    expected = load_file(tmp_path / "reference" / "model.safetensors")
    got = load_file(tmp_path / "run" / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
