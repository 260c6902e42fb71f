"""FSDP (``parallel=fsdp``) against DDP with 2 real processes on gloo: the same losses and final weights, sharded
checkpoint folders that resume to the uninterrupted run's weights, offline consolidation to the single-file model,
and the configurations FSDP refuses."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipforge.config import ConfigError
from clipforge.train import resolve_train_config, train
from clipforge.train.checkpoint import list_checkpoints, load_resume
from tests.datasets import digits_shards
from tests.test_distributed import _run_ranks, _set_torchrun_env

STEPS = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return digits_shards(tmp_path_factory.mktemp("digits"), n=120, per_shard=30)


def _config(shards: Path, out: Path, name: str, **extra):
    return resolve_train_config(None, {
        "model": "tiny", "data.train": [str(shards)], "data.batch_size": 8, "data.num_workers": 0,
        "steps": STEPS, "run.output_dir": str(out), "run.name": name, "run.progress": False, "run.log_every": 1,
        "run.checkpoint_every": 3, "run.keep_last": 5, "run.report_to": [], "accum_steps": 2, "threads": 1,
        "optim.warmup_steps": 2, "optim.grad_clip": 0.5, "data.shuffle_buffer": 16,
        "model_overrides": {"vision.layers": 2, "text.layers": 2}, **extra,
    })  # fmt: skip


def _worker(
    rank: int, world: int, port: int, shards: str, out: str, name: str, extra: str, resume: str
) -> None:
    _set_torchrun_env(rank, world, port)
    try:
        if resume:
            summary = train(resume=resume)
        else:
            summary = train(_config(Path(shards), Path(out), name, **json.loads(extra)))
        outcome = {"steps": summary.steps, "model_path": summary.model_path}
    except Exception as error:  # reported to the test
        outcome = {"error": f"{type(error).__name__}: {error}"}
    (Path(out) / f"{name}-rank{rank}.json").write_text(json.dumps(outcome))
    os._exit(0)


def _run(shards: Path, out: Path, name: str, resume: str = "", **extra) -> list[dict]:
    codes = _run_ranks(
        _worker, (str(shards), str(out), name, json.dumps(extra), resume), world=2, deadline_s=300
    )
    outcomes = [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in range(2) if codes[r] == 0]
    assert codes == [0, 0] and all("error" not in o for o in outcomes), (codes, outcomes)
    return outcomes


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    _run(shards, out, "ddp")
    _run(shards, out, "fsdp", **{"parallel": "fsdp"})
    return out


@pytest.mark.slow
def test_fsdp_gives_ddps_losses_and_weights(runs):
    ddp, fsdp = _losses(runs / "ddp"), _losses(runs / "fsdp")
    assert len(ddp) == len(fsdp) == STEPS
    # Same arithmetic up to the order of the reductions (reduce-scatter vs all-reduce, sharded norms): fp32.
    assert fsdp == pytest.approx(ddp, rel=1e-5, abs=1e-6)
    expected, got = (
        load_file(runs / "ddp" / "model.safetensors"),
        load_file(runs / "fsdp" / "model.safetensors"),
    )
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    assert not torch.equal(expected["logit_scale"], torch.tensor(2.6593))  # the replicated scalar trained


@pytest.mark.slow
def test_sharded_checkpoints_are_complete_folders(runs):
    found = list_checkpoints(runs / "fsdp")
    assert [p.name for p in found] == ["step_00000003", "step_00000006"]
    files = {p.name for p in found[-1].iterdir()}
    assert {"SHA256SUMS", "train_state.pt", ".metadata"} <= files and any(
        f.endswith(".distcp") for f in files
    )
    path, state = load_resume(runs / "fsdp")
    assert path == found[-1] and state["step"] == STEPS and state["sharded"] and "model" not in state
    copy = runs.parent / "damaged-run"
    shutil.copytree(runs / "fsdp", copy)
    shard = sorted((copy / "checkpoints" / "step_00000006").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    path, state = load_resume(copy)  # the damaged newest folder is set aside, the one before it used
    assert path.name == "step_00000003" and state["step"] == 3
    assert (copy / "checkpoints" / "step_00000006.damaged").is_dir()


@pytest.mark.slow
def test_resume_from_a_sharded_checkpoint_is_bitwise_the_uninterrupted_run(shards, runs, tmp_path):
    run = tmp_path / "fsdp"
    shutil.copytree(runs / "fsdp", run, ignore=shutil.ignore_patterns("step_00000006", "model.safetensors"))
    outcomes = _run(shards, tmp_path, "resumed", resume=str(run))
    assert outcomes[0]["steps"] == STEPS
    expected, got = load_file(runs / "fsdp" / "model.safetensors"), load_file(run / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_consolidate_writes_the_final_model(runs, tmp_path):
    from clipforge.train.fsdp import consolidate

    target = consolidate(list_checkpoints(runs / "fsdp")[-1], tmp_path / "model.safetensors")
    expected, got = load_file(runs / "fsdp" / "model.safetensors"), load_file(target)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_fsdp_needs_several_processes(shards, tmp_path):
    with pytest.raises(ConfigError, match="parallel: fsdp shards the model over several processes"):
        train(_config(shards, tmp_path, "one", parallel="fsdp", steps=1))


def test_parallel_names_ddp_or_fsdp(shards, tmp_path):
    with pytest.raises(ConfigError, match="parallel"):
        _config(shards, tmp_path, "bad", parallel="zero3")


def test_consolidate_refuses_a_file_checkpoint(shards, tmp_path):
    from clipforge.train.fsdp import consolidate

    summary = train(_config(shards, tmp_path, "plain", steps=1, accum_steps=1))
    with pytest.raises(ConfigError, match="not a sharded"):
        consolidate(list_checkpoints(Path(summary.run_dir))[-1])


@pytest.mark.slow
def test_bf16_mixed_precision_trains_and_keeps_fp32_weights(shards, tmp_path):
    _run(shards, tmp_path, "bf16", **{"parallel": "fsdp", "precision": "bf16", "steps": 2, "accum_steps": 1})
    losses = _losses(tmp_path / "bf16")
    assert len(losses) == 2 and all(0.5 < loss < 10 for loss in losses)
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    # bf16 compute, fp32 master weights
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
