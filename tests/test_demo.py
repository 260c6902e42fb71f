"""The main job on a short budget (`clipforge demo --quick`): the same pipeline as `make demo` — pip datasets built
into a cache, both models trained, every evaluation — checked for a complete report with numbers in range, and
for a LiT model that has learned (clearly above chance in and out of its training distribution)."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from clipforge.cli import main


def fraction(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and 0.0 <= x <= 1.0


def interval(x) -> bool:
    return fraction(x["value"]) and x["low"] <= x["value"] <= x["high"]


def _lit_learned(lit: dict) -> None:
    """The LiT model learns in the quick run's 12 steps (its pretrained towers are locked; the two projections
    train): loss below the chance level log(batch), in-distribution retrieval and zero-shot above chance.

    Measured (2026-12, 64 px): final loss 2.94 against log(32) = 3.47; text->image R@1 over the five training
    sources' test splits 64 hits of 4,669 captions against 14.2 expected by chance (4.5x); zero-shot mean
    per-class 0.18 (style shift, chance 0.111) and 0.097 (held-out concepts, chance 0.043). The bounds are about
    half of each margin. (The scratch model learns nothing measurable in 12 steps: it checks the pipeline only.)
    """
    training = lit["training"]
    assert training["final_loss"] < math.log(training["batch_size"]) - 0.25
    hits = sum(r["text_to_image_R@1"] * r["captions"] for r in lit["retrieval"].values())
    chance_hits = sum(r["captions"] / r["images"] for r in lit["retrieval"].values())
    assert hits >= 2.5 * chance_hits, (hits, chance_hits)
    for name, z in lit["zero_shot"].items():
        assert z["ensemble"]["mean_per_class"]["value"] >= 1.25 * z["chance_mean_per_class"], name


@pytest.mark.slow
def test_quick_demo_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    report = json.loads((out / "report.json").read_text())
    assert sum(report["data"]["train_pairs"].values()) > 12_000
    sets = report["data"]["eval_sets"]
    assert set(sets) == {"style_shift", "heldout_concepts"}
    assert all(s["images"] >= 1000 and s["classes"] >= 9 for s in sets.values())
    assert set(report["models"]) == {"scratch", "lit"}
    for kind, model in report["models"].items():
        assert model["training"]["steps"] == 12, kind
        for name in sets:
            z = model["zero_shot"][name]
            assert z["chance_mean_per_class"] == pytest.approx(1 / len(z["classes"]))
            for mode in ("single", "ensemble"):
                assert interval(z[mode]["mean_per_class"]) and interval(z[mode]["top1"])
            difference = z["ensemble_minus_single"]
            assert difference["low"] <= difference["value"] <= difference["high"]
        for source, r in model["retrieval"].items():
            assert fraction(r["text_to_image_R@1"]) and interval(r["text_to_image_R@1_interval"]), source
        for source, p in model["linear_probe"].items():
            assert interval(p["interval"]), source
        assert model["digits"]["pixel_baseline"] > 0.9  # the paper's MNIST remark
        assert len(model["zero_shot_over_training"]) == 2
    assert report["models"]["lit"]["training"]["lock"] == {"text": True, "image": True}
    _lit_learned(report["models"]["lit"])
    markdown = (out / "report.md").read_text()
    for heading in ("Zero-shot on data never trained on", "Retrieval", "linear probe", "Handwritten digits",
                    "chance", "ensemble − single"):  # fmt: skip
        assert heading in markdown, heading
    pngs = ["zeroshot_over_training.png"] + [f"{p}_{k}.png" for k in ("scratch", "lit")
                                             for p in ("loss", "confusion_heldout", "retrieval_montage")]  # fmt: skip
    for png in pngs:
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.size[0] > 200, png
