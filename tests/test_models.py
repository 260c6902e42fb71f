"""Every named config builds, runs forward and backward; the model API behaves as documented."""

from __future__ import annotations

import math

import pytest
import torch

from clipforge.config import ConfigError, get_model_config, list_models, merge
from clipforge.model import CLIP, CLIPOutput, create_model
from tests.conftest import random_images, random_tokens

PAPER_MODELS = [
    "RN50",
    "RN101",
    "RN50x4",
    "RN50x16",
    "RN50x64",
    "ViT-B-32",
    "ViT-B-16",
    "ViT-L-14",
    "ViT-L-14-336",
]


def test_registry_lists_paper_and_cpu_configs():
    names = list_models()
    for name in [*PAPER_MODELS, "tiny", "small"]:
        assert name in names


def _slow(name: str) -> bool:
    """The paper's full-size models and the pretrained-tower ones take seconds each; the fast tier runs the rest."""
    config = get_model_config(name)
    return name in PAPER_MODELS or config.vision.tower is not None or config.text.tower is not None


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if _slow(n) else n for n in list_models()]
)
def test_forward_backward_every_config(name):
    """Full width and depth; a small input (the smallest image the architecture accepts near 64 px)."""
    config = get_model_config(name)
    small = 4 * config.vision.patch_size if config.vision.arch == "vit" else 64
    model = create_model(name, vision={"image_size": min(small, config.vision.image_size)})
    images = random_images(2, model.image_size)
    tokens = random_tokens(2, 12, vocab_size=config.text.vocab_size)
    out = model(images, tokens)
    assert isinstance(out, CLIPOutput)
    assert out.image_features.shape == (2, config.embed_dim) == out.text_features.shape
    loss = (out.logit_scale * out.image_features @ out.text_features.T).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    missing = [n for n, g in grads.items() if g is None]
    # Token rows never looked up get a zero gradient, never None; everything takes part in the loss.
    assert missing == []
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_logit_scale_initialisation_and_clamp():
    model = create_model("tiny")
    assert math.isclose(model.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale_()
    assert math.isclose(model.logit_scale.exp().item(), 100.0, rel_tol=1e-5)


def test_encode_normalize_flag():
    model = create_model("tiny").eval()
    images, tokens = random_images(3, 32), random_tokens(3, 32)
    with torch.no_grad():
        raw, unit = model.encode_image(images), model.encode_image(images, normalize=True)
        assert torch.allclose(unit, raw / raw.norm(dim=-1, keepdim=True), atol=1e-6)
        text = model.encode_text(tokens, normalize=True)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-6)


def test_text_features_ignore_padding_length():
    """Under the causal mask the end-token embedding cannot depend on what follows it."""
    model = create_model("tiny").eval()
    tokens = random_tokens(4, 32, seed=5)
    longest = int(tokens.argmax(-1).max()) + 1
    with torch.no_grad():
        full = model.encode_text(tokens)
        trimmed = model.encode_text(tokens[:, :longest])
        garbage = tokens.clone()
        for row in range(4):  # junk (not padding) after each end token must not matter either
            end = int(tokens[row].argmax())
            garbage[row, end + 1 :] = torch.randint(1, 1000, (32 - end - 1,))
        assert torch.allclose(model.encode_text(garbage), full, atol=1e-6)
    assert torch.allclose(full, trimmed, atol=1e-6)


def test_text_pools_at_end_token():
    """encode_text (packed inference path and training path) equals the padded computation read at each row's
    end token."""
    model = create_model("tiny").eval()
    tokens = random_tokens(6, 32, seed=1)
    text = model.text
    with torch.no_grad():
        features = model.encode_text(tokens)
        x = text.token_embed(tokens) + text.pos_embed[: tokens.shape[1]]
        for block in text.transformer.blocks:
            x = block(x, causal=True)
        expected = text.proj(text.norm_final(x)[torch.arange(6), tokens.argmax(-1)])
    trained = model.encode_text(tokens).detach()  # with autograd: the plain padded path
    assert torch.allclose(features, expected, atol=1e-6)
    assert torch.allclose(trained, expected, atol=1e-6)


@pytest.mark.slow
def test_gradient_checkpointing_gives_same_gradients():
    images, tokens = random_images(2, 32), random_tokens(2, 32)
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = create_model("tiny")
        model.set_grad_checkpointing(enabled)
        out = model(images, tokens)
        (out.logit_scale * out.image_features @ out.text_features.T).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_resize_image(name):
    model = create_model(name).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    size = model.image_size
    model.resize_image(size)  # same size: nothing changes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.resize_image(size * 2)
    assert model.config.vision.image_size == size * 2
    with torch.no_grad():
        assert model.encode_image(random_images(1, size * 2)).shape == (1, 128)
    with pytest.raises(ValueError, match="resize_image"):
        model.encode_image(random_images(1, size))


def test_resize_context():
    model = create_model("tiny").eval()
    tokens = random_tokens(2, 16, seed=2)
    with torch.no_grad():
        before = model.encode_text(tokens)
        model.resize_context(16)
        assert model.config.text.context_length == 16
        assert torch.allclose(model.encode_text(tokens), before, atol=1e-6)  # truncation keeps positions
        model.resize_context(40)
        assert model.text.pos_embed.shape == (40, 128)
    with pytest.raises(ValueError, match="context length"):
        model.encode_text(random_tokens(1, 41))


def test_unknown_model_suggests_close_names():
    with pytest.raises(ConfigError, match=r"unknown model 'ViT-B-33'.*ViT-B-32"):
        create_model("ViT-B-33")


def test_bad_overrides_name_the_field():
    with pytest.raises(ConfigError, match=r"unknown field 'depth'"):
        create_model("tiny", vision={"depth": 3})
    with pytest.raises(ConfigError, match=r"text.width 130 is not a multiple of text.heads 4"):
        create_model("tiny", text={"width": 130})
    with pytest.raises(ConfigError, match=r"not a multiple of vision.patch_size"):
        create_model("tiny", vision={"image_size": 30})
    with pytest.raises(ConfigError, match=r"activation: 'relu' is not one of"):
        create_model("tiny", activation="relu")
    with pytest.raises(ConfigError, match=r"4 positive stage depths"):
        create_model("tiny-rn", vision={"layers": [1, 1]})


def test_dotted_overrides_and_config_file(tmp_path):
    config = merge(get_model_config("tiny"), {"vision.layers": 2, "text.heads": 2})
    assert config.vision.layers == 2 and config.text.heads == 2
    path = tmp_path / "mine.json"
    path.write_text(config.to_json())
    model = create_model(str(path))
    assert isinstance(model, CLIP) and model.config.vision.layers == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("embed_dim: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        create_model(str(bad))
