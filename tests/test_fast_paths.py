"""The inference fast paths behind their named switch (``clipforge.fast_paths``): on and off both match open_clip,
off is exactly the reference computation training runs, and the switch is scoped and honours the environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import clipforge
from clipforge.model import create_model
from clipforge.model.convert import from_openai
from clipforge.model.layers import use_fast_paths
from clipforge.model.vision import VisionTransformer
from tests.conftest import open_clip_model, random_images, random_tokens, reduced_config

pytestmark = pytest.mark.slow  # trains or loads reference models: the full suite only

TOL = 1e-5


@pytest.fixture(
    scope="module", params=[("ViT-B-32", 2, 2), ("RN50", [1, 1, 1, 1], 2)], ids=["ViT-B-32", "RN50"]
)
def pair(request):
    name, vision_layers, text_layers = request.param
    config = reduced_config(name, "quick_gelu", vision_layers, text_layers)
    reference = open_clip_model(config)
    model = create_model(config).eval()
    model.load_state_dict(from_openai(reference.state_dict(), config)[0], strict=True)
    return reference, model, config


@pytest.mark.parametrize("fast", [True, False], ids=["fast-on", "fast-off"])
def test_both_ways_match_open_clip(pair, fast):
    reference, model, config = pair
    images = random_images(3, config.vision.image_size)
    tokens = random_tokens(5, config.text.context_length)  # texts of different lengths: packing matters
    with torch.no_grad():
        ref_image, ref_text = reference.encode_image(images), reference.encode_text(tokens)
        with clipforge.fast_paths(fast):
            image, text = model.encode_image(images), model.encode_text(tokens)
    assert (image - ref_image).abs().max() <= TOL
    assert (text - ref_text).abs().max() <= TOL


def test_off_is_exactly_the_training_computation(pair):
    """With the switch off, eval-mode inference is the reference path bit for bit: the no-grad forward in train
    mode (these configs have no dropout and no BatchNorm in the compared towers' paths)."""
    _, model, config = pair
    images = random_images(2, config.vision.image_size)
    tokens = random_tokens(4, config.text.context_length)
    with torch.no_grad(), clipforge.fast_paths(False):
        text_eval = model.encode_text(tokens)
        image_eval = model.encode_image(images) if isinstance(model.visual, VisionTransformer) else None
        model.train()
        try:
            text_train = model.encode_text(tokens)
            image_train = model.encode_image(images) if image_eval is not None else None
        finally:
            model.eval()
    assert torch.equal(text_eval, text_train)
    if image_eval is not None:
        assert torch.equal(image_eval, image_train)


def test_the_switch_decides_which_path_runs(monkeypatch):
    model = create_model("tiny", vision={"layers": 1}, text={"layers": 1}).eval()
    calls = []
    original = VisionTransformer.embed_patches
    monkeypatch.setattr(
        VisionTransformer, "embed_patches", lambda self, x: calls.append(1) or original(self, x)
    )
    images = random_images(2, model.config.vision.image_size)
    with torch.no_grad():
        model.encode_image(images)
        assert calls == [1] and use_fast_paths(model.visual)
        with clipforge.fast_paths(False):
            model.encode_image(images)
            assert calls == [1] and not use_fast_paths(model.visual)
            with clipforge.fast_paths(True):  # nested: the inner setting wins, the outer comes back
                assert use_fast_paths(model.visual)
            assert not use_fast_paths(model.visual)
        assert use_fast_paths(model.visual)
    assert not use_fast_paths(model.visual)  # autograd on: never the fast paths
    model.train()
    with torch.no_grad():
        assert not use_fast_paths(model.visual)  # train mode: never the fast paths


def test_environment_turns_the_fast_paths_off():
    code = (
        "import clipforge, torch; m = clipforge.create_model('tiny').eval(); torch.set_grad_enabled(False); "
    )
    code += "from clipforge.model.layers import use_fast_paths; print(use_fast_paths(m.visual))"
    env = dict(os.environ, CLIPFORGE_FAST_PATHS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    env["CLIPFORGE_FAST_PATHS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr
