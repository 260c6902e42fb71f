"""A fixed zero-shot evaluation set held in memory, scored with intervals, and the training hook that scores it.

The images are decoded once; the tensors for a model's eval transform are made once per transform and kept.
:meth:`ZeroShotSet.evaluate` encodes the images once and scores every prompt mode (``single``: the first
template; ``ensemble``: all templates) with the same features, so modes differ only in the classifier. Used by
the demo, the Fig. 2 experiment and any training run (:func:`clipforge.eval.hook.zero_shot_hook`). A set may also
be given already preprocessed (:meth:`ZeroShotSet.from_tensors`), and scored by any objective's zero-shot rule
(:meth:`ZeroShotSet.accuracy`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipforge.eval.intervals import (
    Interval,
    mean_per_class_interval,
    paired_difference_interval,
    proportion_interval,
)
from clipforge.eval.templates import ClassName
from clipforge.features import encode_image_batches, encode_image_tensor, eval_mode

MODES = ("single", "ensemble")
METRICS = ("top1", "mean_per_class")
#: An objective's zero-shot rule: (model, tokenizer, class names, templates) -> (images [B, 3, S, S] -> scores
#: [B, C]), as :meth:`clipforge.objectives.Objective.zero_shot_scorer`.
ScorerFactory = Callable[[Any, Any, Sequence[str], Sequence[str]], Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class ZeroShotScore:
    """One prompt mode's result on one set: the headline metrics with 95% intervals and each image's prediction."""

    mode: str
    mean_per_class: Interval  # chance: 1 / num_classes
    top1: Interval  # chance: the majority class's share
    predictions: np.ndarray  # [N] predicted class per image
    confusion: np.ndarray  # [C, C], rows: true class

    def to_dict(self) -> dict[str, Any]:
        return {"mean_per_class": self.mean_per_class.to_dict(), "top1": self.top1.to_dict()}


@dataclass
class ZeroShotSet:
    """Labelled images for zero-shot classification among ``classnames`` (a name or a tuple of synonyms each).

    ``kind`` says what the set measures for a reader (e.g. "style shift: a drawing style never trained on").
    """

    name: str
    images: list[Image.Image]
    labels: np.ndarray  # [N] in 0..C-1
    classnames: tuple[ClassName, ...]
    templates: tuple[str, ...]
    kind: str = ""
    source: str = ""  # where the images come from (a path or dataset name), for the report
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _preprocessed: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_tensors(
        cls,
        name: str,
        pixels: torch.Tensor,
        labels: Any,
        classnames: Sequence[ClassName],
        templates: Sequence[str] = ("a photo of a {}.",),
        **details: str,
    ) -> ZeroShotSet:
        """A set already preprocessed: ``pixels`` [N, 3, S, S] are used as they are, whatever the transform asked
        for (``details``: ``kind``, ``source``)."""
        return cls(name, [], labels, tuple(classnames), tuple(templates), _preprocessed=pixels, **details)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        count = len(self.images) if self._preprocessed is None else int(self._preprocessed.shape[0])
        if count != len(self.labels) or not count:
            raise ValueError(f"zero-shot set {self.name!r}: {count} images, {len(self.labels)} labels")
        if self.labels.min() < 0 or self.labels.max() >= len(self.classnames):
            raise ValueError(f"zero-shot set {self.name!r}: labels outside 0..{len(self.classnames) - 1}")
        if not self.templates:
            raise ValueError(f"zero-shot set {self.name!r}: no prompt templates")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def chance_mean_per_class(self) -> float:
        return 1.0 / self.num_classes

    @property
    def chance_top1(self) -> float:
        """Accuracy of always guessing the most frequent class."""
        return float(np.bincount(self.labels).max()) / len(self.labels)

    def chance_for(self, metric: str) -> float:
        """Chance level of ``metric``: the majority share for ``top1``; for ``mean_per_class``, 1/C (what uniform
        guessing scores on every class)."""
        return self.chance_top1 if metric == "top1" else self.chance_mean_per_class

    @property
    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {_display(name): int(n) for name, n in zip(self.classnames, counts)}

    def tensors(self, transform: Callable[[Image.Image], torch.Tensor] | None) -> torch.Tensor:
        """The images through ``transform``, made once per transform (keyed by its repr); a set made
        :meth:`from_tensors` gives its tensors for any transform."""
        if self._preprocessed is not None:
            return self._preprocessed
        if transform is None:
            raise ValueError(f"zero-shot set {self.name!r}: its images need a transform")
        key = repr(transform)
        if key not in self._tensors:
            self._tensors[key] = torch.stack([transform(image) for image in self.images])
        return self._tensors[key]

    def _pixels(self, model: torch.nn.Module, transform: Callable[..., torch.Tensor] | None) -> torch.Tensor:
        if transform is None and self._preprocessed is None:
            from clipforge.transforms import get_transforms

            transform = get_transforms(model)
        return self.tensors(transform)

    def image_features(
        self,
        model: torch.nn.Module,
        batch_size: int = 256,
        transform: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """L2-normalised image features [N, D] on the CPU of the current weights (eval mode, no gradients);
        ``transform`` defaults to the model's eval transform."""
        return encode_image_tensor(model, self._pixels(model, transform), batch_size=batch_size)

    def accuracy(
        self,
        model: torch.nn.Module,
        scorer: ScorerFactory,
        *,
        tokenizer: Any,
        metric: str = "top1",
        batch_size: int = 256,
        transform: Callable[..., torch.Tensor] | None = None,
    ) -> float:
        """Zero-shot accuracy with an objective's rule (``scorer``: e.g. ``get_objective(name).zero_shot_scorer``;
        bag-of-words and captioning models have no text classifier; ``tokenizer``: the model's) by ``metric``:
        ``top1`` (share of images right) or ``mean_per_class`` (each class's share right, averaged over the
        classes present). ``transform`` defaults to the model's eval transform."""
        from clipforge.eval.zeroshot import ZeroShotTally

        if metric not in METRICS:
            raise ValueError(f"metric: unknown {metric!r}; choose from {', '.join(METRICS)}")
        with eval_mode(model):
            score = scorer(model, tokenizer, self.classnames, self.templates)
        tally = ZeroShotTally(self.num_classes)
        labels = torch.as_tensor(self.labels)
        batches = self._pixels(model, transform).split(batch_size)
        start = 0
        for _, scores in encode_image_batches(model, batches, encode=score, normalize=False):
            assert scores is not None
            tally.update(scores.cpu(), labels[start : start + len(scores)])
            start += len(scores)
        result = tally.result()
        return result.top1 if metric == "top1" else result.mean_per_class_recall

    def evaluate(
        self,
        model: torch.nn.Module,
        modes: Sequence[str] = MODES,
        *,
        transform: Callable[..., torch.Tensor] | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        features: torch.Tensor | None = None,
    ) -> dict[str, ZeroShotScore]:
        """Scores per prompt mode, from one encoding of the images (``transform``/``tokenizer``: the model's;
        ``features``: this model's :meth:`image_features`, when the caller already has them)."""
        from clipforge.eval.zeroshot import build_classifier
        from clipforge.tokenizer import get_tokenizer

        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            raise ValueError(f"unknown prompt modes {unknown}; use {list(MODES)}")
        if features is None:
            features = self.image_features(model, transform=transform)
        tokenizer = tokenizer or get_tokenizer(model)
        scores = {}
        for mode in modes:
            templates = self.templates if mode == "ensemble" else self.templates[:1]
            classifier = build_classifier(
                model, tokenizer, list(self.classnames), list(templates), device="cpu"
            )
            predictions = (features @ classifier).argmax(dim=1).numpy()
            correct = predictions == self.labels
            confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
            np.add.at(confusion, (self.labels, predictions), 1)
            scores[mode] = ZeroShotScore(
                mode,
                mean_per_class_interval(correct, self.labels),
                proportion_interval(int(correct.sum()), len(correct)),
                predictions,
                confusion,
            )
        return scores

    def report(self, model: torch.nn.Module, **kwargs: Any) -> dict[str, Any]:
        """Both modes with intervals, the ensemble-minus-single difference (paired), and the chance levels
        (``kwargs``: :meth:`evaluate`'s ``transform``, ``tokenizer`` and ``features``)."""
        scores = self.evaluate(model, **kwargs)
        single, ensemble = scores["single"], scores["ensemble"]
        difference = paired_difference_interval(
            ensemble.predictions == self.labels, single.predictions == self.labels, self.labels
        )
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "images": len(self),
            "classes": [_display(c) for c in self.classnames],
            "class_counts": self.class_counts,
            "templates": len(self.templates),
            "single_template": self.templates[0],
            "chance_mean_per_class": self.chance_mean_per_class,
            "chance_top1": self.chance_top1,
            "single": single.to_dict(),
            "ensemble": ensemble.to_dict(),
            "ensemble_minus_single": difference.to_dict(),
            "per_class_ensemble": {
                _display(c): float(ensemble.confusion[k, k] / max(1, ensemble.confusion[k].sum()))
                for k, c in enumerate(self.classnames)
            },
            "_confusion_ensemble": ensemble.confusion,
        }


