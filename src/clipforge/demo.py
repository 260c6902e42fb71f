"""The main job (``clipforge demo``, ``make demo``): train a small CLIP on the built-in data on the CPU, then
evaluate it the paper's ways on data it never trained on, and write a report.

What is held out: whole classes (``test_heldout`` of each built-in source: 6 openclipart classes, 6 emoji
subgroups — chosen by the rule recorded in the dataset's MANIFEST.json) never appear in training, so zero-shot
on them measures transfer to concepts known only from captions of *other* images; ``test`` holds unseen images
of the seen classes. scikit-learn's handwritten digits (never trained on) give the paper's MNIST remark: a
logistic regression on raw pixels against zero-shot CLIP.

Outputs in ``out_dir``: ``report.md``, ``report.json``, ``loss.png`` and ``zeroshot_over_training.png``,
``confusion_heldout.png``, ``retrieval_montage.png``, and the training run (``run/``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("clipforge.demo")

PRESET_DIR = Path(__file__).resolve().parent / "configs" / "train"
SOURCES = {  # built-in source -> (template set, label field of its seen-class test)
    "openclipart": ("clipart", "label"),
    "emoji": ("emoji", "label"),
}


@dataclass(frozen=True)
class DemoSettings:
    """How the demo runs; the training config itself is ``configs/train/demo.yaml`` (+ ``overrides``)."""

    out_dir: str = "runs/demo"
    preset: str = "demo"  # configs/train/<preset>.yaml
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted training-config keys
    eval_every: int = 0  # steps between zero-shot checks during training (0: the preset's run.eval_every)
    eval_batch_size: int = 128
    probe_max_iter: int = 1000
    progress: bool = True


def preset_path(name: str) -> Path:
    """A training-config file: a path, or the name of one in ``clipforge/configs/train/``."""
    path = Path(name)
    if not path.is_file():
        path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no demo preset {name!r}: not a file, and not one of {presets}")
    return path


def run_demo(settings: DemoSettings = DemoSettings()) -> Path:
    """Train, evaluate, write the report; returns the path of ``report.md``."""
    from clipforge.data.builtin import builtin_dataset_info, builtin_dataset_path
    from clipforge.eval.report import jsonable
    from clipforge.train import resolve_train_config, train

    started = time.perf_counter()
    out = Path(settings.out_dir)
    if out.exists():
        shutil.rmtree(out / "run", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    info = builtin_dataset_info()

    preset = preset_path(settings.preset)
    overrides: dict[str, Any] = {
        "data.train": [str(builtin_dataset_path(source) / "train") for source in sorted(info["sources"])],
        "run.output_dir": str(out),
        "run.name": "run",
        "run.progress": settings.progress,
        **settings.overrides,
    }
    config = resolve_train_config(preset, overrides)
    heldout = _heldout_sets(info, config.model)
    curve: list[dict[str, float]] = []

    def track(context: Any) -> dict[str, float]:
        record = {"step": context.step, "samples": context.samples_seen}
        for name, data in heldout.items():
            record[f"heldout_{name}"] = data.accuracy(context.model, "ensemble")
        curve.append(record)
        return {k: v for k, v in record.items() if k.startswith("heldout_")}

    overrides["run.eval_every"] = settings.eval_every or config.run.eval_every or max(1, config.steps // 10)
    config = resolve_train_config(preset, overrides)
    train_started = time.perf_counter()
    summary = train(config, hooks=[track])
    train_seconds = time.perf_counter() - train_started

    eval_started = time.perf_counter()
    results = evaluate(Path(summary.model_path), heldout, settings, out)
    eval_seconds = time.perf_counter() - eval_started

    results["training"] = {
        "model": config.model,
        "steps": summary.steps,
        "batch_size": config.data.batch_size,
        "samples_seen": summary.samples_seen,
        "epochs": summary.epochs,
        "final_loss": summary.final_loss,
        "samples_per_s": summary.samples_per_s,
        "precision": config.precision,
        "skipped": summary.skipped,
        "wall_time_s": train_seconds,
        "train_pairs": {s: info["sources"][s]["counts"]["train"] for s in info["sources"]},
        "config": str(Path(summary.run_dir) / "config.yaml"),
    }
    results["zero_shot_over_training"] = curve
    results["held_out"] = {
        s: {"field": v["heldout"]["field"], "classes": v["heldout"]["classes"], "rule": v["heldout"]["rule"]}
        for s, v in info["sources"].items()
    }
    results["wall_time_s"] = {
        "train": train_seconds,
        "evaluate": eval_seconds,
        "total": time.perf_counter() - started,
    }
    shutil.copyfile(Path(summary.run_dir) / "loss.png", out / "loss.png")
    _plot_curve(curve, heldout, out / "zeroshot_over_training.png")
    (out / "report.json").write_text(json.dumps(jsonable(results), indent=2) + "\n")
    report = out / "report.md"
    report.write_text(render_report(results))
    return report


# ----------------------------------------------------------------------------------------------------------------
# Evaluation sets


@dataclass
class HeldOutSet:
    """Preprocessed images of the held-out classes of one source, labelled 0..K-1 among those K classes."""

    images: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]
    templates: list[str]

    @property
    def chance(self) -> float:
        return float(torch.bincount(self.labels).max()) / len(self.labels)

    def evaluate(
        self, model: torch.nn.Module, modes: Sequence[str] = ("single", "ensemble")
    ) -> dict[str, Any]:
        """Zero-shot results (:class:`clipforge.eval.zeroshot.ZeroShotResult`) per prompt mode: ``single`` (the
        first template) or ``ensemble`` (all). The images are encoded once for all modes."""
        from clipforge.eval.zeroshot import build_classifier, classify_features
        from clipforge.tokenizer import get_tokenizer

        was_training = model.training
        model.eval()
        with torch.no_grad():
            features = torch.cat([model.encode_image(b) for b in self.images.split(256)])
            results = {}
            for mode in modes:
                templates = self.templates if mode == "ensemble" else self.templates[:1]
                classifier = build_classifier(model, get_tokenizer(model), self.classnames, templates)
                results[mode] = classify_features(
                    features, self.labels, classifier, classnames=self.classnames
                )
        model.train(was_training)
        return results

    def accuracy(self, model: torch.nn.Module, mode: str) -> float:
        """Mean per-class accuracy (the held-out classes differ in size; chance is 1/K whatever the sizes)."""
        return self.evaluate(model, (mode,))[mode].mean_per_class_recall


def _heldout_sets(info: dict[str, Any], model_name: str) -> dict[str, HeldOutSet]:
    from clipforge.config import get_model_config
    from clipforge.data.builtin import builtin_dataset_path
    from clipforge.eval.datasets import open_eval_dataset
    from clipforge.eval.templates import get_templates
    from clipforge.transforms import get_transforms

    transform = get_transforms(get_model_config(model_name))
    sets = {}
    for source, (template_set, _) in SOURCES.items():
        held = info["sources"][source]["heldout"]
        dataset = open_eval_dataset(
            builtin_dataset_path(source), split="test_heldout", label_field=held["field"]
        )
        index = {int(i): k for k, i in enumerate(held["indices"])}
        images, labels = [], []
        for sample in dataset:
            images.append(transform(sample.image))
            labels.append(index[int(sample.label)])
        sets[source] = HeldOutSet(
            torch.stack(images), torch.tensor(labels), list(held["classes"]),
            list(get_templates(template_set).templates),
        )  # fmt: skip
    return sets


# ----------------------------------------------------------------------------------------------------------------
# After training


def evaluate(
    model_path: Path, heldout: dict[str, HeldOutSet], settings: DemoSettings, out: Path
) -> dict[str, Any]:
    from clipforge.checkpoint import load_checkpoint
    from clipforge.data.builtin import build_digits, builtin_dataset_path
    from clipforge.eval.datasets import open_eval_dataset
    from clipforge.eval.features import encode_images, encode_texts
    from clipforge.eval.linear_probe import linear_probe
    from clipforge.eval.pixels import pixel_baseline
    from clipforge.eval.report import write_confusion_png
    from clipforge.eval.retrieval import retrieval_metrics
    from clipforge.eval.templates import get_templates
    from clipforge.eval.zeroshot import build_classifier, classify_features
    from clipforge.tokenizer import get_tokenizer

    model = load_checkpoint(model_path)
    tokenizer = get_tokenizer(model)
    bs, progress = settings.eval_batch_size, settings.progress
    results: dict[str, Any] = {"model_path": str(model_path)}

    # 1. Zero-shot on classes never seen in training: single prompt vs the prompt ensemble.
    zs: dict[str, Any] = {}
    for source, data in heldout.items():
        by_mode = data.evaluate(model)
        single, ensemble = by_mode["single"], by_mode["ensemble"]
        zs[source] = {
            "classes": data.classnames,
            "images": len(data.labels),
            "chance": data.chance,
            "uniform_chance": 1 / len(data.classnames),
            "single_template": data.templates[0],
            "top1_single": single.top1,
            "top1_ensemble": ensemble.top1,
            "mean_per_class_single": single.mean_per_class_recall,
            "mean_per_class_ensemble": ensemble.mean_per_class_recall,
            "templates": len(data.templates),
        }
        if source == "openclipart":
            write_confusion_png(out / "confusion_heldout.png", ensemble.confusion, data.classnames)
    results["zero_shot_heldout_classes"] = zs

    # 2. Zero-shot on unseen images of the seen classes, and 3. the linear probe, and 4. retrieval.
    seen: dict[str, Any] = {}
    probes: dict[str, Any] = {}
    retrieval: dict[str, Any] = {}
    montage_sets = {}
    for source, (template_set, field_name) in SOURCES.items():
        root = builtin_dataset_path(source)
        encoded = {
            split: encode_images(model, open_eval_dataset(root, split=split, label_field=field_name),
                                 batch_size=bs, progress=progress)
            for split in ("train", "val", "test")
        }  # fmt: skip
        test = encoded["test"]
        names = open_eval_dataset(root, split="test", label_field=field_name).classnames or []
        present = sorted(set(test.labels.tolist()))
        classifier = build_classifier(model, tokenizer, [names[i] for i in present],
                                      list(get_templates(template_set).templates))  # fmt: skip
        remap = {c: k for k, c in enumerate(present)}
        zs_test = classify_features(test.features, [remap[int(v)] for v in test.labels], classifier)
        seen[source] = {
            "classes": len(present),
            "images": len(test),
            "top1": zs_test.top1,
            "top5": zs_test.top5,
            "mean_per_class_recall": zs_test.mean_per_class_recall,
            "chance": float(np.bincount(test.labels).max()) / len(test),
        }
        probe = linear_probe(
            encoded["train"].features, encoded["train"].labels, test.features, test.labels,
            val_x=encoded["val"].features, val_y=encoded["val"].labels, max_iter=settings.probe_max_iter,
            standardize=True,
        )  # fmt: skip
        probes[source] = {"test_accuracy": probe.test_accuracy, "c": probe.c, "val_accuracy": probe.val_accuracy,
                          "train_images": probe.num_train, "test_images": probe.num_test}  # fmt: skip
        texts = [c for caps in test.captions for c in caps]
        owners = [i for i, caps in enumerate(test.captions) for _ in caps]
        text_features = encode_texts(model, tokenizer, texts, progress=False)
        metrics = retrieval_metrics(test.features, text_features, np.asarray(owners))
        retrieval[source] = {"images": len(test), "captions": len(texts), **metrics}
        montage_sets[source] = (root, test)
    results["zero_shot_seen_classes"] = seen
    results["linear_probe"] = probes
    results["retrieval"] = retrieval
    _retrieval_montage(model, tokenizer, heldout, montage_sets, out / "retrieval_montage.png")

    # 5. Digits: raw pixels vs zero-shot CLIP vs a linear probe on CLIP features.
    digits_root = out / "digits"
    if not (digits_root / "classes.json").exists():
        build_digits(digits_root)
    digits = {split: open_eval_dataset(digits_root, split=split) for split in ("train", "val", "test")}
    train_imgs = [(s.image, s.label) for s in digits["train"]]
    val_imgs = [(s.image, s.label) for s in digits["val"]]
    test_imgs = [(s.image, s.label) for s in digits["test"]]
    pixels = pixel_baseline(
        [i for i, _ in train_imgs], [y for _, y in train_imgs], [i for i, _ in test_imgs], [y for _, y in test_imgs],
        val_images=[i for i, _ in val_imgs], val_y=[y for _, y in val_imgs],
    )  # fmt: skip
    enc = {split: encode_images(model, d, batch_size=bs, progress=progress) for split, d in digits.items()}
    digit_names = digits["test"].classnames or [str(i) for i in range(10)]
    classifier = build_classifier(model, tokenizer, digit_names, ["a handwritten digit {}", "the number {}"])
    zs_digits = classify_features(enc["test"].features, enc["test"].labels, classifier)
    clip_probe = linear_probe(enc["train"].features, enc["train"].labels, enc["test"].features, enc["test"].labels,
                              val_x=enc["val"].features, val_y=enc["val"].labels, max_iter=settings.probe_max_iter,
                              standardize=True)  # fmt: skip
    results["digits"] = {
        "test_images": len(test_imgs),
        "chance": float(np.bincount(enc["test"].labels).max()) / len(enc["test"]),
        "pixel_baseline": pixels.test_accuracy,
        "zero_shot_clip": zs_digits.top1,
        "linear_probe_clip": clip_probe.test_accuracy,
    }
    return results


def _retrieval_montage(model, tokenizer, heldout, sets, path: Path) -> None:
    """For one prompt per held-out openclipart class, the 6 best-matching test images of all sources."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipforge.eval.datasets import open_eval_dataset
    from clipforge.eval.features import encode_texts

    queries = [f"a clip-art drawing of a {c}" for c in heldout["openclipart"].classnames[:4]]
    queries += [f"an emoji of a {c}" for c in heldout["emoji"].classnames[:2]]
    features = np.concatenate([enc.features for _, enc in sets.values()])
    keys = [(source, key) for source, (_, enc) in sets.items() for key in enc.keys]
    text = encode_texts(model, tokenizer, queries)
    top = np.argsort(-(text @ features.T), axis=1)[:, :6]
    images: dict[tuple[str, str], Any] = {}
    for source, (root, _) in sets.items():
        wanted = {keys[i][1] for i in top.ravel() if keys[i][0] == source}
        if wanted:
            loaded = open_eval_dataset(root, split="test").load_images(sorted(wanted))
            images.update({(source, k): v for k, v in loaded.items()})
    fig, axes = plt.subplots(len(queries), 6, figsize=(9, 1.6 * len(queries)))
    for row, query in enumerate(queries):
        for col in range(6):
            ax = axes[row, col]
            ax.axis("off")
            image = images.get(keys[top[row, col]])
            if image is not None:
                ax.imshow(image)
        axes[row, 0].set_title(query, loc="left", fontsize=8)
    fig.suptitle(
        "text → image retrieval on held-out test images (queries name classes never trained on)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curve(curve: Sequence[dict[str, float]], heldout: dict[str, HeldOutSet], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, data in heldout.items():
        xs = [r["samples"] for r in curve]
        ax.plot(
            xs,
            [r[f"heldout_{name}"] for r in curve],
            marker="o",
            markersize=3,
            label=f"{name} held-out classes",
        )
        ax.axhline(1 / len(data.classnames), linestyle=":", color=ax.lines[-1].get_color(), linewidth=1)
    ax.set_xlabel("training pairs seen")
    ax.set_ylabel("zero-shot mean per-class accuracy (ensemble)")
    ax.set_title("Zero-shot on never-trained classes (dotted: chance, 1/K)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Report


def render_report(r: dict[str, Any]) -> str:
    t = r["training"]
    lines = [
        "# clipforge demo report",
        "",
        f"A `{t['model']}` CLIP trained from scratch on the built-in data's train split "
        f"({', '.join(f'{v:,} {k}' for k, v in t['train_pairs'].items())} image–caption pairs) for {t['steps']} steps "
        f"of {t['batch_size']} ({t['samples_seen']:,} pairs, {t['epochs'] or 0:.1f} epochs, {t['precision']}) in "
        f"{t['wall_time_s'] / 60:.1f} min at {t['samples_per_s']:.0f} pairs/s; final loss {t['final_loss']:.3f}.",
        "",
        "## Zero-shot on classes never seen in training",
        "",
        "| source | held-out classes | images | mean per-class accuracy: single prompt | ensemble | chance | "
        "top-1: single | ensemble | majority chance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for source, v in r["zero_shot_heldout_classes"].items():
        lines.append(f"| {source} | {', '.join(v['classes'])} | {v['images']} | {v['mean_per_class_single']:.3f} | "
                     f"**{v['mean_per_class_ensemble']:.3f}** ({v['templates']} prompts) | {v['uniform_chance']:.3f} | "
                     f"{v['top1_single']:.3f} | {v['top1_ensemble']:.3f} | {v['chance']:.3f} |")  # fmt: skip
    lines += [
        "",
        "Mean per-class accuracy averages each class's accuracy, so chance is one over the number of classes "
        "whatever their sizes; top-1 counts images, and its chance is the majority class's share (what always "
        "guessing the largest class scores). Held out (never in the training split; each class's name appears "
        "in captions of other training images, so the concept is known only from language):",
    ]
    for source, v in r["held_out"].items():
        lines.append(f"- {source}: whole `{v['field']}` classes {', '.join(v['classes'])} ({v['rule']}).")
    lines += [
        "",
        "## Seen classes, unseen images",
        "",
        "| source | classes | test images | chance | zero-shot top-1 | top-5 | linear probe (train→test) |",
        "|---|---|---|---|---|---|---|",
    ]
    for source, v in r["zero_shot_seen_classes"].items():
        p = r["linear_probe"][source]
        lines.append(f"| {source} | {v['classes']} | {v['images']} | {v['chance']:.3f} | {v['top1']:.3f} | "
                     f"{v['top5']:.3f} | {p['test_accuracy']:.3f} (C={p['c']:.3g}) |")  # fmt: skip
    lines += ["", "## Retrieval on the test split", "",
              "| source | images | captions | image→text R@1 | R@5 | text→image R@1 | R@5 |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for source, v in r["retrieval"].items():
        lines.append(f"| {source} | {v['images']} | {v['captions']} | {v['image_to_text_R@1']:.3f} | "
                     f"{v['image_to_text_R@5']:.3f} | {v['text_to_image_R@1']:.3f} | {v['text_to_image_R@5']:.3f} |")  # fmt: skip
    d = r["digits"]
    lines += [
        "",
        "## Handwritten digits (never trained on): the paper's MNIST remark",
        "",
        f"{d['test_images']} test digits, chance {d['chance']:.3f}: logistic regression on raw pixels "
        f"**{d['pixel_baseline']:.3f}**, zero-shot CLIP {d['zero_shot_clip']:.3f}, linear probe on CLIP features "
        f"{d['linear_probe_clip']:.3f}.",
        "",
        "## Figures and files",
        "",
        "- `loss.png` training loss; `zeroshot_over_training.png` held-out zero-shot mean per-class accuracy "
        "during training",
        "- `confusion_heldout.png` confusion on the held-out openclipart classes; `retrieval_montage.png`",
        "- `report.json` every number here; `run/` the training run (config, metrics, checkpoints, model)",
        "",
        f"Wall time: training {r['wall_time_s']['train'] / 60:.1f} min, evaluation "
        f"{r['wall_time_s']['evaluate'] / 60:.1f} min, total {r['wall_time_s']['total'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"
