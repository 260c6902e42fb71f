"""Zero-shot classification as in the paper: class names in prompt templates, encoded by the text tower, are the
weights of a linear classifier over normalised image features.

Prompt ensembling: each prompt embedding is L2-normalised, the prompts of a class are averaged, and the mean is
normalised again (the paper's 80 ImageNet templates added ~3.5 points over one). Logits are
``100 * image_features @ classifier``; the scale changes neither the argmax nor the top-k, only softmax
probabilities, so it is fixed at 100 (the released models' learned scale) rather than read from the model.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipforge.device import model_device
from clipforge.eval.templates import ClassName, check_templates, format_template
from clipforge.features import encode_image_batches, encode_text_batches

LOGIT_SCALE = 100.0
TOP_K = 5


def class_prompts(classnames: Sequence[ClassName], templates: Sequence[str]) -> tuple[list[str], list[int]]:
    """Every prompt (each template with each name of each class) and the class it belongs to."""
    templates = check_templates(templates)
    if len(classnames) == 0:
        raise ValueError("no class names: zero-shot classification needs at least one class")
    prompts: list[str] = []
    owners: list[int] = []
    for index, entry in enumerate(classnames):
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(
                f"class {index} has no usable name ({entry!r}); every class needs a non-empty name"
            )
        for name in names:
            for template in templates:
                prompts.append(format_template(template, name))
                owners.append(index)
    return prompts, owners


def build_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[ClassName],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Zero-shot classifier weights [D, C] (float32, each column unit-norm), computed on the model's device and
    returned on ``device`` (default: the model's).

    For each class, every template is filled with the class name (with each of its names, for classes given as
    several synonyms), encoded, L2-normalised; the class's prompt embeddings are averaged and the mean
    renormalised. Needs only ``model.encode_text`` and a tokenizer (list[str] -> LongTensor [N, L]).
    """
    prompts, owners = class_prompts(classnames, templates)
    owner_index = torch.tensor(owners, device=model_device(model))
    sums: torch.Tensor | None = None
    start = 0
    for features in encode_text_batches(
        model, tokenizer, prompts, batch_size=batch_size, precision=precision
    ):
        if sums is None:
            sums = torch.zeros(len(classnames), features.shape[-1], device=features.device)
        sums.index_add_(0, owner_index[start : start + len(features)], features)
        start += len(features)
    assert sums is not None
    counts = torch.bincount(owner_index, minlength=len(classnames)).unsqueeze(1).float()
    weights = F.normalize(sums / counts, dim=-1).T.contiguous()
    return weights if device is None else weights.to(device)


@dataclass(frozen=True)
class ZeroShotResult:
    """Zero-shot classification metrics. ``confusion[i, j]`` counts samples of class i predicted as j.

    ``top5`` is top-``top_k`` accuracy with ``top_k = min(5, C)`` (equal to 1.0 when C <= 5; see ``notes``).
    ``per_class_recall[i]`` is NaN for a class with no samples; ``mean_per_class_recall`` averages the others.
    """

    top1: float
    top5: float
    top_k: int
    mean_per_class_recall: float
    per_class_recall: tuple[float, ...]
    confusion: np.ndarray
    num_samples: int
    classnames: tuple[str, ...] | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    def metrics(self) -> dict[str, float]:
        """The headline numbers (fractions in [0, 1])."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "mean_per_class_recall": self.mean_per_class_recall,
        }

    def to_dict(self, include_confusion: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            **self.metrics(),
            "top_k": self.top_k,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "per_class_recall": [None if math.isnan(r) else r for r in self.per_class_recall],
            "skipped": dict(self.skipped),
            "notes": list(self.notes),
        }
        if self.classnames is not None:
            data["classnames"] = list(self.classnames)
        if include_confusion:
            data["confusion"] = self.confusion.tolist()
        return data


class ZeroShotTally:
    """Accumulates predictions batch by batch (no features kept): confusion counts and top-k hits."""

    def __init__(self, num_classes: int) -> None:
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.top_k = min(TOP_K, num_classes)
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.top_k_hits = 0
        self.skipped: Counter[str] = Counter()

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits [B, C]; labels [B] (-1: no label, counted as ``missing_label`` and left out)."""
        labels = labels.to(logits.device)
        known = labels >= 0
        missing = int((~known).sum())
        if missing:
            self.skipped["missing_label"] += missing
        if not bool(known.any()):
            return
        logits, labels = logits[known], labels[known]
        if int(labels.max()) >= self.num_classes:
            raise ValueError(f"label {int(labels.max())} is out of range for {self.num_classes} classes")
        top = logits.topk(self.top_k, dim=-1).indices
        self.top_k_hits += int((top == labels.unsqueeze(1)).any(dim=1).sum())
        pairs = (labels * self.num_classes + top[:, 0]).cpu().numpy()
        self.confusion += np.bincount(pairs, minlength=self.num_classes**2).reshape(self.confusion.shape)

    def result(
        self, classnames: Sequence[ClassName] | None = None, skipped: Mapping[str, int] | None = None
    ) -> ZeroShotResult:
        total = int(self.confusion.sum())
        if total == 0:
            raise ValueError("no labelled samples were classified; check the labels of the data")
        per_class_total = self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(per_class_total > 0, np.diag(self.confusion) / per_class_total, np.nan)
        present = int((per_class_total > 0).sum())
        notes = []
        if self.top_k < TOP_K:
            notes.append(f"top5 is top-{self.top_k}: there are only {self.num_classes} classes")
        if present < self.num_classes:
            notes.append(
                f"{self.num_classes - present} of {self.num_classes} classes have no samples; mean per-class "
                "recall averages the other classes"
            )
        all_skipped = Counter(self.skipped)
        all_skipped.update(skipped or {})
        names = None
        if classnames is not None:
            names = tuple(n if isinstance(n, str) else " / ".join(n) for n in classnames)
        return ZeroShotResult(
            top1=float(np.trace(self.confusion) / total),
            top5=float(self.top_k_hits / total),
            top_k=self.top_k,
            mean_per_class_recall=float(np.nanmean(recall)),
            per_class_recall=tuple(float(r) for r in recall),
            confusion=self.confusion.copy(),
            num_samples=total,
            classnames=names,
            skipped=dict(sorted(all_skipped.items())),
            notes=tuple(notes),
        )


