"""The main job (``clipforge demo``, ``make demo``): train two small CLIPs on the CPU — one from scratch, one with a
locked pretrained text tower (LiT) — on ~12,600 real image–caption pairs, then evaluate both the paper's ways on
data they never trained on, and write a report.

Data (:mod:`clipforge.demo_data`, ``configs/demo/data.json``): the built-in openclipart and Noto-emoji train
splits plus Material Design Icons, Font Awesome and Simple Icons, built from pip packages into the user cache on
first use. Evaluation, never trained on: **style shift** — OpenMoji's drawings of the emoji groups (training saw
Noto's) — and **held-out concepts** — whole classes absent from every training source, known only from other
captions. Every figure carries its chance level and a 95% interval; single prompt vs prompt ensemble is a paired
difference on the same images. Also: retrieval on the training sources' test splits, a linear probe on seen
classes, and the paper's MNIST remark on scikit-learn's digits.

Outputs in ``out_dir``: ``report.md``, ``report.json``, ``zeroshot_over_training.png``, ``confusion_heldout.png``,
``retrieval_montage.png``, ``loss_<model>.png`` and the training runs (``<model>/``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("clipforge.demo")

PRESET_DIR = Path(__file__).resolve().parent / "configs" / "train"
MODELS = {  # model kind -> (preset, what it is, for the report)
    "scratch": ("demo", "from scratch: `small` CLIP (ViT 6x192 /8 at 64 px, text 4x128)"),
    "lit": (
        "demo-lit",
        "LiT: locked EfficientNet-Lite0 (ImageNet) + locked all-MiniLM-L6-v2; projections trained",
    ),
}
# Queries a person would type; the montage shows each one's best test images across all sources.
MONTAGE_QUERIES = ("a red heart", "a car", "a smiling face", "the flag of Japan", "a bird", "a house",
                   "a battery", "a musical note", "a cup of coffee", "a bicycle")  # fmt: skip
PROBE_SOURCES = {"openclipart": "builtin:openclipart", "emoji": "builtin:emoji"}


@dataclass(frozen=True)
class DemoSettings:
    """How the demo runs; each model's training config is ``configs/train/<preset>.yaml`` (+ overrides)."""

    out_dir: str = "runs/demo"
    models: tuple[str, ...] = ("scratch", "lit")
    presets: dict[str, str] = field(default_factory=dict)  # model kind -> preset (default: MODELS)
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted training-config keys, for every model
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
    """Prepare the data, train each model, evaluate, write the report; returns the path of ``report.md``."""
    from clipforge.demo_data import prepare
    from clipforge.eval.report import jsonable
    from clipforge.files import atomic_write_text

    started = time.perf_counter()
    out = Path(settings.out_dir)
    unknown = sorted(set(settings.models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown demo models {unknown}; choose from {sorted(MODELS)}")
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(progress=settings.progress)
    sets = {name: data.eval_set(name) for name in data.plan["evals"]}
    val = data.eval_set("style_shift_val", section="validation")
    digits = load_digits(out)
    results: dict[str, Any] = {
        "data": {"seconds": data.seconds, "built": list(data.built), "train_pairs": data.train_counts(),
                 "eval_sets": {n: {"images": len(s), "classes": s.num_classes, "kind": s.kind, "source": s.source}
                               for n, s in sets.items()}},
        "models": {},
    }  # fmt: skip
    for kind in settings.models:
        results["models"][kind] = _train_and_evaluate(kind, data, sets, val, digits, settings, out)
    results["wall_time_s"] = time.perf_counter() - started
    _plot_curves(results["models"], out / "zeroshot_over_training.png")
    atomic_write_text(out / "report.json", json.dumps(jsonable(results), indent=2) + "\n")
    report = out / "report.md"
    atomic_write_text(report, render_report(results))
    return report


def _train_and_evaluate(kind, data, sets, val, digits, settings: DemoSettings, out: Path) -> dict[str, Any]:
    from clipforge.checkpoint import load_checkpoint
    from clipforge.eval.hook import zero_shot_hook
    from clipforge.train import resolve_train_config, train

    preset = preset_path(settings.presets.get(kind, MODELS[kind][0]))
    shutil.rmtree(out / kind, ignore_errors=True)
    overrides: dict[str, Any] = {
        "data.train": data.train_specs(), "run.output_dir": str(out), "run.name": kind,
        "run.progress": settings.progress, **settings.overrides,
    }  # fmt: skip
    config = resolve_train_config(preset, overrides)
    overrides["run.eval_every"] = settings.eval_every or config.run.eval_every or max(1, config.steps // 8)
    config = resolve_train_config(preset, overrides)
    zero_shot = zero_shot_hook([val, sets["heldout_concepts"]])
    curve: list[dict[str, float]] = []

    def track(context: Any) -> dict[str, float]:
        record = zero_shot(context)
        curve.append({"step": context.step, "samples": context.samples_seen,
                      **{k.removeprefix("zeroshot_"): v for k, v in record.items()}})  # fmt: skip
        return record

    train_started = time.perf_counter()
    summary = train(config, hooks=[track])
    train_seconds = time.perf_counter() - train_started
    shutil.copyfile(Path(summary.run_dir) / "loss.png", out / f"loss_{kind}.png")
    model = load_checkpoint(summary.model_path)
    eval_started = time.perf_counter()
    result = evaluate(model, data, sets, digits, settings, out, kind)
    result["training"] = {
        "what": MODELS[kind][1], "preset": str(preset), "model": config.model, "steps": summary.steps,
        "batch_size": config.data.batch_size, "samples_seen": summary.samples_seen, "epochs": summary.epochs,
        "final_loss": summary.final_loss, "samples_per_s": summary.samples_per_s, "precision": config.precision,
        "stopped_early": summary.stopped_early, "skipped": summary.skipped, "wall_time_s": train_seconds,
        "loss": config.loss.kind, "lock": {"text": config.lock.text, "image": config.lock.image},
        "config": str(Path(summary.run_dir) / "config.yaml"), "model_path": summary.model_path,
    }  # fmt: skip
    result["evaluate_s"] = time.perf_counter() - eval_started
    result["zero_shot_over_training"] = curve
    return result


# ----------------------------------------------------------------------------------------------------------------
# Evaluation of one trained model


def evaluate(
    model, data, sets, digits: Digits, settings: DemoSettings, out: Path, kind: str
) -> dict[str, Any]:
    """Every evaluation of one model; each image set is encoded once and shared by the evaluations using it.

    The zero-shot sets are the training hook's (:class:`~clipforge.eval.zeroshot_set.ZeroShotSet`, with
    intervals); the rest are task specs (:func:`evaluation_specs`) run by :func:`clipforge.eval.tasks.run_specs`.
    """
    from clipforge.eval.report import write_confusion_png
    from clipforge.eval.tasks import run_specs

    result: dict[str, Any] = {"zero_shot": {}}
    set_features = {name: s.image_features(model, settings.eval_batch_size) for name, s in sets.items()}
    for name, zs_set in sets.items():
        report = zs_set.report(model, features=set_features[name])
        confusion = report.pop("_confusion_ensemble")
        result["zero_shot"][name] = report
        if name == "heldout_concepts":
            write_confusion_png(out / f"confusion_heldout_{kind}.png", confusion, report["classes"])
    tests = {part["source"]: _encode_split(model, data.roots[part["source"]], "test", settings)
             for part in data.plan["train"]}  # fmt: skip
    digit_features = {split: _encode(model, d, settings) for split, d in digits.splits.items()}
    specs = evaluation_specs(data, digits, tests, digit_features, settings)
    done = {name: outcome for name, (outcome, _) in run_specs(model, specs).items()}
    result["retrieval"] = {name.removeprefix("builtin:"): _retrieval(done[f"retrieval:{name}"], test)
                           for name, test in tests.items()}  # fmt: skip
    result["linear_probe"] = {source: _probe(done[f"probe:{source}"], tests[name])
                              for source, name in PROBE_SOURCES.items()}  # fmt: skip
    test = digit_features["test"]
    result["digits"] = {
        "test_images": digits.test_images, "chance": float(np.bincount(test.labels).max()) / len(test),
        "pixel_baseline": digits.pixel_baseline, "zero_shot_clip": done["digits:zero_shot"].metrics["top1"],
        "linear_probe_clip": done["digits:probe"].metrics["test_accuracy"],
    }  # fmt: skip
    _retrieval_montage(model, data, sets, set_features, tests, out / f"retrieval_montage_{kind}.png", kind)
    return result


def evaluation_specs(data, digits: Digits, tests: dict[str, Any], digit_features: dict[str, Any],
                     settings: DemoSettings) -> list[dict[str, Any]]:  # fmt: skip
    """The demo's evaluations of a trained model besides the zero-shot sets, as task specs: retrieval on each
    training source's test split (every caption of an image is a positive); logistic regression (the paper's
    protocol: C chosen on val, standardised features) on seen classes; and the paper's MNIST remark on digits
    (raw pixels vs zero-shot CLIP vs a probe on CLIP features)."""
    common = {"quiet": True, "no_cache": True, "batch_size": settings.eval_batch_size}
    probe = {**common, "task": "linear_probe", "standardize": True, "max_iter": settings.probe_max_iter}
    specs: list[dict[str, Any]] = [{"task": "retrieval", "name": f"retrieval:{name}", "data": test, **common}
                                   for name, test in tests.items()]  # fmt: skip
    specs += [{**probe, "name": f"probe:{source}", "data": {"root": data.roots[name], "test": tests[name]}}
              for source, name in PROBE_SOURCES.items()]  # fmt: skip
    names = digits.splits["test"].classnames or [str(i) for i in range(10)]
    specs.append({**common, "task": "zeroshot", "name": "digits:zero_shot", "data": digit_features["test"],
                  "classnames": list(names), "templates": ["a handwritten digit {}", "the number {}"]})  # fmt: skip
    specs.append({**probe, "name": "digits:probe", "data": digit_features})
    return specs


def _encode(model, dataset, settings: DemoSettings):
    from clipforge.eval.features import encode_images

    return encode_images(model, dataset, batch_size=settings.eval_batch_size, progress=False)


def _encode_split(model, root: Path, split: str, settings: DemoSettings, label_field: str = "label"):
    from clipforge.eval.datasets import open_eval_dataset

    return _encode(model, open_eval_dataset(root, split=split, label_field=label_field), settings)


def _retrieval(result, test) -> dict[str, Any]:
    """The retrieval task's numbers with intervals and chance."""
    from clipforge.eval.intervals import proportion_interval

    metrics = {k: v for k, v in result.metrics.items() if k not in ("num_images", "num_captions")}
    captions = result.metrics["num_captions"]
    r1 = proportion_interval(round(metrics["text_to_image_R@1"] * captions), captions)
    i2t = proportion_interval(round(metrics["image_to_text_R@1"] * len(test)), len(test))
    return {"images": len(test), "captions": captions, **metrics, "text_to_image_R@1_interval": r1.to_dict(),
            "image_to_text_R@1_interval": i2t.to_dict(), "chance_text_to_image_R@1": 1 / len(test)}  # fmt: skip


def _probe(result, test) -> dict[str, Any]:
    """The linear-probe task's numbers with an interval and chance (the most common test class)."""
    from clipforge.eval.intervals import proportion_interval

    accuracy, num_test = result.metrics["test_accuracy"], result.details["probe"]["num_test"]
    interval = proportion_interval(round(accuracy * num_test), num_test)
    return {"test_accuracy": accuracy, "interval": interval.to_dict(), "c": result.metrics["c"],
            "classes": len(set(test.labels.tolist())), "test_images": num_test,
            "chance": float(np.bincount(test.labels).max()) / len(test)}  # fmt: skip


@dataclass(frozen=True)
class Digits:
    """scikit-learn's digits (never trained on), opened once, with the raw-pixel baseline (the same for every
    model)."""

    splits: dict[str, Any]  # "train" / "val" / "test" -> EvalDataset
    pixel_baseline: float
    test_images: int


def load_digits(out: Path) -> Digits:
    from clipforge.data.builtin import build_digits
    from clipforge.eval.datasets import open_eval_dataset
    from clipforge.eval.pixels import pixel_baseline

    root = out / "digits"
    if not (root / "classes.json").exists():
        build_digits(root)
    splits = {split: open_eval_dataset(root, split=split) for split in ("train", "val", "test")}
    pairs = {split: [(s.image, s.label) for s in d] for split, d in splits.items()}
    pixels = pixel_baseline(
        [i for i, _ in pairs["train"]], [y for _, y in pairs["train"]], [i for i, _ in pairs["test"]],
        [y for _, y in pairs["test"]], val_images=[i for i, _ in pairs["val"]], val_y=[y for _, y in pairs["val"]],
    )  # fmt: skip
    return Digits(splits, pixels.test_accuracy, len(pairs["test"]))


def _retrieval_montage(model, data, sets, set_features, tests, path: Path, kind: str) -> None:
    """Each query's 6 best images among everything never trained on (test splits, both evaluation sets)."""
    import matplotlib.pyplot as plt

    from clipforge.eval.datasets import open_eval_dataset
    from clipforge.eval.features import encode_texts
    from clipforge.tokenizer import get_tokenizer

    images = [image for s in sets.values() for image in s.images]
    features = [set_features[name].numpy() for name in sets]
    keys: list[tuple[str, str]] = []
    for name, test in tests.items():
        keys += [(name, key) for key in test.keys]
        features.append(test.features)
    gallery = np.concatenate(features)
    text = encode_texts(model, get_tokenizer(model), list(MONTAGE_QUERIES), progress=False)
    top = np.argsort(-(text @ gallery.T), axis=1)[:, :6]
    wanted: dict[str, set[str]] = {}
    for index in top.ravel():
        if index >= len(images):
            source, key = keys[index - len(images)]
            wanted.setdefault(source, set()).add(key)
    loaded = {(source, k): v for source, ks in wanted.items()
              for k, v in open_eval_dataset(data.roots[source], split="test").load_images(sorted(ks)).items()}  # fmt: skip

    def image_at(index: int):
        return images[index] if index < len(images) else loaded.get(keys[index - len(images)])

    with plt.rc_context({"backend": "Agg"}):
        fig, axes = plt.subplots(len(MONTAGE_QUERIES), 6, figsize=(7.5, 1.3 * len(MONTAGE_QUERIES)))
        for row, query in enumerate(MONTAGE_QUERIES):
            for col in range(6):
                axes[row, col].axis("off")
                image = image_at(int(top[row, col]))
                if image is not None:
                    axes[row, col].imshow(image)
            axes[row, 0].set_title(f'"{query}"', loc="left", fontsize=8)
        fig.suptitle(f"{kind}: text → image over {len(gallery):,} images never trained on", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


def _plot_curves(models: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    with plt.rc_context({"backend": "Agg"}):
        fig, ax = plt.subplots(figsize=(6.4, 3.9))
        for kind, result in models.items():
            curve = result["zero_shot_over_training"]
            if not curve:
                continue
            names = [k for k in curve[0] if k not in ("step", "samples")]
            for name, style in zip(names, ("-", "--")):
                ax.plot([r["samples"] for r in curve], [r[name] for r in curve], style, marker="o", markersize=3,
                        label=f"{kind}: {name}")  # fmt: skip
        for result in models.values():
            for name, report in result["zero_shot"].items():
                if name == "heldout_concepts":
                    ax.axhline(report["chance_mean_per_class"], linestyle=":", color="grey", linewidth=1)
            break
        ax.axhline(1 / 9, linestyle=":", color="black", linewidth=1)
        ax.set_xlabel("training pairs seen")
        ax.set_ylabel("zero-shot mean per-class accuracy (ensemble)")
        ax.set_title(
            "Zero-shot during training (dotted: chance, 1/9 style shift; grey: 1/23 concepts)", fontsize=8
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Report


def _pm(interval: dict[str, float]) -> str:
    return f"{interval['value']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def render_report(r: dict[str, Any]) -> str:
    """The demo's report.json as markdown: one section per evaluation, then the files and wall time."""
    sections = (
        _models_section,
        _zero_shot_section,
        _retrieval_section,
        _linear_probe_section,
        _digits_section,
        _files_section,
    )
    lines = [line for section in sections for line in section(r)]
    return "\n".join(lines) + "\n"


def _models_section(r: dict[str, Any]) -> list[str]:
    d = r["data"]
    lines = [
        "# clipforge demo report",
        "",
        f"Training data: {sum(d['train_pairs'].values()):,} image–caption pairs "
        f"({', '.join(f'{k} {v:,}' for k, v in d['train_pairs'].items())}). Data preparation took "
        f"{d['seconds']:.1f} s ({'first run: built ' + ', '.join(d['built']) if d['built'] else 'cached'}).",
        "",
        "## Models",
        "",
        "| model | what | steps × batch | pairs seen (epochs) | pairs/s | training time | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, m in r["models"].items():
        t = m["training"]
        lines.append(f"| {kind} | {t['what']} | {t['steps']} × {t['batch_size']} | {t['samples_seen']:,} "
                     f"({t['epochs'] or 0:.1f}) | {t['samples_per_s']:.0f} | {t['wall_time_s'] / 60:.1f} min | "
                     f"{t['final_loss']:.3f} |")  # fmt: skip
    return lines


def _zero_shot_section(r: dict[str, Any]) -> list[str]:
    d = r["data"]
    lines = [
        "",
        "## Zero-shot on data never trained on",
        "",
        "Mean per-class accuracy (chance 1/K whatever the class sizes) with a 95% interval; the ensemble-minus-single "
        "difference is paired (same images). Top-1 with its majority-class chance.",
        "",
        "| set | model | images | classes | chance | single prompt | prompt ensemble | ensemble − single | "
        "top-1 (ensemble) | majority chance |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in d["eval_sets"]:
        for kind, m in r["models"].items():
            z = m["zero_shot"][name]
            lines.append(f"| {name} | {kind} | {z['images']:,} | {len(z['classes'])} | "
                         f"{z['chance_mean_per_class']:.3f} | {_pm(z['single']['mean_per_class'])} | "
                         f"**{_pm(z['ensemble']['mean_per_class'])}** | {_pm(z['ensemble_minus_single'])} | "
                         f"{_pm(z['ensemble']['top1'])} | {z['chance_top1']:.3f} |")  # fmt: skip
    lines += [""]
    for name, info in d["eval_sets"].items():
        first = next(iter(r["models"].values()))["zero_shot"][name]
        lines.append(
            f"- **{name}** — {info['kind']}. From {info['source']}; classes: {', '.join(first['classes'])}."
        )
    return lines


def _retrieval_section(r: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Retrieval on the training sources' test splits (text → image R@1, 95% interval)",
        "",
        "| source | images | " + " | ".join(r["models"]) + " | chance |",
        "|---|---|" + "---|" * len(r["models"]) + "---|",
    ]
    first_model = next(iter(r["models"].values()))
    for source, v in first_model["retrieval"].items():
        cells = [_pm(m["retrieval"][source]["text_to_image_R@1_interval"]) for m in r["models"].values()]
        lines.append(
            f"| {source} | {v['images']} | " + " | ".join(cells) + f" | {v['chance_text_to_image_R@1']:.4f} |"
        )
    return lines


def _linear_probe_section(r: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Seen classes, unseen images: linear probe (C chosen on val)",
        "",
        "| source | classes | test images | majority chance | " + " | ".join(r["models"]) + " |",
        "|---|---|---|---|" + "---|" * len(r["models"]),
    ]
    first_model = next(iter(r["models"].values()))
    for source, v in first_model["linear_probe"].items():
        cells = [_pm(m["linear_probe"][source]["interval"]) for m in r["models"].values()]
        lines.append(
            f"| {source} | {v['classes']} | {v['test_images']} | {v['chance']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def _digits_section(r: dict[str, Any]) -> list[str]:
    lines = ["", "## Handwritten digits (never trained on): the paper's MNIST remark", ""]
    for kind, m in r["models"].items():
        g = m["digits"]
        lines.append(f"- {kind}: {g['test_images']} test digits, chance {g['chance']:.3f}: logistic regression on "
                     f"raw pixels **{g['pixel_baseline']:.3f}**, zero-shot CLIP {g['zero_shot_clip']:.3f}, linear "
                     f"probe on CLIP features {g['linear_probe_clip']:.3f}.")  # fmt: skip
    return lines


def _files_section(r: dict[str, Any]) -> list[str]:
    d = r["data"]
    return [
        "",
        "## Figures and files",
        "",
        "- `zeroshot_over_training.png`: zero-shot during training; `loss_<model>.png`",
        "- `confusion_heldout_<model>.png`: held-out concepts; `retrieval_montage_<model>.png`: typed queries",
        "- `report.json`: every number here; `<model>/`: the training runs (config, metrics, model)",
        "",
        "Wall time: " + ", ".join(f"{k} training {m['training']['wall_time_s'] / 60:.1f} min + evaluation "
                                  f"{m['evaluate_s'] / 60:.1f} min" for k, m in r["models"].items())
        + f"; total {r['wall_time_s'] / 60:.1f} min (data {d['seconds']:.1f} s).",
    ]  # fmt: skip
