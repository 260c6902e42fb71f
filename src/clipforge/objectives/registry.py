"""The objectives by name: :func:`get_objective` builds one from its name and options, :func:`objective_for` from a
run's config (each objective reads its own options)."""

from __future__ import annotations

from typing import Any

from clipforge.objectives.bag_of_words import BagOfWordsObjective
from clipforge.objectives.base import Objective
from clipforge.objectives.captioning import CaptioningObjective
from clipforge.objectives.contrastive import ContrastiveObjective

_CLASSES: dict[str, Any] = {
    "contrastive": ContrastiveObjective,
    "bag_of_words": BagOfWordsObjective,
    "captioning": CaptioningObjective,
}
OBJECTIVES = tuple(_CLASSES)


def _objective_class(name: str) -> Any:
    if name not in _CLASSES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return _CLASSES[name]


def get_objective(name: str, **options: Any) -> Objective:
    """The objective called ``name`` (one of :data:`OBJECTIVES`)."""
    return _objective_class(name)(**options)


def objective_for(config: Any) -> Objective:
    """The objective a :class:`~clipforge.train.config.TrainConfig` names, with the options it gives."""
    return _objective_class(config.objective).from_train_config(config)
