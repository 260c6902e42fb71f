"""Training objectives compared in the paper's Fig. 2: contrastive (CLIP), bag-of-words prediction and caption
prediction. Each shares the image tower, the data stream and the run loop; see :mod:`clipforge.objectives.base`."""

from __future__ import annotations

from typing import Any

from clipforge.objectives.bag_of_words import BagOfWordsModel, BagOfWordsObjective
from clipforge.objectives.base import Objective, ZeroShotScorer, accumulate_gradients
from clipforge.objectives.captioning import CaptioningObjective, CaptionModel
from clipforge.objectives.contrastive import ContrastiveObjective
from clipforge.objectives.io import load_model, save_model

OBJECTIVES = ("contrastive", "bag_of_words", "captioning")


def get_objective(name: str, **options: Any) -> Objective:
    """The objective called ``name`` (one of :data:`OBJECTIVES`)."""
    if name == "contrastive":
        return ContrastiveObjective(**options)
    if name == "bag_of_words":
        return BagOfWordsObjective(**options)
    if name == "captioning":
        return CaptioningObjective(**options)
    raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")


__all__ = [
    "OBJECTIVES",
    "BagOfWordsModel",
    "BagOfWordsObjective",
    "CaptionModel",
    "CaptioningObjective",
    "ContrastiveObjective",
    "Objective",
    "ZeroShotScorer",
    "accumulate_gradients",
    "get_objective",
    "load_model",
    "save_model",
]