def zero_shot_logits(
    image_features: torch.Tensor, classifier: torch.Tensor, logit_scale: torch.Tensor | float = LOGIT_SCALE
) -> torch.Tensor:
    """``logit_scale * normalize(image_features) @ classifier`` -> [B, C] float32 (image features [B, D] of any
    norm, classifier [D, C] from :func:`build_classifier`)."""
    cosine = F.normalize(image_features.float(), dim=-1) @ classifier.float().to(image_features.device)
    return float(logit_scale) * cosine


def zero_shot_probabilities(
    image_features: torch.Tensor, classifier: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """``softmax(logit_scale * cosine)`` over the classes -> [B, C]: image features [B, D] (any norm), classifier
    [D, C] from :func:`build_classifier`, ``logit_scale`` the multiplier (a model's ``logit_scale.exp()``)."""
    return zero_shot_logits(image_features, classifier, logit_scale).softmax(dim=-1)


def classify_features(
    image_features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    classifier: torch.Tensor,
    *,
    classnames: Sequence[ClassName] | None = None,
    skipped: Mapping[str, int] | None = None,
    chunk_size: int = 8192,
) -> ZeroShotResult:
    """Zero-shot metrics from precomputed image features [N, D] and labels [N] (-1: unlabelled)."""
    features = torch.as_tensor(
        np.asarray(image_features) if not torch.is_tensor(image_features) else image_features
    )
    label_tensor = torch.as_tensor(
        np.asarray(labels, dtype=np.int64) if not torch.is_tensor(labels) else labels
    )
    classifier = classifier.float().cpu()
    tally = ZeroShotTally(classifier.shape[1])
    for start in range(0, len(features), chunk_size):
        chunk = features[start : start + chunk_size].float()
        tally.update(zero_shot_logits(chunk, classifier), label_tensor[start : start + chunk_size])
    return tally.result(classnames, skipped)


def zero_shot_classify(
    model: nn.Module,
    classifier: torch.Tensor,
    batches: Iterable[Any],
    *,
    classnames: Sequence[ClassName] | None = None,
    precision: str = "fp32",
) -> ZeroShotResult:
    """Classify streamed batches: ``(images [B, 3, S, S], labels [B])`` tuples or
    :class:`~clipforge.eval.datasets.EvalBatch` es (whose skip counts are carried into the result).

    Runs on the model's device; keeps only the confusion counts, never the features.
    """
    tally = ZeroShotTally(classifier.shape[1])
    skipped: Counter[str] = Counter()
    classifier = classifier.to(model_device(model))

    def pixels(batch: Any) -> torch.Tensor | None:
        images, labels = batch if isinstance(batch, (tuple, list)) else (batch.images, batch.labels)
        return images if len(labels) else None

    for batch, features in encode_image_batches(
        model, batches, pixels=pixels, precision=precision, normalize=False
    ):
        if not isinstance(batch, (tuple, list)):
            skipped.update(batch.skipped)
        if features is not None:
            labels = batch[1] if isinstance(batch, (tuple, list)) else batch.labels
            tally.update(zero_shot_logits(features, classifier), torch.as_tensor(labels))
    return tally.result(classnames, skipped)
