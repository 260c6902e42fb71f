"""`clipforge experiment objectives`: the efficiency arithmetic on known curves, and a short real run."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from clipforge.experiments.objectives import (
    Curve,
    ExperimentConfig,
    ZeroShotSet,
    images_to_reach,
    run_objectives_experiment,
    summarise,
)
from clipforge.transforms import get_transforms
from tests.datasets import digit_images, digits_table


def test_images_to_reach_interpolates_between_evaluations():
    seen, acc = [100, 200, 300], [0.2, 0.4, 0.8]
    assert images_to_reach(seen, acc, 0.2) == 100.0  # already there at the first evaluation
    assert images_to_reach(seen, acc, 0.3) == pytest.approx(150.0)
    assert images_to_reach(seen, acc, 0.6) == pytest.approx(250.0)
    assert images_to_reach(seen, acc, 0.9) is None


def _set(n_classes=4):
    labels = torch.tensor([0, 0, 1, 2, 3, 3, 3, 1])
    return ZeroShotSet(torch.zeros(8, 3, 4, 4), labels, tuple(f"c{i}" for i in range(n_classes)))


def test_summary_ratios_follow_the_arithmetic():
    seen = [100, 200, 300, 400]
    curves = [
        Curve("captioning", 0, seen, [0.40, 0.40, 0.45, 0.50], 1.0, 1.0),
        Curve("captioning", 1, seen, [0.40, 0.40, 0.45, 0.50], 1.0, 1.0),
        Curve("bag_of_words", 0, seen, [0.40, 0.50, 0.60, 0.70], 1.0, 1.0),
        Curve("bag_of_words", 1, seen, [0.40, 0.50, 0.60, 0.70], 1.0, 1.0),
        Curve("contrastive", 0, seen, [0.50, 0.70, 0.80, 0.90], 1.0, 1.0),
        Curve("contrastive", 1, seen, [0.50, 0.70, 0.80, 0.90], 1.0, 1.0),
    ]
    data = _set()
    assert data.chance == pytest.approx(3 / 8)
    results = summarise(curves, data, ExperimentConfig(train_data=("x",), target_accuracy=0.5))
    reach = {k: v["images_to_target"] for k, v in results["objectives"].items()}
    assert reach == {"captioning": 400.0, "bag_of_words": 200.0, "contrastive": 100.0}
    ratios = {k: v["value"] for k, v in results["efficiency_ratios"].items()}
    assert ratios == {
        "captioning/bag_of_words": 2.0,
        "bag_of_words/contrastive": 2.0,
        "captioning/contrastive": 4.0,
    }
    # auto target: midpoint between chance (0.375) and the lowest best mean (captioning's 0.5)
    auto = summarise(curves, data, ExperimentConfig(train_data=("x",)))
    assert auto["target_accuracy"] == pytest.approx(0.4375)
    never = summarise(curves, data, ExperimentConfig(train_data=("x",), target_accuracy=0.6))
    assert never["efficiency_ratios"]["captioning/contrastive"]["note"].startswith("lower bound")
    assert never["efficiency_ratios"]["captioning/contrastive"]["value"] == pytest.approx(400 / 150)


def test_zero_shot_set_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"labels outside 0..1"):
        ZeroShotSet(torch.zeros(2, 3, 4, 4), torch.tensor([0, 2]), ("a", "b"))


def test_short_experiment_writes_plot_and_results(tmp_path):
    table = digits_table(tmp_path / "digits", n=96)
    images, labels = digit_images(40)
    transform = get_transforms("tiny")
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    data = ZeroShotSet(torch.stack([transform(image) for image in images]),
                       torch.tensor(labels), names, ("a handwritten digit {}.",), name="digits")  # fmt: skip
    config = ExperimentConfig(
        train_data=(str(table),), seeds=(0, 1), steps=4, batch_size=16, eval_every=2,
        train_overrides={"model_overrides": {"vision.layers": 1, "text.layers": 1}, "data.num_workers": 0,
                         "optim.warmup_steps": 1, "run.progress": False},
    )  # fmt: skip
    results = run_objectives_experiment(config, data, tmp_path / "exp")
    saved = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert saved["objectives"].keys() == {"contrastive", "bag_of_words", "captioning"}
    for value in saved["objectives"].values():
        assert value["images_seen"] == [32, 64] and all(0 <= a <= 1 for a in value["mean"])
    assert len(saved["runs"]) == 6 and results["eval_set"]["classes"] == 10
    with Image.open(tmp_path / "exp" / "fig2.png") as plot:
        assert plot.size[0] > 300
    assert "| efficiency ratio" in (tmp_path / "exp" / "results.md").read_text()