def _display(name: ClassName) -> str:
    return name if isinstance(name, str) else " / ".join(name)


def load_zero_shot_set(
    spec: str | Path,
    *,
    name: str | None = None,
    split: str | None = None,
    label_field: str = "label",
    classnames: Sequence[ClassName] | None = None,
    keep_classes: Sequence[int] | None = None,
    templates: Sequence[str] = ("a picture of a {}.",),
    kind: str = "",
    max_images: int | None = None,
    classnames_file: str | Path | None = None,
    present_only: bool = False,
) -> ZeroShotSet:
    """Read a labelled dataset (any form :func:`clipforge.eval.datasets.open_eval_dataset` reads), decode it once.

    ``keep_classes``: only these class indices of the data, renumbered 0..K-1 in the given order (e.g. the
    classes of a held-out split, or the groups that make sense as zero-shot classes); ``classnames`` then names
    the kept classes (default: the data's names; ``classnames_file``: a class names file for the data).
    ``present_only``: the candidate classes are only those with images here (e.g. a ``test_heldout`` split whose
    class list names every class of the dataset). Images that fail to load are skipped (the dataset counts them).
    """
    from clipforge.eval.datasets import open_eval_dataset

    dataset = open_eval_dataset(spec, split=split, label_field=label_field, classnames=classnames_file)
    data_names = list(dataset.classnames or [])
    if not data_names and classnames is None:
        raise ValueError(f"{spec}: no class names found; pass a class names file (--classnames FILE)")
    kept = list(keep_classes) if keep_classes is not None else list(range(len(data_names)))
    if not kept:
        raise ValueError(
            f"{spec}: no classes to keep (the data names none; pass keep_classes and classnames)"
        )
    index = {c: k for k, c in enumerate(kept)}
    images, labels = [], []
    for sample in dataset:
        if sample.label is None:
            raise ValueError(f"{spec}: sample {sample.key} has no {label_field!r} label")
        if sample.label not in index:
            continue
        images.append(sample.image.copy())
        labels.append(index[sample.label])
        if max_images is not None and len(images) >= max_images:
            break
    if classnames is None:
        if any(c >= len(data_names) for c in kept):
            raise ValueError(f"{spec}: class indices {kept} exceed the data's {len(data_names)} class names")
        classnames = [data_names[c] for c in kept]
    if len(classnames) != len(kept):
        raise ValueError(f"{spec}: {len(classnames)} class names for {len(kept)} kept classes")
    if present_only:
        present = sorted(set(labels))
        remap = {c: k for k, c in enumerate(present)}
        labels, classnames = [remap[c] for c in labels], [classnames[c] for c in present]
    where = f"{spec}" + (f"/{split}" if split else "")
    return ZeroShotSet(
        name or where, images, np.asarray(labels), tuple(classnames), tuple(templates), kind, where
    )
