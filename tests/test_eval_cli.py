"""`clipforge eval ...` end to end on small real-image data (scikit-learn's digits): every sub-command writes
results.json / results.md (zero-shot also confusion.png, overlap overlap.png) with numbers that check out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.cli import main
from clipforge.data.shards import ShardWriter
from tests.datasets import NUMBER_WORDS, caption, digit_images, png_bytes

N_TRAIN, N_TEST = 200, 100


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """tree/{train,test}/<digit>/*.png, shards/{train,test}/ + classes.json, table/data.csv (2 captions each)."""
    root = tmp_path_factory.mktemp("evaldata")
    images, labels = digit_images(N_TRAIN + N_TEST)
    splits = {"train": range(N_TRAIN), "test": range(N_TRAIN, N_TRAIN + N_TEST)}
    for split, indices in splits.items():
        for i in indices:
            folder = root / "tree" / split / NUMBER_WORDS[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            images[i].save(folder / f"{i:04d}.png")
        with ShardWriter(root / "shards" / split, max_samples=40) as writer:
            for i in indices:
                extra = {"label": labels[i], "class": NUMBER_WORDS[labels[i]]}
                writer.write(f"{i:06d}", png_bytes(images[i]), "png", caption(labels[i], i), extra)
    (root / "shards" / "classes.json").write_text(json.dumps({"label": NUMBER_WORDS}))
    table = root / "table"
    table.mkdir()
    with open(table / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for i in splits["test"]:
            images[i].save(table / f"{i}.png")
            writer.writerow([f"{i}.png", f"{caption(labels[i], i)}|image number {i}"])
    return root


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["eval", *args, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _results(out: Path) -> dict:
    assert (out / "results.md").is_file()
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_zeroshot_cli_matches_the_library(data, tmp_path, capsys):
    from clipforge.eval import (
        build_classifier,
        classify_features,
        encode_images,
        get_templates,
        open_eval_dataset,
    )

    torch.manual_seed(3)
    model = clipforge.create_model("tiny").eval()
    checkpoint = clipforge.save_checkpoint(model, tmp_path / "tiny.safetensors")
    out = tmp_path / "zs"
    code, stdout, _ = _run(["zeroshot", "--model", str(checkpoint), "--data", str(data / "shards"), "--split",
                            "test", "--single-template", "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
                           capsys)  # fmt: skip
    assert code == 0 and f"results: {out / 'results.json'}" in stdout
    results = _results(out)
    assert results["task"] == "zeroshot" and results["checkpoint"]["random_weights"] is False
    assert results["checkpoint"]["path"] == str(checkpoint.resolve())
    assert results["datasets"]["data"]["num_samples"] == N_TEST and results["skipped"] == {"data": {}}
    zeroshot = results["details"]["zeroshot"]
    assert np.array(zeroshot["confusion"]).sum() == N_TEST and zeroshot["classnames"] == NUMBER_WORDS
    # The same numbers from the library.
    dataset = open_eval_dataset(data / "shards", split="test")
    encoded = encode_images(model, dataset, progress=False)
    templates = get_templates("generic").templates
    classifier = build_classifier(model, clipforge.get_tokenizer(model), NUMBER_WORDS, templates)
    expected = classify_features(encoded.features, encoded.labels, classifier)
    assert results["metrics"]["top1"] == expected.top1 and results["metrics"]["top5"] == expected.top5
    assert zeroshot["confusion"] == expected.confusion.tolist()
    single_classifier = build_classifier(model, clipforge.get_tokenizer(model), NUMBER_WORDS, templates[:1])
    single = classify_features(encoded.features, encoded.labels, single_classifier)
    assert results["metrics"]["single_template_top1"] == single.top1
    assert results["metrics"]["ensemble_gain_top1"] == pytest.approx(expected.top1 - single.top1)
    with Image.open(out / "confusion.png") as png:
        assert png.format == "PNG" and png.width > 300
    markdown = (out / "results.md").read_text()
    assert "| top1 |" in markdown and "## Per-class recall" in markdown
    # A second run reads the cached features.
    code, _, _ = _run(["zeroshot", "--model", str(checkpoint), "--data", str(data / "shards"), "--split", "test",
                       "--out", str(tmp_path / "zs2"), "--cache-dir", str(tmp_path / "cache")], capsys)  # fmt: skip
    assert code == 0 and _results(tmp_path / "zs2")["metrics"]["top1"] == expected.top1


def test_zeroshot_cli_on_class_folders_with_random_weights(data, tmp_path, capsys):
    out = tmp_path / "zs"
    code, _, _ = _run(["zeroshot", "--model", "tiny", "--data", str(data / "tree" / "test"), "--templates",
                       "mnist", "--max-samples", "30", "--out", str(out), "--no-cache"], capsys)  # fmt: skip
    assert code == 0
    results = _results(out)
    assert results["checkpoint"]["random_weights"] is True
    assert "**Random weights**" in (out / "results.md").read_text()
    assert results["metrics"]["num_samples"] == 30
    assert results["details"]["templates"]["templates"] == ['a photo of the number: "{}".']
    assert 0.0 <= results["metrics"]["top1"] <= results["metrics"]["top5"] <= 1.0


@pytest.mark.slow
def test_linear_probe_and_few_shot_cli(data, tmp_path, capsys):
    out = tmp_path / "probe"
    # The paper's full C search (15 fits); --max-samples and --max-iter keep it to seconds here.
    code, stdout, _ = _run(["linear-probe", "--model", "tiny", "--data", str(data / "tree"), "--out", str(out),
                            "--no-cache", "--max-samples", "100", "--max-iter", "100"], capsys)  # fmt: skip
    assert code == 0 and "linear probe: test top-1" in stdout
    results = _results(out)
    probe = results["details"]["probe"]
    assert probe["num_train"] + probe["num_val"] == 100 and probe["num_test"] == 100  # class-balanced subsets
    assert 0.3 < results["metrics"]["test_accuracy"] <= 1.0  # random-weight features still beat chance (0.1)
    assert set(results["datasets"]) == {"train", "test"}
    out = tmp_path / "few"
    code, stdout, _ = _run(["linear-probe", "--model", "tiny", "--data", str(data / "shards"), "--few-shot", "1",
                            "--seeds", "0", "1", "--max-iter", "100", "--out", str(out), "--no-cache"], capsys)  # fmt: skip
    assert code == 0 and "1-shot linear probe" in stdout  # 1-shot: a fixed C, no search (fast)
    few = _results(out)["details"]["probe"]
    assert few["k"] == 1 and [run["seed"] for run in few["runs"]] == [0, 1]


@pytest.mark.slow
def test_retrieval_cli_with_two_captions_per_image(data, tmp_path, capsys):
    out = tmp_path / "retrieval"
    code, stdout, _ = _run(["retrieval", "--model", "tiny", "--data", str(data / "table" / "data.csv"),
                            "--caption-separator", "|", "--out", str(out), "--no-cache"], capsys)  # fmt: skip
    assert code == 0 and "image->text: R@1" in stdout
    metrics = _results(out)["metrics"]
    assert metrics["num_images"] == N_TEST and metrics["num_captions"] == 2 * N_TEST
    for direction in ("image_to_text", "text_to_image"):
        recalls = [metrics[f"{direction}_R@{k}"] for k in (1, 5, 10)]
        assert 0.0 <= recalls[0] <= recalls[1] <= recalls[2] <= 1.0
        assert metrics[f"{direction}_median_rank"] >= 1.0


def test_pixels_cli_learns_digits(data, tmp_path, capsys):
    out = tmp_path / "pixels"
    code, stdout, _ = _run(["pixels", "--data", str(data / "tree"), "--size", "8", "--grayscale", "--out",
                            str(out)], capsys)  # fmt: skip
    assert code == 0 and "raw-pixel logistic regression (8x8)" in stdout
    results = _results(out)
    assert results["metrics"]["test_accuracy"] > 0.8  # the paper's point: raw pixels do well on digits
    assert results["details"]["probe"]["num_test"] == N_TEST


@pytest.mark.slow
def test_overlap_cli_finds_the_copies(data, tmp_path, capsys):
    out = tmp_path / "overlap"
    # The test shards hold exactly the test tree's images: every eval image has a copy in "training".
    code, stdout, _ = _run(["overlap", "--model", "tiny", "--data", str(data / "tree" / "test"), "--train-data",
                            str(data / "shards" / "test"), "--top", "8", "--out", str(out)], capsys)  # fmt: skip
    assert code == 0 and f"{N_TEST} of {N_TEST} eval images" in stdout
    results = _results(out)
    assert results["metrics"]["duplicates_by_hash"] == N_TEST and results["metrics"]["fraction_either"] == 1.0
    closest = results["details"]["overlap"]["closest_by_hash"]
    assert all(pair["hash_distance"] == 0 for pair in closest)
    with Image.open(out / "overlap.png") as png:
        assert png.format == "PNG"


def test_cli_errors_exit_2_with_a_clear_message(data, tmp_path, capsys):
    cases = [
        (["zeroshot", "--model", "tiny", "--data", str(data / "shards")], "pick one with split="),
        (
            ["zeroshot", "--model", "no-such-model", "--data", str(data / "tree" / "test")],
            "not a registered model name",
        ),
        (["zeroshot", "--model", "tiny", "--data", str(data / "table" / "data.csv")], "--classnames FILE"),
        (["zeroshot", "--model", "tiny", "--data", str(tmp_path / "missing")], "no such file or directory"),
        (["linear-probe", "--model", "tiny", "--train-data", str(data / "tree" / "train")], "no test data"),
        (["overlap", "--model", "tiny", "--data", str(data / "tree" / "test")], "pass --train-data"),
    ]
    bad_templates = tmp_path / "bad.txt"
    bad_templates.write_text("no placeholder here\n")
    cases.append((["zeroshot", "--model", "tiny", "--data", str(data / "tree" / "test"), "--templates",
                   str(bad_templates)], "has no '{}' or '{c}' placeholder"))  # fmt: skip
    for args, message in cases:
        code, _, err = _run([*args, "--out", str(tmp_path / "never")], capsys)
        assert code == 2, args
        assert message in err, (args, err)
    assert not (tmp_path / "never").exists()


def test_single_template_default_is_the_papers_baseline_prompt():
    from clipforge.cli.eval import _default_single_template
    from clipforge.eval import get_templates

    assert get_templates("imagenet").templates[0] == "a bad photo of a {}."
    assert _default_single_template(get_templates("imagenet").templates) == "a photo of a {}."
    assert _default_single_template(get_templates("mnist").templates) == 'a photo of the number: "{}".'
