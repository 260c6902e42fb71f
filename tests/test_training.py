"""End-to-end training: a real-image run whose loss falls, crash-proof resume (a real SIGKILL), several processes
under torchrun, and the non-finite-loss stop."""

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

from clipforge.checkpoint import load_checkpoint
from clipforge.config import ConfigError
from clipforge.train import TrainingError, resolve_train_config, train
from clipforge.train.report import read_metrics
from tests.datasets import digits_shards, digits_table

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return digits_shards(tmp_path_factory.mktemp("digits"), n=240, per_shard=30)


@pytest.mark.slow
def test_short_run_on_real_images_learns(tmp_path):
    """Handwritten digits with captions: the contrastive loss falls well below its starting value."""
    table = digits_table(tmp_path / "digits", n=600)
    config = resolve_train_config(
        None,
        {
            "model": "tiny",
            "data.train": [str(table)],
            "data.batch_size": 32,
            "data.num_workers": 0,
            "steps": 80,
            "optim.lr": 5e-4,  # tiny CLIPs collapse to the uniform solution at lr >= 1e-3 on this data
            "optim.warmup_steps": 10,
            "run.output_dir": str(tmp_path / "runs"),
            "run.name": "digits",
            "run.log_every": 5,
            "run.checkpoint_every": 40,
            "run.progress": False,
        },
    )
    summary = train(config)
    run = Path(summary.run_dir)
    losses = [r["loss"] for r in read_metrics(run)]
    assert len(losses) == 16
    assert losses[0] > 3.2  # about ln(32) = 3.47 at the start: chance
    assert sum(losses[-2:]) / 2 < losses[0] - 0.5, losses  # measured: a drop of 0.8-1.1 over two seeds
    assert summary.skipped == {} and summary.nonfinite_steps == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "model.safetensors"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000040.pt", "step_00000040.sha256", "step_00000080.pt", "step_00000080.sha256",
    ]  # fmt: skip
    assert json.loads((run / "summary.json").read_text())["steps"] == 80
    model = load_checkpoint(run / "model.safetensors")
    assert model.config.name == "tiny"


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.Popen([sys.executable, "-m", "clipforge", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)  # fmt: skip


def _train_args(shards: Path, out: Path, name: str) -> list[str]:
    return [
        "train", "--model", "tiny", "--data", str(shards), "--batch-size", "16", "--workers", "2",
        "--steps", "40", "--checkpoint-every", "5", "--output-dir", str(out), "--name", name,
        "--set", "run.log_every=1", "--set", "run.progress=false", "--set", "threads=1",
        "--set", "data.shuffle_buffer=32", "--set", "optim.warmup_steps=3",
    ]  # fmt: skip


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(shards, tmp_path):
    reference = _cli(_train_args(shards, tmp_path, "reference"))
    output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, output

    victim = _cli(_train_args(shards, tmp_path, "victim"))
    metrics = tmp_path / "victim" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill mid-run, after the step-10 checkpoint and mid-way through a pass
        if metrics.exists() and sum(1 for _ in metrics.open()) >= 13:
            break
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "victim" / "model.safetensors").exists(), "the run finished before it was killed"
    steps_done = max(json.loads(line)["step"] for line in metrics.open())
    assert 13 <= steps_done < 40

    resumed = _cli(["train", "--resume", "latest", "--output-dir", str(tmp_path), "--name", "victim",
                    "--set", "run.progress=false"])  # fmt: skip
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert "resumed from" in output

    expected = load_file(tmp_path / "reference" / "model.safetensors")
    got = load_file(tmp_path / "victim" / "model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    steps = [json.loads(line)["step"] for line in metrics.open()]
    assert steps == list(range(1, 41))  # every step logged once, none lost or repeated


@pytest.mark.slow
def test_torchrun_two_processes(shards, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    args = _train_args(shards, tmp_path, "ddp")
    args[args.index("--steps") + 1] = "6"
    args[args.index("--workers") + 1] = "1"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "clipforge", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["samples_seen"] == 96
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step_00000006.pt", weights_only=True)
    assert state["data"]["world_size"] == 2 and len(state["data"]["positions"]) == 2  # 2 ranks x 1 worker


def test_nonfinite_losses_stop_the_run(tmp_path, monkeypatch, shards):
    import clipforge.objectives.contrastive as contrastive

    class NanLoss(torch.nn.Module):
        def forward(self, image_features, text_features, logit_scale):
            return (image_features.sum() + text_features.sum() + logit_scale) * float("nan")

    monkeypatch.setattr(contrastive, "ContrastiveLoss", lambda chunk_size=None: NanLoss())
    config = resolve_train_config(None, {
        "data.train": [str(shards)], "data.batch_size": 8, "data.num_workers": 0, "steps": 20,
        "run.output_dir": str(tmp_path), "run.name": "nan", "run.max_nonfinite": 3, "run.progress": False,
    })  # fmt: skip
    with pytest.raises(TrainingError, match=r"stopping at step 3: the loss or gradient was not finite for 3"):
        train(config)


@pytest.mark.slow
def test_resume_refuses_changes_that_break_exactness(tmp_path, shards):
    config = resolve_train_config(None, {
        "data.train": [str(shards)], "data.batch_size": 8, "data.num_workers": 0, "steps": 2,
        "run.output_dir": str(tmp_path), "run.name": "short", "run.progress": False,
    })  # fmt: skip
    train(config)
    with pytest.raises(ConfigError, match="cannot change 'optim.lr' when resuming"):
        train(resume=tmp_path / "short", overrides={"optim.lr": 1.0})
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(config)
    summary = train(resume=tmp_path / "short", overrides={"steps": 4})  # extending the run is allowed
    assert summary.steps == 4 and summary.resumed_from.endswith("step_00000002.pt")


@pytest.mark.slow
def test_time_limit_stops_early_with_a_checkpoint_and_the_model(tmp_path, shards):
    config = resolve_train_config(None, {
        "data.train": [str(shards)], "data.batch_size": 8, "data.num_workers": 0, "steps": 50,
        "run.output_dir": str(tmp_path), "run.name": "timed", "run.progress": False, "run.time_limit_s": 1e-6,
        "run.checkpoint_every": 100,
    })  # fmt: skip
    summary = train(config)
    assert summary.stopped_early and summary.steps == 1 and summary.samples_seen == 8
    assert (tmp_path / "timed" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "timed" / "checkpoints").iterdir()) == [
        "step_00000001.pt", "step_00000001.sha256",
    ]  # fmt: skip
    assert [r["step"] for r in read_metrics(tmp_path / "timed")] == [1]
