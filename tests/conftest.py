"""Shared fixtures: reference models (open_clip, transformers) built with random weights, and token batches."""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

from clipforge.config import ModelConfig, get_model_config, merge

torch.set_num_threads(2)

LOCK_FILE = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"


def _normalised(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def locked_import(module: str, distribution: str | None = None) -> ModuleType:
    """Import ``module``, of a package pinned in requirements/lock.txt (``distribution``, by default the module
    name with '-' for '_'). Missing, it fails the test instead of skipping it: the environment is not the locked
    one (``make venv``). Only what the lock leaves out (system fonts, a GPU) may skip, with a reason."""
    distribution = distribution or module.replace("_", "-")
    pinned = re.findall(r"^([A-Za-z0-9_.-]+)==", LOCK_FILE.read_text(), re.MULTILINE)
    assert _normalised(distribution) in {_normalised(name) for name in pinned}, (
        f"{distribution} is not in {LOCK_FILE.name}: an optional package may skip, not use locked_import"
    )
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(
            f"{distribution} is pinned in requirements/{LOCK_FILE.name} but {module} does not import "
            f"({exc}); install the locked environment: make venv",
            pytrace=False,
        )


def reduced_config(
    name: str, activation: str | None = None, vision_layers=None, text_layers=None
) -> ModelConfig:
    """A named config with optionally fewer layers (same widths, heads, sizes) to keep parity tests fast."""
    config = get_model_config(name)
    overrides: dict = {}
    if activation is not None:
        overrides["activation"] = activation
    if vision_layers is not None:
        overrides["vision.layers"] = vision_layers
    if text_layers is not None:
        overrides["text.layers"] = text_layers
    return merge(config, overrides) if overrides else config


def open_clip_model(config: ModelConfig):
    """An open_clip ``CLIP`` with the same architecture as ``config`` (random weights, eval mode).

    Built from open_clip's own JSON for the named config with only the depth changed, so the test also checks
    that clipforge's named configs describe the same architectures.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import open_clip
        from open_clip.model import CLIP as OpenClipCLIP

    base = open_clip.get_model_config(config.name.split("@")[0])
    assert base is not None, f"open_clip has no config named {config.name}"
    vision_cfg, text_cfg = dict(base["vision_cfg"]), dict(base["text_cfg"])
    vision_cfg["layers"] = (
        list(config.vision.layers) if config.vision.arch == "resnet" else config.vision.layers
    )
    text_cfg["layers"] = config.text.layers
    model = OpenClipCLIP(
        base["embed_dim"], vision_cfg, text_cfg, quick_gelu=config.activation == "quick_gelu"
    ).eval()
    randomize_batchnorm(model)
    return model


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give BatchNorm layers non-trivial statistics and affine terms, so eval-mode parity means something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def random_tokens(batch: int, context_length: int, seed: int = 0, vocab_size: int = 49408) -> torch.Tensor:
    """Token batches shaped like the tokenizer's: [sot] + ids + [eot] + zero padding, lengths varying."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, context_length, dtype=torch.long)
    for row in range(batch):
        length = int(torch.randint(1, context_length - 1, (1,), generator=gen))
        tokens[row, 0] = vocab_size - 2
        tokens[row, 1 : length + 1] = torch.randint(1, vocab_size - 2, (length,), generator=gen)
        tokens[row, length + 1] = vocab_size - 1
    return tokens


def random_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
