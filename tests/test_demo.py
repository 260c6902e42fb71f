"""The main job on a short budget (`clipforge demo --quick`, about a minute): the same pipeline as `make demo`,
checked for a complete report with numbers in range."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from clipforge.cli import main


def test_quick_demo_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    report = json.loads((out / "report.json").read_text())

    def fraction(x):
        return isinstance(x, float) and math.isfinite(x) and 0.0 <= x <= 1.0

    for source in ("openclipart", "emoji"):
        zs = report["zero_shot_heldout_classes"][source]
        assert fraction(zs["top1_single"]) and fraction(zs["top1_ensemble"]) and fraction(zs["chance"])
        assert fraction(zs["mean_per_class_single"]) and fraction(zs["mean_per_class_ensemble"])
        assert zs["uniform_chance"] == pytest.approx(1 / len(zs["classes"]))
        assert len(zs["classes"]) == 5 and zs["images"] > 100
        assert set(report["held_out"][source]["classes"]) == set(zs["classes"])
        assert fraction(report["zero_shot_seen_classes"][source]["top1"])
        assert fraction(report["linear_probe"][source]["test_accuracy"])
        assert fraction(report["retrieval"][source]["image_to_text_R@1"])
        assert fraction(report["retrieval"][source]["text_to_image_R@5"])
    digits = report["digits"]
    assert digits["pixel_baseline"] > 0.9  # logistic regression on raw pixels: the paper's MNIST remark
    assert fraction(digits["zero_shot_clip"]) and fraction(digits["linear_probe_clip"])
    assert report["training"]["steps"] == 12 and len(report["zero_shot_over_training"]) == 2
    markdown = (out / "report.md").read_text()
    for heading in ("Zero-shot on classes never seen in training", "Seen classes, unseen images", "Retrieval",
                    "Handwritten digits", "chance"):  # fmt: skip
        assert heading in markdown, heading
    for png in ("loss.png", "zeroshot_over_training.png", "confusion_heldout.png", "retrieval_montage.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.size[0] > 200, png
