"""Every named architecture against open_clip with the same random weights: max |Δ| ≤ 1e-5 in fp32.

Large configs run at reduced depth (widths, heads, patch and image sizes unchanged); ViT-B-32 and RN50 also run at
full depth. Weights go open_clip -> clipforge through the OpenAI key map and back, so the round trip is checked too.
"""

from __future__ import annotations

import pytest
import torch

from clipforge.config import get_model_config, list_models
from clipforge.model import create_model
from clipforge.model.convert import from_openai, infer_openai_config, to_openai
from tests.conftest import open_clip_model, random_images, random_tokens, reduced_config

pytestmark = pytest.mark.slow  # full-width reference models built twice, seconds each

TOL = 1e-5

CASES = [
    # (name, activation, vision layers, text layers)
    ("ViT-B-32", "quick_gelu", None, None),
    ("ViT-B-32", "gelu", 2, 2),
    ("ViT-B-16", "quick_gelu", 2, 2),
    ("ViT-L-14", "quick_gelu", 2, 2),
    ("ViT-L-14-336", "quick_gelu", 1, 1),
    ("RN50", "quick_gelu", None, None),
    ("RN50", "gelu", [1, 1, 1, 1], 2),
    ("RN101", "quick_gelu", [1, 1, 2, 1], 2),
    ("RN50x4", "quick_gelu", [1, 1, 1, 1], 2),
    ("RN50x16", "quick_gelu", [1, 1, 1, 1], 1),
    ("RN50x64", "quick_gelu", [1, 1, 1, 1], 1),
]


@pytest.mark.parametrize(("name", "activation", "vision_layers", "text_layers"), CASES)
def test_matches_open_clip(name, activation, vision_layers, text_layers):
    config = reduced_config(name, activation, vision_layers, text_layers)
    reference = open_clip_model(config)
    state = reference.state_dict()

    # The architecture inferred from the reference's tensors is the named config (activation aside).
    inferred = infer_openai_config(state, activation=activation, name=name)
    assert inferred.vision == config.vision and inferred.text == config.text
    assert inferred.embed_dim == config.embed_dim

    model = create_model(config).eval()
    converted, dropped = from_openai(state, config)
    assert dropped == []
    model.load_state_dict(converted, strict=True)

    images = random_images(2, config.vision.image_size)
    tokens = random_tokens(3, config.text.context_length)
    with torch.no_grad():
        ref_image, ref_text = reference.encode_image(images), reference.encode_text(tokens)
        image, text = model.encode_image(images), model.encode_text(tokens)
        ref_out = reference(images, tokens)
        out = model(images, tokens)
    assert (image - ref_image).abs().max() <= TOL
    assert (text - ref_text).abs().max() <= TOL
    ref_image_features, ref_text_features, ref_scale = ref_out  # open_clip returns a tuple by default
    ref_logits = ref_scale * ref_image_features @ ref_text_features.T
    logits = out.logit_scale * out.image_features @ out.text_features.T
    assert (logits - ref_logits).abs().max() <= TOL
    assert torch.equal(out.logit_scale, ref_scale)

    # clipforge -> OpenAI layout gives back exactly the reference tensors.
    back = to_openai(model.state_dict(), config)
    assert back.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key


def _has_tower(name: str) -> bool:  # LiT configs: open_clip has no such architectures
    config = get_model_config(name)
    return bool(config.vision.tower or config.text.tower)


@pytest.mark.parametrize(
    "name", [n for n in list_models() if n not in ("tiny", "small", "tiny-rn") and not _has_tower(n)]
)
def test_parameter_count_equals_open_clip(name):
    """Full-size architectures, built on the meta device (no memory): identical parameter counts and shapes."""
    config = get_model_config(name)
    with torch.device("meta"):
        ours = create_model(config)
        reference = _open_clip_full(config)
    ref_state = {k: v.shape for k, v in reference.state_dict().items()}
    our_state = {k: v.shape for k, v in to_openai(ours.state_dict(), config).items()}
    assert our_state == ref_state
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in reference.parameters())
    assert n_ours == n_ref
    if name == "ViT-B-32":
        assert n_ours == 151_277_313  # the paper's released ViT-B/32


def _open_clip_full(config):
    import open_clip
    from open_clip.model import CLIP as OpenClipCLIP

    base = open_clip.get_model_config(config.name)
    return OpenClipCLIP(base["embed_dim"], base["vision_cfg"], base["text_cfg"], quick_gelu=True)
