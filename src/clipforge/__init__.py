"""clipforge: a fast, faithful PyTorch implementation of CLIP (Radford et al. 2021).

Public API::

    model = clipforge.create_model("ViT-B-32")            # or load_checkpoint(path)
    tokenizer = clipforge.get_tokenizer(model)             # CLIP BPE, context length from the model
    preprocess = clipforge.get_transforms(model)           # PIL image -> normalised tensor
    out = model(images, tokenizer(["a photo of a cat"]))   # CLIPOutput(image_features, text_features, logit_scale)
"""

from clipforge.checkpoint import export_checkpoint, load_checkpoint, save_checkpoint
from clipforge.config import ModelConfig, get_model_config, list_models
from clipforge.model import CLIP, CLIPOutput, create_model
from clipforge.model.layers import fast_paths
from clipforge.tokenizer import Tokenizer, TokenizerOverflowError, get_tokenizer
from clipforge.transforms import get_transforms
from clipforge.version import __version__

__all__ = [
    "CLIP",
    "CLIPOutput",
    "ModelConfig",
    "Tokenizer",
    "TokenizerOverflowError",
    "__version__",
    "create_model",
    "export_checkpoint",
    "fast_paths",
    "get_model_config",
    "get_tokenizer",
    "get_transforms",
    "list_models",
    "load_checkpoint",
    "save_checkpoint",
]
