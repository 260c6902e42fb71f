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
    describe,
    images_to_reach,
    resummarise,
    run_objectives_experiment,
    summarise,
    zero_shot_accuracy,
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
    return ZeroShotSet.from_tensors(
        "eval", torch.zeros(8, 3, 4, 4), labels, tuple(f"c{i}" for i in range(n_classes))
    )


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
    assert data.chance_top1 == pytest.approx(3 / 8)
    results = summarise(
        curves, describe(data, "top1"), ExperimentConfig(train_data=("x",), target_accuracy=0.5)
    )
    reach = {k: v["images_to_target"] for k, v in results["objectives"].items()}
    assert reach == {"captioning": 400.0, "bag_of_words": 200.0, "contrastive": 100.0}
    ratios = {k: v["value"] for k, v in results["efficiency_ratios"].items()}
    assert ratios == {
        "captioning/bag_of_words": 2.0,
        "bag_of_words/contrastive": 2.0,
        "captioning/contrastive": 4.0,
    }
    notes = {k: v["note"] for k, v in results["efficiency_ratios"].items()}
    assert (
        notes["captioning/bag_of_words"] == "exact (interpolated)"
    )  # contrastive had 0.5 at the 1st evaluation:
    assert (
        notes["bag_of_words/contrastive"] == "lower bound: the faster one was there at the first evaluation"
    )
    # auto target: midpoint between chance (0.375) and the lowest best mean (captioning's 0.5)
    auto = summarise(curves, describe(data, "top1"), ExperimentConfig(train_data=("x",)))
    assert auto["target_accuracy"] == pytest.approx(0.4375)
    # an objective that barely leaves chance (best 0.38 < 0.375 + 0.2 * (0.9 - 0.375)) does not set the target
    flat = [Curve("captioning", s, seen, [0.375, 0.38, 0.375, 0.375], 1.0, 1.0) for s in (0, 1)]
    auto = summarise(flat + curves[2:], describe(data, "top1"), ExperimentConfig(train_data=("x",)))
    assert auto["target_accuracy"] == pytest.approx(0.375 + 0.5 * (0.7 - 0.375))
    assert auto["objectives"]["captioning"]["images_to_target"] is None
    never = summarise(
        curves, describe(data, "top1"), ExperimentConfig(train_data=("x",), target_accuracy=0.6)
    )
    assert never["efficiency_ratios"]["captioning/contrastive"]["note"].startswith("lower bound")
    assert never["efficiency_ratios"]["captioning/contrastive"]["value"] == pytest.approx(400 / 150)


def test_mean_per_class_metric_and_its_chance(monkeypatch):
    """Labels [0,0,1,2,3,3,3,1]; predictions [0,1,1,2,0,0,3,1]: 5/8 images right; per class 1/2, 1, 1, 1/3."""
    import clipforge.experiments.objectives as experiment

    predicted = torch.tensor([0, 1, 1, 2, 0, 0, 3, 1])

    class Fixed:
        def zero_shot_scorer(self, model, tokenizer, classnames, templates):
            def score(images):  # the set's images are zeros; the batch position picks the prediction
                start = score.done
                score.done += images.shape[0]
                return torch.nn.functional.one_hot(predicted[start : score.done], 4).float()

            score.done = 0
            return score

    monkeypatch.setattr(experiment, "get_objective", lambda name: Fixed())
    monkeypatch.setattr(experiment, "get_tokenizer", lambda model: None)
    model, data = torch.nn.Linear(1, 1), _set()
    assert zero_shot_accuracy("fixed", model, data, batch_size=3) == pytest.approx(5 / 8)
    mean = zero_shot_accuracy("fixed", model, data, batch_size=3, metric="mean_per_class")
    assert mean == pytest.approx((1 / 2 + 1 + 1 + 1 / 3) / 4)
    assert data.chance_for("top1") == pytest.approx(3 / 8) and data.chance_for("mean_per_class") == 0.25


def test_zero_shot_set_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"labels outside 0..1"):
        ZeroShotSet.from_tensors("eval", torch.zeros(2, 3, 4, 4), torch.tensor([0, 2]), ("a", "b"))


@pytest.mark.slow
def test_short_experiment_writes_plot_and_results(tmp_path):
    table = digits_table(tmp_path / "digits", n=96)
    images, labels = digit_images(40)
    transform = get_transforms("tiny")
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    data = ZeroShotSet.from_tensors("digits", torch.stack([transform(image) for image in images]),
                                    torch.tensor(labels), names, ("a handwritten digit {}.",))  # fmt: skip
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
    # the summary again at another target, from the saved curves alone
    again = resummarise(tmp_path / "exp" / "results.json", tmp_path / "again", target_accuracy=0.05)
    assert again["target_accuracy"] == 0.05 and again["runs"] == saved["runs"]
    assert again["eval_set"] == saved["eval_set"] and (tmp_path / "again" / "fig2.png").exists()
    assert "| efficiency ratio" in (tmp_path / "exp" / "results.md").read_text()


def test_present_classes_only_restricts_the_candidates_to_the_held_out_classes():
    from clipforge.data.builtin import builtin_dataset_info, builtin_dataset_path
    from clipforge.experiments.objectives import load_zero_shot_set

    held = builtin_dataset_info()["sources"]["emoji"]["heldout"]
    root = str(builtin_dataset_path("emoji"))
    full = load_zero_shot_set(root, split="test_heldout", label_field=held["field"], max_images=40)
    assert len(full.classnames) == 99 and full.chance_for("mean_per_class") == pytest.approx(1 / 99)
    only = load_zero_shot_set(
        root, split="test_heldout", label_field=held["field"], max_images=40, present_only=True
    )
    present = sorted(set(full.labels.tolist()))
    assert list(only.classnames) == [full.classnames[c] for c in present]
    assert set(only.classnames) <= set(held["classes"])
    assert [only.classnames[c] for c in only.labels] == [full.classnames[c] for c in full.labels]
