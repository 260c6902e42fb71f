"""`clipforge eval zeroshot|linear-probe|retrieval|pixels|overlap`: the paper's evaluations on folders, tables or
shards; each writes ``results.json`` and ``results.md`` (and pictures) into ``--out`` and prints the path."""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("clipforge.eval")

PAPER_BASELINE_TEMPLATE = "a photo of a {}."


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces


def _load_model(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The model named by ``--model`` (a checkpoint, or a registered name with random weights: see
    :func:`clipforge.inference.load_model`) and its identity."""
    from clipforge.device import resolve_device
    from clipforge.eval.features import model_fingerprint
    from clipforge.inference import RANDOM_WEIGHTS_SEED, load_model

    spec = args.model
    path = Path(spec).expanduser()
    model = load_model(spec, activation=args.activation)
    identity: dict[str, Any] = {"spec": spec}
    if path.exists():
        identity.update(path=str(path.resolve()), random_weights=False)
    else:
        identity.update(random_weights=True, seed=RANDOM_WEIGHTS_SEED)
    device = resolve_device(args.device)
    model = model.to(device).eval()
    identity.update(
        architecture=model.config.name,
        activation=model.config.activation,
        image_size=model.config.vision.image_size,
        fingerprint=model_fingerprint(model),
        device=str(device),
    )
    return model, identity


def _cache(args: argparse.Namespace) -> Any:
    from clipforge.eval.features import FeatureCache

    return None if args.no_cache else FeatureCache(args.cache_dir)


def _open(args: argparse.Namespace, spec: str, split: str | None) -> Any:
    from clipforge.eval.datasets import open_eval_dataset

    dataset = open_eval_dataset(
        spec,
        split=split,
        label_field=args.label_field,
        classnames=args.classnames,
        caption_field=getattr(args, "caption_field", None),
        caption_separator=getattr(args, "caption_separator", None),
        image_field=args.image_field,
    )
    for note in dataset.notes:
        log.info("note: %s", note)
    return dataset.subset(args.max_samples)


def _encode(args: argparse.Namespace, model: Any, identity: dict[str, Any], dataset: Any) -> Any:
    from clipforge.eval.features import encode_images

    return encode_images(
        model,
        dataset,
        batch_size=args.batch_size,
        num_workers=args.workers,
        precision=args.precision,
        cache=_cache(args),
        fingerprint=identity["fingerprint"],
        progress=not args.quiet,
    )


def _probe_data(args: argparse.Namespace) -> dict[str, tuple[str, str | None]]:
    """(spec, split) per role for the probes: --train-data/--val-data/--test-data, or --data with splits."""
    roles: dict[str, tuple[str, str | None]] = {}
    for role in ("train", "val", "test"):
        explicit = getattr(args, f"{role}_data")
        if explicit is not None:
            roles[role] = (explicit, None)
        elif args.data is not None:
            split = getattr(args, f"{role}_split")
            if role != "val" or (Path(args.data) / split).is_dir():
                roles[role] = (args.data, split)
    missing = [r for r in ("train", "test") if r not in roles]
    if missing:
        raise ValueError(
            f"{args.eval_task}: no {' or '.join(missing)} data; pass --data DIR (with {args.train_split}/ and "
            f"{args.test_split}/ subfolders) or --train-data and --test-data"
        )
    return roles


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("func", "command") and not callable(v)}


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return Path(args.out)
    return Path("evals") / f"{args.eval_task}-{time.strftime('%Y%m%d-%H%M%S')}"


def _labelled(encoded: Any, role: str) -> tuple[Any, Any, dict[str, int]]:
    """Features and labels of the labelled samples, and the count of unlabelled ones left out."""
    keep = encoded.labels >= 0
    dropped = int((~keep).sum())
    counts = dict(encoded.skipped)
    if dropped:
        counts["missing_label"] = counts.get("missing_label", 0) + dropped
        log.warning("%s data: %d samples have no label and are left out", role, dropped)
    return encoded.features[keep], encoded.labels[keep], counts


def _finish(path: Path, lines: list[str]) -> int:
    for line in lines:
        print(line)
    print(f"results: {path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# zeroshot


def _cmd_zeroshot(args: argparse.Namespace) -> int:
    from clipforge.eval.report import CONFUSION_PNG, write_confusion_png, write_results
    from clipforge.eval.templates import get_templates, resolve_classnames
    from clipforge.eval.zeroshot import build_classifier, classify_features
    from clipforge.tokenizer import get_tokenizer

    started = time.perf_counter()
    dataset = _open(args, args.data, args.split)  # data and templates first: their errors come before loading
    template_set = get_templates(args.templates)
    raw = dataset.classnames if dataset.classnames is not None else template_set.classnames
    if raw is None:
        raise ValueError(
            f"{args.data}: no class names in the data and none in template set {template_set.name!r}; pass "
            "--classnames FILE (one name per line, in label order)"
        )
    resolved = resolve_classnames(args.dataset_name or template_set.name, list(raw))
    model, identity = _load_model(args)
    for change in resolved.changes[:20]:
        log.info("class %d: %r -> %r (%s)", change.index, change.raw, change.name, change.reason)
    for name, indices in resolved.duplicates.items():
        log.warning("classes %s share the name %r: zero-shot cannot tell them apart", indices, name)
    encoded = _encode(args, model, identity, dataset)
    tokenizer = get_tokenizer(model)
    classifier = build_classifier(
        model, tokenizer, resolved.names, template_set.templates, precision=args.precision
    )
    result = classify_features(
        encoded.features, encoded.labels, classifier, classnames=resolved.names, skipped=encoded.skipped
    )
    metrics: dict[str, Any] = {**result.metrics(), "num_samples": result.num_samples}
    details: dict[str, Any] = {
        "zeroshot": result.to_dict(),
        "templates": {
            "name": template_set.name,
            "source": template_set.source,
            "templates": template_set.templates,
        },
        "classnames": resolved.to_dict(),
    }
    lines = [
        f"zero-shot on {dataset.name}: top-1 {result.top1:.4f}, top-{result.top_k} {result.top5:.4f}, "
        f"mean per-class recall {result.mean_per_class_recall:.4f} ({result.num_samples} images, "
        f"{result.num_classes} classes, {len(template_set.templates)} templates)"
    ]
    if args.single_template is not None:
        lines.append(_single_template(args, model, tokenizer, resolved.names, template_set, encoded, result,
                                      metrics, details))  # fmt: skip
    out = _out_dir(args)
    recall_rows = [
        (name, int(result.confusion[i].sum()), result.per_class_recall[i])
        for i, name in enumerate(result.classnames or ())
    ]
    path = write_results(
        out,
        task="zeroshot",
        metrics=metrics,
        settings=_settings(args),
        datasets={"data": dataset.describe()},
        checkpoint=identity,
        skipped={"data": result.skipped},
        details=details,
        wall_time_s=time.perf_counter() - started,
        tables=[("Per-class recall", ["class", "samples", "recall"], recall_rows)],
    )
    write_confusion_png(out / CONFUSION_PNG, result.confusion, result.classnames)
    return _finish(path, lines)


def _single_template(
    args: argparse.Namespace,
    model: Any,
    tokenizer: Any,
    names: Any,
    template_set: Any,
    encoded: Any,
    result: Any,
    metrics: dict[str, Any],
    details: dict[str, Any],
) -> str:
    """Classify with one template too; add its top-1 and the ensemble's gain to ``metrics``/``details``."""
    from clipforge.eval.zeroshot import build_classifier, classify_features

    template = args.single_template or _default_single_template(template_set.templates)
    classifier = build_classifier(model, tokenizer, names, [template], precision=args.precision)
    single = classify_features(encoded.features, encoded.labels, classifier, classnames=names)
    metrics.update(single_template_top1=single.top1, ensemble_gain_top1=result.top1 - single.top1)
    details["single_template"] = {"template": template, **single.to_dict(include_confusion=False)}
    return (
        f"single template {template!r}: top-1 {single.top1:.4f}; the ensemble of "
        f"{len(template_set.templates)} adds {100 * (result.top1 - single.top1):+.2f} points"
    )


def _default_single_template(templates: tuple[str, ...]) -> str:
    """The paper's baseline prompt, "a photo of a {}.", when the set has it; else the set's first template."""
    return PAPER_BASELINE_TEMPLATE if PAPER_BASELINE_TEMPLATE in templates else templates[0]


# ----------------------------------------------------------------------------------------------------------------
# linear-probe


def _cmd_linear_probe(args: argparse.Namespace) -> int:
    from clipforge.eval.linear_probe import few_shot, linear_probe
    from clipforge.eval.report import write_results

    started = time.perf_counter()
    opened = {role: _open(args, spec, split) for role, (spec, split) in _probe_data(args).items()}
    model, identity = _load_model(args)
    datasets, arrays, skipped = {}, {}, {}
    for role, dataset in opened.items():
        datasets[role] = dataset.describe()
        x, y, skipped[role] = _labelled(_encode(args, model, identity, dataset), role)
        arrays[role] = (x, y)
    (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
    if args.few_shot is not None:
        result = few_shot(train_x, train_y, test_x, test_y, k=args.few_shot, seeds=tuple(args.seeds),
                          max_iter=args.max_iter)  # fmt: skip
        metrics = {
            "k": result.k,
            "mean_accuracy": result.mean_accuracy,
            "std_accuracy": result.std_accuracy,
            "mean_per_class": result.mean_per_class,
        }
        line = (f"{args.few_shot}-shot linear probe: test top-1 {result.mean_accuracy:.4f} ± "
                f"{result.std_accuracy:.4f} over seeds {list(args.seeds)}")  # fmt: skip
    else:
        val_x, val_y = arrays.get("val", (None, None))
        result = linear_probe(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y, seed=args.seeds[0],
                              max_iter=args.max_iter, progress=not args.quiet)  # fmt: skip
        metrics = {
            "test_accuracy": result.test_accuracy,
            "test_mean_per_class": result.test_mean_per_class,
            "val_accuracy": result.val_accuracy,
            "c": result.c,
        }
        line = (f"linear probe: test top-1 {result.test_accuracy:.4f}, mean per-class "
                f"{result.test_mean_per_class:.4f} (C = {result.c:.4g}, validation {result.val_accuracy:.4f})")  # fmt: skip
    path = write_results(_out_dir(args), task="linear-probe", metrics=metrics, settings=_settings(args),
                         datasets=datasets, checkpoint=identity, skipped=skipped,
                         details={"probe": result.to_dict()}, wall_time_s=time.perf_counter() - started)  # fmt: skip
    return _finish(path, [line])


# ----------------------------------------------------------------------------------------------------------------
# retrieval


def _cmd_retrieval(args: argparse.Namespace) -> int:
    import numpy as np

    from clipforge.eval.features import encode_texts
    from clipforge.eval.report import write_results
    from clipforge.eval.retrieval import retrieval_metrics
    from clipforge.tokenizer import get_tokenizer

    started = time.perf_counter()
    dataset = _open(args, args.data, args.split)
    model, identity = _load_model(args)
    encoded = _encode(args, model, identity, dataset)
    skipped = Counter(encoded.skipped)
    keep = [i for i, captions in enumerate(encoded.captions) if captions]
    if len(keep) < len(encoded.captions):
        skipped["no_caption"] += len(encoded.captions) - len(keep)
        log.warning("%d images have no caption and are left out", len(encoded.captions) - len(keep))
    if not keep:
        raise ValueError(f"{args.data}: no image has a caption; name the caption column with --caption-field")
    texts = [caption for i in keep for caption in encoded.captions[i]]
    text_to_image = np.array([n for n, i in enumerate(keep) for _ in encoded.captions[i]], dtype=np.int64)
    tokenizer = get_tokenizer(model)
    text_features = encode_texts(model, tokenizer, texts, batch_size=max(args.batch_size, 256),
                                 precision=args.precision, progress=not args.quiet)  # fmt: skip
    metrics = retrieval_metrics(encoded.features[keep], text_features, text_to_image, ks=tuple(args.ks))
    metrics = {**metrics, "num_images": len(keep), "num_captions": len(texts)}
    path = write_results(_out_dir(args), task="retrieval", metrics=metrics, settings=_settings(args),
                         datasets={"data": dataset.describe()}, checkpoint=identity,
                         skipped={"data": dict(skipped)}, wall_time_s=time.perf_counter() - started)  # fmt: skip
    recalls = ", ".join(f"R@{k} {metrics[f'image_to_text_R@{k}']:.4f}" for k in args.ks)
    t2i = ", ".join(f"R@{k} {metrics[f'text_to_image_R@{k}']:.4f}" for k in args.ks)
    return _finish(path, [f"image->text: {recalls}", f"text->image: {t2i}",
                          f"({len(keep)} images, {len(texts)} captions)"])  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# pixels


def _cmd_pixels(args: argparse.Namespace) -> int:
    from clipforge.eval.linear_probe import linear_probe
    from clipforge.eval.pixels import pixel_features
    from clipforge.eval.report import write_results

    started = time.perf_counter()
    roles = _probe_data(args)
    datasets, arrays, skipped = {}, {}, {}
    for role, (spec, split) in roles.items():
        dataset = _open(args, spec, split)
        labels: list[int] = []
        features = pixel_features(_labelled_images(dataset, labels), size=args.size, grayscale=args.grayscale)
        arrays[role] = (features, labels)
        datasets[role] = dataset.describe()
        skipped[role] = dict(dataset.skipped)
    (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
    val_x, val_y = arrays.get("val", (None, None))
    # pixel_baseline's protocol (standardised pixels, the linear probe's C search), on features computed here
    # so that images skipped while streaming keep their labels out too.
    result = linear_probe(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y, seed=args.seeds[0],
                          max_iter=args.max_iter, standardize=True, progress=not args.quiet)  # fmt: skip
    metrics = {"test_accuracy": result.test_accuracy, "test_mean_per_class": result.test_mean_per_class,
               "val_accuracy": result.val_accuracy, "c": result.c}  # fmt: skip
    checkpoint = {"spec": f"raw pixels {args.size}x{args.size}" + (" grey" if args.grayscale else " RGB")}
    path = write_results(_out_dir(args), task="pixels", metrics=metrics, settings=_settings(args),
                         datasets=datasets, checkpoint=checkpoint, skipped=skipped,
                         details={"probe": result.to_dict()}, wall_time_s=time.perf_counter() - started)  # fmt: skip
    return _finish(path, [f"raw-pixel logistic regression ({args.size}x{args.size}): test top-1 "
                          f"{result.test_accuracy:.4f} (C = {result.c:.4g})"])  # fmt: skip


def _labelled_images(dataset: Any, labels: list[int]) -> Iterator[Any]:
    """The dataset's labelled images, appending each label to ``labels`` as the image is yielded."""
    for sample in dataset:
        if sample.label is None:
            dataset.skipped["missing_label"] += 1
            continue
        labels.append(sample.label)
        yield sample.image


# ----------------------------------------------------------------------------------------------------------------
# overlap


def _cmd_overlap(args: argparse.Namespace) -> int:
    from clipforge.eval.overlap import analyze_overlap, sort_matches
    from clipforge.eval.overlap_montage import overlap_montage
    from clipforge.eval.report import write_results

    started = time.perf_counter()
    if args.train_data is None:
        raise ValueError(
            "overlap: pass --train-data (the training images) and --data (the evaluation images)"
        )
    eval_set = _open(args, args.data, args.split)
    train_set = _open(args, args.train_data, None)
    model, identity = _load_model(args)
    result, _, _ = analyze_overlap(
        ((s.key, s.image) for s in eval_set),
        ((s.key, s.image) for s in train_set),
        _embedder(model, args.precision),
        batch_size=args.batch_size,
        cosine_threshold=args.threshold,
        hash_threshold=args.hash_threshold,
        progress=not args.quiet,
    )
    out = _out_dir(args)
    closest = sort_matches(result.nearest, "cosine")[: args.top]
    eval_images = eval_set.load_images([m.eval_key for m in closest])
    train_images = train_set.load_images([m.train_key for m in closest])
    eval_keys = {m.eval_index: m.eval_key for m in closest}
    train_keys = {m.train_index: m.train_key for m in closest}
    montage = overlap_montage(closest, lambda i: eval_images[eval_keys[i]], lambda i: train_images[train_keys[i]],
                              out / "overlap.png", top=args.top, cosine_threshold=args.threshold,
                              hash_threshold=args.hash_threshold)  # fmt: skip
    summary = result.to_dict(top=50)
    metrics = {k: summary[k] for k in ("num_eval", "num_train", "duplicates_by_embedding", "duplicates_by_hash",
                                       "duplicates_either", "fraction_either")}  # fmt: skip
    path = write_results(out, task="overlap", metrics=metrics, settings=_settings(args),
                         datasets={"eval": eval_set.describe(), "train": train_set.describe()},
                         checkpoint=identity, skipped={"eval": dict(eval_set.skipped), "train": dict(train_set.skipped)},
                         details={"overlap": summary, "montage": str(montage)},
                         wall_time_s=time.perf_counter() - started)  # fmt: skip
    return _finish(path, [f"overlap: {result.duplicates_either} of {result.num_eval} eval images "
                          f"({100 * result.fraction_either:.2f}%) have a near-duplicate in training "
                          f"(cosine >= {args.threshold} or hash distance <= {args.hash_threshold})",
                          f"montage: {montage}"])  # fmt: skip


def _embedder(model: Any, precision: str) -> Any:
    """PIL images -> normalised features float32 [B, D] (one batch), for the overlap search."""
    import torch

    from clipforge.features import encode_image_tensor
    from clipforge.transforms import get_transforms

    transform = get_transforms(model)

    def embed(images: list[Any]) -> Any:
        batch = torch.stack([transform(image) for image in images])
        return encode_image_tensor(model, batch, batch_size=len(batch), precision=precision).numpy()

    return embed


# ----------------------------------------------------------------------------------------------------------------
# Arguments


def _common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    if model:
        p.add_argument("--model", required=True, help="checkpoint (any supported format) or an architecture "
                       "name (random weights, for testing the pipeline)")  # fmt: skip
        p.add_argument("--activation", choices=["quick_gelu", "gelu"], default=None,
                       help="activation of OpenAI/open_clip-layout state dicts (not recorded in those files)")  # fmt: skip
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
        p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
        p.add_argument(
            "--cache-dir", default=None, help="feature cache (default ~/.cache/clipforge/features)"
        )
        p.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    p.add_argument("--label-field", default="label", help="label column / json field (default: label)")
    p.add_argument("--image-field", default=None, help="image-path column of a table (default: detected)")
    p.add_argument("--classnames", default=None, help="class names file (.txt one per line, or .json list)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate at most this many samples per set")
    p.add_argument("--out", default=None, help="output folder (default evals/<task>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="a folder with train/ and test/ (and val/) split subfolders")
    p.add_argument("--train-data", default=None)
    p.add_argument("--val-data", default=None, help="validation data for choosing C (default: val/ split, or a "
                   "stratified 20%% of train)")  # fmt: skip
    p.add_argument("--test-data", default=None)
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--test-split", "--split", dest="test_split", default="test")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="validation-split / k-shot seeds")
    p.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: zero-shot, linear probe, retrieval, pixels, overlap")
    tasks = p.add_subparsers(dest="eval_task", required=True)

    p = tasks.add_parser("zeroshot", help="zero-shot classification with prompt ensembles")
    p.add_argument("--data", required=True, help="class folders, a labelled table, or shards")
    p.add_argument("--split", default=None, help="subfolder of --data (e.g. test)")
    p.add_argument("--templates", default="generic", help="template set name or a .txt/.json file")
    p.add_argument("--dataset-name", default=None, help="dataset whose class-name overrides apply "
                   "(default: the template set's name)")  # fmt: skip
    p.add_argument("--single-template", nargs="?", const="", default=None, metavar="TEMPLATE",
                   help="also classify with one template (default: 'a photo of a {}.' if the set has it, else "
                   "its first) and report the ensemble's gain")  # fmt: skip
    _common(p)
    p.set_defaults(func=_cmd_zeroshot)

    p = tasks.add_parser("linear-probe", help="logistic regression on frozen features (the paper's protocol)")
    _probe_arguments(p)
    p.add_argument(
        "--few-shot", type=int, default=None, metavar="K", help="k examples per class, over --seeds"
    )
    _common(p)
    p.set_defaults(func=_cmd_linear_probe)

    p = tasks.add_parser("retrieval", help="image<->text retrieval Recall@K with several captions per image")
    p.add_argument(
        "--data", required=True, help="captioned data: table, shards, or images with .txt captions"
    )
    p.add_argument("--split", default=None)
    p.add_argument("--caption-field", nargs="+", default=None, help="caption column(s) (default: detected)")
    p.add_argument("--caption-separator", default=None, help="split a caption field into several captions")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    _common(p)
    p.set_defaults(func=_cmd_retrieval)

    p = tasks.add_parser("pixels", help="logistic regression on raw pixels (the paper's MNIST yardstick)")
    _probe_arguments(p)
    p.add_argument("--size", type=int, default=16, help="pixels per side (default 16)")
    p.add_argument("--grayscale", action="store_true")
    _common(p, model=False)
    p.set_defaults(func=_cmd_pixels)

    p = tasks.add_parser("overlap", help="near-duplicates of evaluation images in the training data")
    p.add_argument("--data", required=True, help="the evaluation images")
    p.add_argument("--split", default=None)
    p.add_argument("--train-data", default=None, help="the training images")
    p.add_argument(
        "--threshold", type=float, default=0.95, help="cosine at or above which a pair is a duplicate"
    )
    p.add_argument("--hash-threshold", type=int, default=6, help="perceptual-hash distance at or below which")
    p.add_argument("--top", type=int, default=24, help="pairs drawn in overlap.png")
    _common(p)
    p.set_defaults(func=_cmd_overlap)
