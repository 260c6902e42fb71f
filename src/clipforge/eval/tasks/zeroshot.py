"""The zero-shot task: class names and a template set → one classifier (:func:`clipforge.eval.build_classifier`)
→ top-1/top-5 and per-class recall over the encoded images, optionally against one template."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge.eval.tasks.base import (
    EncodeSettings,
    ModelArg,
    Result,
    Timer,
    describe,
    encode,
    log,
    open_data,
    resolve_model,
)

PAPER_BASELINE_TEMPLATE = "a photo of a {}."


@dataclass
class ZeroShotSettings(EncodeSettings):
    split: str | None = None  # subfolder of the data (e.g. test)
    templates: str | tuple[str, ...] = "generic"  # a template set name, a .txt/.json file, or the templates
    dataset_name: str | None = (
        None  # dataset whose class-name overrides apply (None: the template set's name)
    )
    single_template: str | None = None  # also classify with one template ("": the default one)


def default_single_template(templates: tuple[str, ...]) -> str:
    """The paper's baseline prompt, "a photo of a {}.", when the set has it; else the set's first template."""
    return PAPER_BASELINE_TEMPLATE if PAPER_BASELINE_TEMPLATE in templates else templates[0]


class ZeroShotTask:
    name = "zeroshot"
    Settings = ZeroShotSettings

    def run(
        self, model: ModelArg, data: Any, settings: ZeroShotSettings, *, out: Path | None = None
    ) -> Result:
        from clipforge.eval.report import CONFUSION_PNG, write_confusion_png
        from clipforge.eval.templates import resolve_classnames
        from clipforge.eval.zeroshot import build_classifier, classify_features
        from clipforge.tokenizer import get_tokenizer

        elapsed = Timer()
        dataset = open_data(data, settings, settings.split)  # data and templates first: errors before loading
        template_set = _template_set(settings.templates)
        raw = getattr(dataset, "classnames", None)  # encoded features carry none: then a list in the settings
        if raw is None and isinstance(settings.classnames, tuple):
            raw = settings.classnames
        if raw is None:
            raw = template_set.classnames
        if raw is None:
            raise ValueError(
                f"{data}: no class names in the data and none in template set {template_set.name!r}; pass "
                "--classnames FILE (one name per line, in label order)"
            )
        resolved = resolve_classnames(settings.dataset_name or template_set.name, list(raw))
        loaded = resolve_model(model)
        for change in resolved.changes[:20]:
            log.info("class %d: %r -> %r (%s)", change.index, change.raw, change.name, change.reason)
        for name, indices in resolved.duplicates.items():
            log.warning("classes %s share the name %r: zero-shot cannot tell them apart", indices, name)
        encoded = encode(loaded, dataset, settings)
        tokenizer = get_tokenizer(loaded.module)
        classifier = build_classifier(loaded.module, tokenizer, resolved.names, template_set.templates,
                                      precision=settings.precision)  # fmt: skip
        result = classify_features(encoded.features, encoded.labels, classifier, classnames=resolved.names,
                                   skipped=encoded.skipped)  # fmt: skip
        metrics: dict[str, Any] = {**result.metrics(), "num_samples": result.num_samples}
        templates = {
            "name": template_set.name,
            "source": template_set.source,
            "templates": template_set.templates,
        }
        details: dict[str, Any] = {
            "zeroshot": result.to_dict(),
            "templates": templates,
            "classnames": resolved.to_dict(),
        }
        lines = [
            f"zero-shot on {dataset_name(dataset, data)}: top-1 {result.top1:.4f}, top-{result.top_k} "
            f"{result.top5:.4f}, mean per-class recall {result.mean_per_class_recall:.4f} ({result.num_samples} "
            f"images, {result.num_classes} classes, {len(template_set.templates)} templates)"
        ]
        if settings.single_template is not None:
            template = settings.single_template or default_single_template(template_set.templates)
            single_classifier = build_classifier(loaded.module, tokenizer, resolved.names, [template],
                                                 precision=settings.precision)  # fmt: skip
            single = classify_features(
                encoded.features, encoded.labels, single_classifier, classnames=resolved.names
            )
            metrics.update(single_template_top1=single.top1, ensemble_gain_top1=result.top1 - single.top1)
            details["single_template"] = {"template": template, **single.to_dict(include_confusion=False)}
            lines.append(f"single template {template!r}: top-1 {single.top1:.4f}; the ensemble of "
                         f"{len(template_set.templates)} adds {100 * (result.top1 - single.top1):+.2f} points")  # fmt: skip
        recall_rows = [(name, int(result.confusion[i].sum()), result.per_class_recall[i])
                       for i, name in enumerate(result.classnames or ())]  # fmt: skip
        figures = []
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            figures.append(
                write_confusion_png(Path(out) / CONFUSION_PNG, result.confusion, result.classnames)
            )
        return Result(self.name, metrics, lines, datasets={"data": describe(dataset)}, checkpoint=loaded.identity,
                      skipped={"data": result.skipped}, details=details, figures=figures,
                      tables=[("Per-class recall", ["class", "samples", "recall"], recall_rows)],
                      wall_time_s=elapsed())  # fmt: skip


def dataset_name(dataset: Any, data: Any) -> str:
    return str(getattr(dataset, "name", data))


def _template_set(templates: str | tuple[str, ...]) -> Any:
    """A template set by name or file, or the templates themselves (checked like a file's)."""
    from clipforge.eval.templates import TemplateSet, check_templates, get_templates

    if isinstance(templates, str):
        return get_templates(templates)
    return TemplateSet(
        name="custom", templates=check_templates(templates, "templates setting"), source="settings"
    )
