"""The in-memory zero-shot set: known answers with a toy model (single prompt vs ensemble), intervals, the
hook, and loading a real labelled split with class selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.eval.zeroshot_set import ZeroShotSet, load_zero_shot_set
from tests.test_eval_zeroshot import _toy

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def colour_transform(image: Image.Image) -> torch.Tensor:
    """A 'transform' that turns a solid-colour image into its RGB vector (the toy model's image feature)."""
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32) / 255


def toy_set() -> ZeroShotSet:
    # 4 red, 3 green, 3 blue images; the last blue one is really purple-ish, nearer red than blue.
    pixels = [COLOURS["red"]] * 4 + [COLOURS["green"]] * 3 + [COLOURS["blue"]] * 2 + [(200, 0, 150)]
    images = [Image.new("RGB", (2, 2), p) for p in pixels]
    labels = np.array([0] * 4 + [1] * 3 + [2] * 3)
    return ZeroShotSet("toy", images, labels, ("red", "green", "blue"), ("{} x", "{} y"), kind="test")


def test_single_prompt_and_ensemble_known_answers():
    # "x" prompts point at the colour axes; the "y" prompt of green points at blue, so the ensemble's green
    # column is (green + blue) / |.| and the purple image still goes to red in both modes.
    model, tokenizer = _toy({
        "red x": [1, 0, 0], "green x": [0, 1, 0], "blue x": [0, 0, 1],
        "red y": [1, 0, 0], "green y": [0, 0, 1], "blue y": [0, 0, 1],
    })  # fmt: skip
    data = toy_set()
    scores = data.evaluate(model, transform=colour_transform, tokenizer=tokenizer)
    single, ensemble = scores["single"], scores["ensemble"]
    np.testing.assert_array_equal(single.predictions, [0, 0, 0, 0, 1, 1, 1, 2, 2, 0])
    assert single.top1.value == pytest.approx(9 / 10)
    assert single.mean_per_class.value == pytest.approx((1 + 1 + 2 / 3) / 3)
    # Ensemble: blue images score blue 1.0 vs green 0.707 -> still blue; green images: green 0.707 vs blue 0 ->
    # green. Same predictions here.
    np.testing.assert_array_equal(ensemble.predictions, single.predictions)
    assert ensemble.confusion.tolist() == [[4, 0, 0], [0, 3, 0], [1, 0, 2]]
    assert single.mean_per_class.low < single.mean_per_class.value < single.mean_per_class.high
    report = data.report(model, transform=colour_transform, tokenizer=tokenizer)
    assert report["chance_mean_per_class"] == pytest.approx(1 / 3) and report["chance_top1"] == pytest.approx(
        0.4
    )
    assert report["ensemble_minus_single"]["value"] == 0.0
    assert report["class_counts"] == {"red": 4, "green": 3, "blue": 3}


def test_ensemble_can_change_the_answer():
    model, tokenizer = _toy({
        "red x": [1, 0, 0], "green x": [0, 1, 0], "blue x": [0, 0, 1],
        "red y": [0, 1, 0], "green y": [0, 1, 0], "blue y": [0, 0, 1],
    })  # fmt: skip
    # red's ensemble column = (1, 1, 0)/sqrt2: green images now score 0.707 red vs 1.0 green (still green),
    # red images 0.707 red vs 0 -> still red. The purple image (0.78, 0, 0.59)/|.| scores red 0.55, blue 0.59:
    # the ensemble calls it blue, so blue recall rises to 1.
    data = toy_set()
    scores = data.evaluate(model, transform=colour_transform, tokenizer=tokenizer)
    assert scores["single"].predictions[-1] == 0 and scores["ensemble"].predictions[-1] == 2
    report = data.report(model, transform=colour_transform, tokenizer=tokenizer)
    assert report["ensemble_minus_single"]["value"] == pytest.approx(1 / 9)


def test_hook_reports_each_set(monkeypatch):
    from clipforge.eval.hook import zero_shot_hook

    model, tokenizer = _toy({"red x": [1, 0, 0], "green x": [0, 1, 0], "blue x": [0, 0, 1],
                             "red y": [1, 0, 0], "green y": [0, 1, 0], "blue y": [0, 0, 1]})  # fmt: skip
    data = toy_set()
    monkeypatch.setattr("clipforge.transforms.get_transforms", lambda m: colour_transform)
    monkeypatch.setattr("clipforge.tokenizer.get_tokenizer", lambda m: tokenizer)
    hook = zero_shot_hook([data])
    record = hook(type("Context", (), {"model": model})())
    assert record == {"zeroshot_toy": pytest.approx((1 + 1 + 2 / 3) / 3)}


def test_load_keeps_and_renumbers_classes():
    from clipforge.data.builtin import builtin_dataset_info, builtin_dataset_path

    held = builtin_dataset_info()["sources"]["emoji"]["heldout"]
    data = load_zero_shot_set(
        builtin_dataset_path("emoji"), split="test_heldout", label_field=held["field"],
        keep_classes=held["indices"], templates=("an emoji of {}.",),
    )  # fmt: skip
    assert len(data) == 146 and data.classnames == tuple(held["classes"])
    assert sorted(set(data.labels.tolist())) == list(range(len(held["classes"])))
    with pytest.raises(ValueError, match="2 class names for 5 kept classes"):
        load_zero_shot_set(builtin_dataset_path("emoji"), split="test_heldout", label_field=held["field"],
                           keep_classes=held["indices"], classnames=["a", "b"])  # fmt: skip
