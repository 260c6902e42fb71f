"""torch.compile (issue 16, item 5): compiled encoders and a compiled training run against eager, and the
clear error without a C++ compiler. Compiling takes tens of seconds on 2 cores: the full suite only."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.config import ConfigError
from clipforge.model import compile as compile_mod
from clipforge.model.compile import compile_encoders, uncompile_encoders
from clipforge.train import resolve_train_config, train
from clipforge.train.report import read_metrics
from tests.datasets import digits_shards

CAPTIONS = [
    "a cat",
    "a dog asleep on a red mat",
    "x",
    "the flag of Japan, drawn as clip art for a school project",
]


@pytest.mark.slow
def test_compiled_encoders_match_eager_with_the_fast_paths_on_and_off():
    torch.manual_seed(0)
    model = clipforge.create_model("tiny", vision={"layers": 1}, text={"layers": 1}).eval()
    size = model.config.vision.image_size
    tokens = clipforge.get_tokenizer("tiny")(CAPTIONS)
    with torch.no_grad():
        images = torch.randn(4, 3, size, size)
        eager = {fast: None for fast in (True, False)}
        for fast in eager:
            with clipforge.fast_paths(fast):
                eager[fast] = (model.encode_image(images), model.encode_text(tokens))
        compile_encoders(model)
        assert "encode_image" in model.__dict__
        compiled = (model.encode_image(images), model.encode_text(tokens))
        second = model.encode_text(tokens[:3])  # another batch size: recompiles or runs dynamic, same values
    for fast, (image_ref, text_ref) in eager.items():
        torch.testing.assert_close(
            compiled[0], image_ref, atol=1e-5, rtol=1e-5, msg=f"image, fast paths {fast}"
        )
        torch.testing.assert_close(
            compiled[1], text_ref, atol=1e-5, rtol=1e-5, msg=f"text, fast paths {fast}"
        )
    torch.testing.assert_close(second, eager[False][1][:3], atol=1e-5, rtol=1e-5)
    uncompile_encoders(model)
    assert "encode_image" not in model.__dict__


@pytest.mark.slow
def test_a_compiled_training_run_matches_the_eager_run(tmp_path):
    shards = digits_shards(tmp_path / "digits", n=48, per_shard=24)
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        config = resolve_train_config(None, {
            "model": "tiny", "data.train": [str(shards)], "data.batch_size": 8, "data.num_workers": 0,
            "steps": 3, "compile": compiled, "run.output_dir": str(tmp_path), "run.name": name,
            "run.progress": False, "run.log_every": 1, "run.report_to": [],
            "model_overrides": {"vision.layers": 1, "text.layers": 1},
        })  # fmt: skip
        summary = train(config)
        runs[name] = ([r["loss"] for r in read_metrics(tmp_path / name)], load_file(summary.model_path))
    (eager_losses, eager_weights), (losses, weights) = runs["eager"], runs["compiled"]
    assert losses == pytest.approx(eager_losses, abs=1e-4)
    assert eager_weights.keys() == weights.keys()  # the bare model is saved, no "_orig_mod." prefix
    for key in eager_weights:
        torch.testing.assert_close(weights[key], eager_weights[key], atol=1e-4, rtol=1e-4, msg=key)


def test_compile_without_a_cxx_compiler_is_a_config_error(monkeypatch):
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs a compiler, and none was found \(apt-get install g\+\+\)"):
        compile_encoders(clipforge.create_model("tiny"))
    compile_mod.check_compilable("cuda")  # a GPU needs no host C++ compiler for this check
