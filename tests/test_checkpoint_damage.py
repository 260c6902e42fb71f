"""Damaged checkpoints and a full disk (issue 15, item 3): a truncated or altered newest checkpoint is detected by
the checksum recorded at save time and the run resumes from the one before it; garbage is never loaded; a failed
write leaves no partial file and the previous checkpoint intact. Also the non-finite stop names its batch."""

from __future__ import annotations

import errno
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from clipforge.checkpoint import CheckpointError
from clipforge.train import TrainingError, resolve_train_config, train
from clipforge.train import checkpoint as ckpt
from tests.datasets import digits_shards

pytestmark = pytest.mark.slow  # trains or loads reference models: the full suite only


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return digits_shards(tmp_path_factory.mktemp("digits"), n=96, per_shard=24)


def _config(shards, out, name="run", **extra):
    return resolve_train_config(None, {
        "model": "tiny", "data.train": [str(shards)], "data.batch_size": 8, "data.num_workers": 0, "steps": 6,
        "run.output_dir": str(out), "run.name": name, "run.progress": False, "run.checkpoint_every": 2,
        "run.keep_last": 3, "model_overrides": {"vision.layers": 1, "text.layers": 1}, **extra,
    })  # fmt: skip


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory):
    """A 6-step run with checkpoints at steps 2, 4, 6 and its final weights."""
    out = tmp_path_factory.mktemp("finished")
    summary = train(_config(shards, out))
    return out / "run", load_file(summary.model_path)


def _copy_run(finished, tmp_path):
    import shutil

    run, weights = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "model.safetensors").unlink()
    return copy, weights


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def test_checksum_is_recorded_in_sha256sum_format(finished):
    run, _ = finished
    path = run / "checkpoints" / "step_00000006.pt"
    digest, name = (run / "checkpoints" / "step_00000006.sha256").read_text().split()
    assert name == path.name and digest == ckpt.file_sha256(path)
    assert ckpt.verify_checksum(path) is True


@pytest.mark.parametrize("damage", [_truncate, _flip_byte], ids=["truncated", "flipped-byte"])
def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(finished, tmp_path, damage, caplog):
    run, weights = _copy_run(finished, tmp_path)
    newest = run / "checkpoints" / "step_00000006.pt"
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="clipforge.train"):
        path, state = ckpt.load_resume(run)
    assert path.name == "step_00000004.pt" and state["step"] == 4
    assert "step_00000006.pt: damaged (truncated or changed since it was saved)" in caplog.text
    assert "falling back to the checkpoint before it" in caplog.text
    assert not newest.exists() and (run / "checkpoints" / "step_00000006.pt.damaged").is_file()  # kept aside

    summary = train(resume=run)  # continues from step 4 to the same weights as the run that was never damaged
    assert summary.resumed_from.endswith("step_00000004.pt") and summary.steps == 6
    got = load_file(summary.model_path)
    assert all(torch.equal(weights[key], got[key]) for key in weights)
    assert ckpt.verify_checksum(newest) is True  # step 6 written again, intact


def test_two_damaged_fall_back_twice_and_all_damaged_is_an_error(finished, tmp_path):
    run, _ = _copy_run(finished, tmp_path)
    _flip_byte(run / "checkpoints" / "step_00000006.pt")
    _truncate(run / "checkpoints" / "step_00000004.pt")
    path, state = ckpt.load_resume(run)
    assert path.name == "step_00000002.pt" and state["step"] == 2
    _truncate(path)
    with pytest.raises(
        CheckpointError, match=r"no intact training checkpoint to resume from \(.*step_00000002"
    ):
        ckpt.load_resume(run)


def test_a_named_damaged_checkpoint_is_refused_not_replaced(finished, tmp_path):
    run, _ = _copy_run(finished, tmp_path)
    path = run / "checkpoints" / "step_00000006.pt"
    _flip_byte(path)
    with pytest.raises(CheckpointError, match=r"damaged .* resume from the run folder instead"):
        ckpt.load_resume(path)
    assert path.exists()  # the user named this file: it is not renamed


def test_truncated_checkpoint_without_checksum_is_an_error_not_garbage(finished, tmp_path, caplog):
    run, _ = _copy_run(finished, tmp_path)
    path = run / "checkpoints" / "step_00000006.pt"
    path.with_suffix(".sha256").unlink()  # as saved before checksums existed
    with caplog.at_level(logging.WARNING, logger="clipforge.train"):
        assert ckpt.load_training_checkpoint(path)["step"] == 6  # intact: loads, unverified, with a warning
    assert "no checksum recorded" in caplog.text
    _truncate(path)
    with pytest.raises(CheckpointError, match="cannot read the training checkpoint"):
        ckpt.load_training_checkpoint(path)
    assert ckpt.load_resume(run)[0].name == "step_00000004.pt"


@pytest.mark.parametrize("failing", ["checkpoint", "checksum"])
def test_disk_full_while_checkpointing_stops_cleanly(shards, tmp_path, monkeypatch, failing):
    """ENOSPC simulated in the writer after half the bytes went out, on the second checkpoint (step 4)."""
    real_save, real_write = torch.save, ckpt.Path.write_text
    calls = {"n": 0}

    def full_disk():
        return OSError(errno.ENOSPC, "No space left on device")

    def save(obj, target):
        calls["n"] += 1
        if failing == "checkpoint" and calls["n"] == 2:
            real_save(obj, target)
            _truncate(target)
            raise full_disk()
        real_save(obj, target)

    def write_text(self, text, *args, **kwargs):
        if failing == "checksum" and self.name.startswith(".step_00000004.sha256"):
            raise full_disk()
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)
    monkeypatch.setattr(ckpt.Path, "write_text", write_text)
    with pytest.raises(TrainingError) as caught:
        train(_config(shards, tmp_path))
    message = str(caught.value)
    assert (
        "stopping at step 4: could not write the checkpoint" in message
        and "No space left on device" in message
    )
    assert "the previous checkpoint" in message and "step_00000002.pt is intact" in message
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "step_00000002.pt",
        "step_00000002.sha256",
    ]  # no partials
    monkeypatch.undo()
    assert ckpt.load_resume(tmp_path / "run")[1]["step"] == 2
    assert train(resume=tmp_path / "run").steps == 6  # after freeing space the run goes on


def test_nonfinite_stop_names_the_batch_samples(tmp_path, monkeypatch, shards):
    import clipforge.objectives.contrastive as contrastive

    class NanLoss(torch.nn.Module):
        def forward(self, image_features, text_features, logit_scale):
            return (image_features.sum() + text_features.sum() + logit_scale) * float("nan")

    monkeypatch.setattr(contrastive, "ContrastiveLoss", lambda chunk_size=None: NanLoss())
    config = _config(shards, tmp_path, **{"run.max_nonfinite": 2, "steps": 20})
    with pytest.raises(
        TrainingError, match=r"stopping at step 2: the loss or gradient was not finite"
    ) as caught:
        train(config)
    listed = tmp_path / "run" / "nonfinite-step_00000002-rank_0.json"
    assert str(listed) in str(caught.value)
    record = json.loads(listed.read_text())
    assert record["step"] == 2 and len(record["samples"]) == 8
    source, key = record["samples"][0]
    assert (
        source == str(shards) and key.startswith("shard-") and f"first: {source} {key}" in str(caught.value)
    )
    assert len({tuple(s) for s in record["samples"]}) == 8  # eight distinct samples, each findable again
