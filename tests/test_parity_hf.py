"""The ViT configs against Hugging Face ``transformers.CLIPModel`` with the same random weights (≤ 1e-5 fp32),
both directions of the key map, and loading clipforge's HF export with ``CLIPModel.from_pretrained``."""

from __future__ import annotations

import warnings

import pytest
import torch

from clipforge.checkpoint import export_checkpoint, load_checkpoint
from clipforge.model import create_model
from clipforge.model.convert import config_from_hf, config_to_hf, from_hf, to_hf
from tests.conftest import random_images, random_tokens, reduced_config

pytestmark = pytest.mark.slow  # transformers models built and compared, seconds each

TOL = 1e-5

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    transformers = pytest.importorskip("transformers")


def hf_model(config):
    hf_config = transformers.CLIPConfig.from_dict(config_to_hf(config))
    torch.manual_seed(1)
    return transformers.CLIPModel(hf_config).eval()


def hf_features(model, images, tokens):
    with torch.no_grad():
        image = model.get_image_features(pixel_values=images)
        text = model.get_text_features(input_ids=tokens)
        out = model(input_ids=tokens, pixel_values=images)
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    return image, text, out.logits_per_image


@pytest.mark.parametrize(
    ("name", "activation", "layers"),
    [
        ("ViT-B-32", "quick_gelu", None),
        ("ViT-B-32", "gelu", 2),
        ("ViT-B-16", "quick_gelu", 2),
        ("ViT-L-14", "quick_gelu", 2),
        ("ViT-L-14-336", "quick_gelu", 1),
    ],
)
def test_matches_transformers(name, activation, layers):
    config = reduced_config(name, activation, layers, layers)
    reference = hf_model(config)
    state = reference.state_dict()

    assert config_from_hf(config_to_hf(config), name=name) == config
    model = create_model(config).eval()
    converted, dropped = from_hf(state, config)
    assert all(k.endswith("position_ids") for k in dropped)
    model.load_state_dict(converted, strict=True)

    images = random_images(2, config.vision.image_size)
    tokens = random_tokens(3, config.text.context_length, seed=3)
    ref_image, ref_text, ref_logits = hf_features(reference, images, tokens)
    with torch.no_grad():
        out = model(images, tokens)
        image, text = model.encode_image(images), model.encode_text(tokens)
    assert (image - ref_image).abs().max() <= TOL
    assert (text - ref_text).abs().max() <= TOL
    logits = out.logit_scale * out.image_features @ out.text_features.T
    assert (logits - ref_logits).abs().max() <= TOL

    back = to_hf(model.state_dict(), config)
    weights = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    assert back.keys() == weights.keys()
    for key, tensor in weights.items():
        assert torch.equal(back[key], tensor), key


def test_export_loads_in_transformers(tmp_path):
    config = reduced_config("ViT-B-32", "quick_gelu", 2, 2)
    model = create_model(config).eval()
    folder = export_checkpoint(model, tmp_path / "hf", to="hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = transformers.CLIPModel.from_pretrained(folder).eval()
    images, tokens = random_images(2, 224), random_tokens(2, 77)
    ref_image, ref_text, _ = hf_features(reference, images, tokens)
    with torch.no_grad():
        assert (model.encode_image(images) - ref_image).abs().max() <= TOL
        assert (model.encode_text(tokens) - ref_text).abs().max() <= TOL

    reloaded = load_checkpoint(folder)
    assert reloaded.config.vision == config.vision and reloaded.config.text == config.text
    for key, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
