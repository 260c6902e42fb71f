"""clipforge: a fast, faithful PyTorch implementation of CLIP (Radford et al. 2021)."""

from clipforge.config import ModelConfig, get_model_config, list_models

__version__ = "0.1.0"

__all__ = [
    "ModelConfig",
    "__version__",
    "get_model_config",
    "list_models",
]
