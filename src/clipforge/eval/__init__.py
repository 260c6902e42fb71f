"""Evaluation as in the paper: zero-shot classification with prompt ensembles, linear probes, retrieval, the
raw-pixel baseline and train/eval overlap, on folders, tables or shards, with a feature cache and reports.

Names are imported lazily (``from clipforge.eval import build_classifier`` loads only what it needs), so the
training loop's hook does not pull in scikit-learn or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "templates": (
        "ResolvedClassnames",
        "TemplateError",
        "TemplateSet",
        "format_template",
        "get_templates",
        "list_template_sets",
        "resolve_classnames",
    ),
    "dataset": ("EvalBatch", "EvalDataset", "EvalSample"),
    "datasets": ("open_eval_dataset", "read_classnames_file"),
    "features": ("EncodedImages", "FeatureCache", "encode_images", "encode_texts", "model_fingerprint"),
    "zeroshot": ("ZeroShotResult", "build_classifier", "classify_features", "zero_shot_classify"),
    "report": ("write_confusion_png", "write_results"),
    "hook": ("zero_shot_hook",),
    "linear_probe": ("FewShotResult", "LinearProbeResult", "few_shot", "linear_probe"),
    "retrieval": ("retrieval_metrics",),
    "pixels": ("pixel_baseline", "pixel_features"),
    "overlap": ("OverlapMatch", "OverlapResult", "analyze_overlap"),
    "overlap_montage": ("overlap_montage",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'clipforge.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"clipforge.eval.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
