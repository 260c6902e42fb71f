"""The probe tasks: logistic regression on frozen CLIP features (the paper's protocol, or k-shot over seeds), and
the same on raw pixels (the paper's MNIST yardstick)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge.eval.tasks.base import (
    DataSettings,
    EncodeSettings,
    ModelArg,
    Result,
    Timer,
    describe,
    encode,
    labelled,
    open_data,
    resolve_model,
)


@dataclass
class SplitSettings:
    """The probes' split subfolders (when the data is one folder) and the fits' seeds and iteration cap."""

    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    seeds: tuple[int, ...] = (0, 1, 2)  # validation-split / k-shot seeds
    max_iter: int = 1000  # L-BFGS iterations per fit


@dataclass
class LinearProbeSettings(SplitSettings, EncodeSettings):
    few_shot: int | None = None  # k examples per class, over the seeds
    standardize: bool = False  # standardise each feature on the data each model is fit on


@dataclass
class PixelSettings(SplitSettings, DataSettings):
    size: int = 16  # pixels per side
    grayscale: bool = False


def probe_roles(task: str, data: Any, settings: Any) -> dict[str, tuple[Any, str | None]]:
    """(data, split) per role: ``data`` is a folder with split subfolders, or a mapping of roles ("train",
    "val", "test"; "root" for a folder with splits) to data."""
    given = dict(data) if isinstance(data, Mapping) else {"root": data}
    roles: dict[str, tuple[Any, str | None]] = {}
    for role in ("train", "val", "test"):
        root = given.get("root")
        if given.get(role) is not None:
            roles[role] = (given[role], None)
        elif root is not None:
            split = getattr(settings, f"{role}_split")
            if role != "val" or (Path(root) / split).is_dir():
                roles[role] = (root, split)
    missing = [r for r in ("train", "test") if r not in roles]
    if missing:
        raise ValueError(
            f"{task}: no {' or '.join(missing)} data; pass --data DIR (with {settings.train_split}/ and "
            f"{settings.test_split}/ subfolders) or --train-data and --test-data"
        )
    return roles


class LinearProbeTask:
    name = "linear-probe"
    Settings = LinearProbeSettings

    def run(
        self, model: ModelArg, data: Any, settings: LinearProbeSettings, *, out: Path | None = None
    ) -> Result:
        from clipforge.eval.linear_probe import few_shot, linear_probe

        elapsed = Timer()
        opened = {
            role: open_data(d, settings, split)
            for role, (d, split) in probe_roles(self.name, data, settings).items()
        }
        loaded = resolve_model(model)
        datasets, arrays, skipped = {}, {}, {}
        for role, dataset in opened.items():
            datasets[role] = describe(dataset)
            x, y, skipped[role] = labelled(encode(loaded, dataset, settings), role)
            arrays[role] = (x, y)
        (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
        seeds = tuple(settings.seeds)
        if settings.few_shot is not None:
            result = few_shot(train_x, train_y, test_x, test_y, k=settings.few_shot, seeds=seeds,
                              max_iter=settings.max_iter, standardize=settings.standardize)  # fmt: skip
            metrics = {"k": result.k, "mean_accuracy": result.mean_accuracy, "std_accuracy": result.std_accuracy,
                       "mean_per_class": result.mean_per_class}  # fmt: skip
            line = (f"{settings.few_shot}-shot linear probe: test top-1 {result.mean_accuracy:.4f} ± "
                    f"{result.std_accuracy:.4f} over seeds {list(seeds)}")  # fmt: skip
        else:
            val_x, val_y = arrays.get("val", (None, None))
            result = linear_probe(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y, seed=seeds[0],
                                  max_iter=settings.max_iter, standardize=settings.standardize,
                                  progress=not settings.quiet)  # fmt: skip
            metrics = {"test_accuracy": result.test_accuracy, "test_mean_per_class": result.test_mean_per_class,
                       "val_accuracy": result.val_accuracy, "c": result.c}  # fmt: skip
            line = (f"linear probe: test top-1 {result.test_accuracy:.4f}, mean per-class "
                    f"{result.test_mean_per_class:.4f} (C = {result.c:.4g}, validation {result.val_accuracy:.4f})")  # fmt: skip
        return Result(self.name, metrics, [line], datasets=datasets, checkpoint=loaded.identity, skipped=skipped,
                      details={"probe": result.to_dict()}, wall_time_s=elapsed())  # fmt: skip


class PixelsTask:
    name = "pixels"
    Settings = PixelSettings

    def run(self, model: ModelArg, data: Any, settings: PixelSettings, *, out: Path | None = None) -> Result:
        """``model`` is not used (None is fine): the features are the images' pixels."""
        from clipforge.eval.linear_probe import linear_probe
        from clipforge.eval.pixels import pixel_features

        elapsed = Timer()
        datasets, arrays, skipped = {}, {}, {}
        for role, (spec, split) in probe_roles(self.name, data, settings).items():
            dataset = open_data(spec, settings, split)
            labels: list[int] = []
            images = _labelled_images(dataset, labels)
            arrays[role] = (pixel_features(images, size=settings.size, grayscale=settings.grayscale), labels)
            datasets[role] = describe(dataset)
            skipped[role] = dict(dataset.skipped)
        (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
        val_x, val_y = arrays.get("val", (None, None))
        # pixel_baseline's protocol (standardised pixels, the linear probe's C search), on features computed here
        # so that images skipped while streaming keep their labels out too.
        result = linear_probe(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y, seed=settings.seeds[0],
                              max_iter=settings.max_iter, standardize=True, progress=not settings.quiet)  # fmt: skip
        metrics = {"test_accuracy": result.test_accuracy, "test_mean_per_class": result.test_mean_per_class,
                   "val_accuracy": result.val_accuracy, "c": result.c}  # fmt: skip
        checkpoint = {
            "spec": f"raw pixels {settings.size}x{settings.size}"
            + (" grey" if settings.grayscale else " RGB")
        }
        line = (f"raw-pixel logistic regression ({settings.size}x{settings.size}): test top-1 "
                f"{result.test_accuracy:.4f} (C = {result.c:.4g})")  # fmt: skip
        return Result(self.name, metrics, [line], datasets=datasets, checkpoint=checkpoint, skipped=skipped,
                      details={"probe": result.to_dict()}, wall_time_s=elapsed())  # fmt: skip


def _labelled_images(dataset: Any, labels: list[int]) -> Iterator[Any]:
    """The dataset's labelled images, appending each label to ``labels`` as the image is yielded."""
    for sample in dataset:
        if sample.label is None:
            dataset.skipped["missing_label"] += 1
            continue
        labels.append(sample.label)
        yield sample.image
