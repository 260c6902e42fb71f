"""Training objectives compared in the paper's Fig. 2: contrastive (CLIP), bag-of-words prediction and caption
prediction. Each shares the image tower, the data stream and the run loop; see :mod:`clipforge.objectives.base`."""

from __future__ import annotations

from clipforge.objectives.bag_of_words import BagOfWordsModel, BagOfWordsObjective
from clipforge.objectives.base import Objective, ZeroShotScorer, accumulate_gradients
from clipforge.objectives.captioning import CaptioningObjective, CaptionModel
from clipforge.objectives.contrastive import ContrastiveObjective
from clipforge.objectives.io import load_objective_model, save_model
from clipforge.objectives.registry import OBJECTIVES, get_objective, objective_for

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
    "load_objective_model",
    "objective_for",
    "save_model",
]
