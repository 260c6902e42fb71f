"""Reporting a run's scalars to TensorBoard and W&B (offline): what metrics.jsonl holds, read back from each
tool's own files, once per step across a resume; and the config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clipforge.config import ConfigError
from clipforge.train import loggers, resolve_train_config, train
from clipforge.train.loggers import scalars_of
from clipforge.train.report import read_metrics
from tests import wandb_records
from tests.datasets import digits_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return digits_shards(tmp_path_factory.mktemp("digits"), n=96, per_shard=32)


def _config(shards: Path, out: Path, **extra):
    return resolve_train_config(None, {
        "model": "tiny", "data.train": [str(shards)], "data.batch_size": 8, "data.num_workers": 0, "steps": 4,
        "run.output_dir": str(out), "run.name": "run", "run.progress": False, "run.log_every": 1,
        "run.checkpoint_every": 2, "run.eval_every": 2, "run.report_to": ["tensorboard", "wandb"],
        "model_overrides": {"vision.layers": 1, "text.layers": 1}, **extra,
    })  # fmt: skip


def _eval_hook(context):
    return {"probe": {"top1": context.step / 10}}


def _tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _wandb_runs(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def test_scalars_flatten_nested_counts_and_drop_what_is_not_a_number():
    record = {"step": 3, "loss": 0.5, "lr": 1, "skipped": {"missing_image": 2, "bad": {"x": 1.5}},
              "epoch": None, "flag": True, "name": "a"}  # fmt: skip
    assert scalars_of(record) == {"loss": 0.5, "lr": 1.0, "skipped/missing_image": 2.0, "skipped/bad/x": 1.5}


@pytest.mark.slow  # trains twice
def test_tensorboard_and_wandb_get_every_metrics_line_once_across_a_resume(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train(_config(shards, tmp_path), hooks=[_eval_hook])
    first = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    assert sorted(first) == [1, 2, 3, 4]
    # Resume from step 2 (as after a crash past it): TensorBoard must forget steps 3-4 of the first process.
    for name in ("step_00000004.pt", "step_00000004.sha256"):
        (run_dir / "checkpoints" / name).unlink()
    (run_dir / "model.safetensors").unlink()
    summary = train(resume=run_dir, overrides={"steps": 5}, hooks=[_eval_hook])
    assert summary.steps == 5 and summary.resumed_from.endswith("step_00000002.pt")
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    assert sorted(losses) == [1, 2, 3, 4, 5] and losses[1] == first[1]

    board = _tensorboard(run_dir)
    assert [step for step, _ in board["train/loss"]] == [1, 2, 3, 4, 5]  # the first run's 3-4 were purged
    assert [value for _, value in board["train/loss"]] == pytest.approx([losses[s] for s in range(1, 6)])
    assert board["eval/probe/top1"] == [(2, pytest.approx(0.2)), (4, pytest.approx(0.4))]
    assert "train/lr" in board and "train/logit_scale" in board

    runs = _wandb_runs(run_dir)
    assert len(runs) == 2, runs  # one offline file per process, under the one saved id
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert all(path.name == f"run-{run_id}.wandb" for path in runs)
    first_rows, second_rows = (wandb_records.history(path) for path in runs)
    assert [row["train/loss"] for row in first_rows if "train/loss" in row] == pytest.approx(
        [first[s] for s in range(1, 5)]
    )
    assert [(row["_step"], row["train/loss"]) for row in second_rows if "train/loss" in row] == [
        (step, pytest.approx(losses[step])) for step in (3, 4, 5)
    ]
    assert any(row.get("eval/probe/top1") == pytest.approx(0.4) for row in second_rows)
    logged = wandb_records.config(runs[0])
    assert logged["model"] == "tiny" and logged["data"]["batch_size"] == 8


@pytest.mark.slow  # trains
def test_report_to_none_writes_only_the_metrics_file(shards, tmp_path):
    train(_config(shards, tmp_path, **{"run.report_to": [], "steps": 1}))
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "wandb").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"run.report_to": ["tensorbored"]}, r"run.report_to: unknown \['tensorbored'\]; choose from"),
        (
            {"run.wandb_mode": "cloud"},
            r"run.wandb_mode: 'cloud'; choose one of \['offline', 'online', 'disabled'\]",
        ),
    ],
)
def test_bad_reporting_settings_are_config_errors(shards, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(shards, tmp_path, **overrides)


def test_wandb_asked_for_but_missing_is_a_config_error_before_anything_starts(shards, tmp_path, monkeypatch):
    real = loggers.importlib.util.find_spec
    monkeypatch.setattr(
        loggers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name)
    )
    with pytest.raises(ConfigError, match=r"'wandb' needs the wandb package: pip install wandb"):
        _config(shards, tmp_path)
    assert not (tmp_path / "run").exists()
