"""The objectives by name: :func:`get_objective` builds one from its name and options."""

from __future__ import annotations

from typing import Any

from clipforge.objectives.bag_of_words import BagOfWordsObjective
from clipforge.objectives.base import Objective
from clipforge.objectives.captioning import CaptioningObjective
from clipforge.objectives.contrastive import ContrastiveObjective

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
