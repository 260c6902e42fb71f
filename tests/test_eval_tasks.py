"""Evaluations as tasks (`clipforge.eval.tasks`): each registered task gives the numbers of the direct library
calls on real digit scans; a YAML list of two tasks runs through `clipforge eval run`; unknown tasks and bad
settings fail with a ConfigError naming the entry, the setting and what is expected."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.config import ConfigError
from clipforge.eval import encode_images, open_eval_dataset
from clipforge.eval.tasks import TASKS, get_task, make_settings, run_tasks
from tests.datasets import NUMBER_WORDS, caption, digit_images

N_TRAIN, N_TEST = 60, 40


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """tree/{train,test}/<digit>/*.png and table/data.csv (the test images, two captions each)."""
    root = tmp_path_factory.mktemp("taskdata")
    images, labels = digit_images(N_TRAIN + N_TEST)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / "tree" / ("train" if i < N_TRAIN else "test") / NUMBER_WORDS[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.png")
    (root / "table").mkdir()
    with open(root / "table" / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for i in range(N_TRAIN, N_TRAIN + N_TEST):
            images[i].save(root / "table" / f"{i}.png")
            writer.writerow([f"{i}.png", f"{caption(labels[i], i)}|image number {i}"])
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(5)
    return clipforge.create_model("tiny").eval()


def _settings(name: str, **values):
    return make_settings(get_task(name), {"quiet": True, **values}, "test")


def test_registry_names_the_five_tasks():
    assert sorted(TASKS) == ["linear_probe", "overlap", "pixels", "retrieval", "zeroshot"]
    assert get_task("linear-probe") is TASKS["linear_probe"]  # the CLI's spelling


def test_zeroshot_task_matches_the_library(data, model, tmp_path):
    from clipforge.eval import build_classifier, classify_features, get_templates

    settings = _settings("zeroshot", no_cache=True, templates="mnist", single_template="")
    result = get_task("zeroshot").run(model, data / "tree" / "test", settings, out=tmp_path)
    encoded = encode_images(model, open_eval_dataset(data / "tree" / "test"), progress=False)
    names = open_eval_dataset(data / "tree" / "test").classnames
    templates = get_templates("mnist").templates
    classifier = build_classifier(model, clipforge.get_tokenizer(model), names, templates)
    expected = classify_features(encoded.features, encoded.labels, classifier)
    assert result.metrics["top1"] == expected.top1 and result.metrics["top5"] == expected.top5
    assert result.details["zeroshot"]["confusion"] == expected.confusion.tolist()
    assert result.metrics["num_samples"] == N_TEST and result.metrics["single_template_top1"] == expected.top1
    assert result.figures == [tmp_path / "confusion.png"] and result.figures[0].is_file()


def test_linear_probe_task_matches_the_library(data, model):
    from clipforge.eval.linear_probe import few_shot, linear_probe

    encoded = {s: encode_images(model, open_eval_dataset(data / "tree", split=s), progress=False)
               for s in ("train", "test")}  # fmt: skip
    args = (
        encoded["train"].features,
        encoded["train"].labels,
        encoded["test"].features,
        encoded["test"].labels,
    )
    result = get_task("linear_probe").run(
        model, data / "tree", _settings("linear_probe", no_cache=True, max_iter=50)
    )
    expected = linear_probe(*args, seed=0, max_iter=50)
    assert result.metrics["test_accuracy"] == expected.test_accuracy and result.metrics["c"] == expected.c
    assert set(result.datasets) == {"train", "test"}
    # Already-encoded features are accepted as the data (a caller can share one encoding between tasks).
    few = get_task("linear_probe").run(
        model, {"train": encoded["train"], "test": encoded["test"]},
        _settings("linear_probe", few_shot=2, seeds=[0, 1], max_iter=50),
    )  # fmt: skip
    expected_few = few_shot(*args, k=2, seeds=(0, 1), max_iter=50)
    assert few.metrics["mean_accuracy"] == expected_few.mean_accuracy and few.metrics["k"] == 2


def test_retrieval_task_matches_the_library(data, model):
    from clipforge.eval import encode_texts, retrieval_metrics

    settings = _settings("retrieval", no_cache=True, caption_separator="|", ks=[1, 5])
    result = get_task("retrieval").run(model, data / "table" / "data.csv", settings)
    dataset = open_eval_dataset(data / "table" / "data.csv", caption_separator="|")
    encoded = encode_images(model, dataset, progress=False)
    texts = [c for captions in encoded.captions for c in captions]
    owners = np.array([i for i, captions in enumerate(encoded.captions) for _ in captions])
    text_features = encode_texts(model, clipforge.get_tokenizer(model), texts)
    expected = retrieval_metrics(encoded.features, text_features, owners, ks=(1, 5))
    assert {k: result.metrics[k] for k in expected} == expected
    assert result.metrics["num_images"] == N_TEST and result.metrics["num_captions"] == 2 * N_TEST
    assert result.lines[0].startswith("image->text: R@1 ")


def test_pixels_task_matches_pixel_baseline(data):
    from clipforge.eval import pixel_baseline

    result = get_task("pixels").run(
        None, data / "tree", _settings("pixels", size=8, grayscale=True, max_iter=200)
    )
    splits = {s: list(open_eval_dataset(data / "tree", split=s)) for s in ("train", "test")}
    expected = pixel_baseline([s.image for s in splits["train"]], [s.label for s in splits["train"]],
                              [s.image for s in splits["test"]], [s.label for s in splits["test"]],
                              size=8, grayscale=True, max_iter=200)  # fmt: skip
    assert result.metrics["test_accuracy"] == expected.test_accuracy and result.metrics["c"] == expected.c
    assert result.checkpoint == {"spec": "raw pixels 8x8 grey"}


def test_overlap_task_matches_analyze_overlap(data, model, tmp_path):
    from clipforge.eval.overlap import analyze_overlap
    from clipforge.eval.tasks.matching import _embedder

    roles = {"eval": data / "tree" / "test", "train": data / "table" / "data.csv"}  # the same 40 images
    result = get_task("overlap").run(model, roles, _settings("overlap", top=4), out=tmp_path)
    expected, _, _ = analyze_overlap(((s.key, s.image) for s in open_eval_dataset(roles["eval"])),
                                     ((s.key, s.image) for s in open_eval_dataset(roles["train"])),
                                     _embedder(model, "fp32"), progress=False)  # fmt: skip
    assert result.metrics["duplicates_by_hash"] == expected.duplicates_by_hash == N_TEST
    assert result.metrics["duplicates_either"] == expected.duplicates_either
    assert result.figures == [tmp_path / "overlap.png"] and result.figures[0].is_file()


def test_eval_run_runs_a_yaml_list_of_two_tasks(data, model, tmp_path, capsys):
    checkpoint = clipforge.save_checkpoint(model, tmp_path / "tiny.safetensors")
    config = tmp_path / "evals.yaml"
    config.write_text(
        f"evals:\n"
        f"  - task: zeroshot\n    data: {data / 'tree' / 'test'}\n    templates: mnist\n    no_cache: true\n"
        f"    quiet: true\n"
        f"  - task: pixels\n    data: {data / 'tree'}\n    size: 8\n    grayscale: true\n    max_iter: 200\n"
        f"    quiet: true\n"
    )
    out = tmp_path / "run"
    assert main(["eval", "run", "--config", str(config), "--model", str(checkpoint), "--out", str(out)]) == 0
    assert f"results: {out / 'results.json'}" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert list(results["tasks"]) == ["zeroshot", "pixels"]
    assert results["checkpoint"]["path"] == str(checkpoint.resolve())
    direct = get_task("zeroshot").run(model, data / "tree" / "test", _settings("zeroshot", templates="mnist",
                                                                              no_cache=True))  # fmt: skip
    assert results["tasks"]["zeroshot"]["metrics"]["top1"] == direct.metrics["top1"]
    assert results["tasks"]["zeroshot"]["settings"]["templates"] == "mnist"
    assert results["tasks"]["pixels"]["metrics"]["test_accuracy"] > 0.5
    assert (out / "zeroshot" / "confusion.png").is_file()


def test_unknown_task_and_bad_settings_are_config_errors(data, model, tmp_path, capsys):
    with pytest.raises(
        ConfigError, match=r"unknown evaluation task 'zero-shot'; known tasks: linear_probe, "
    ):
        get_task("zero-shot")
    with pytest.raises(ConfigError, match=r"evals.yaml: evaluation 1: unknown setting\(s\) \['tempates'\] for "
                                          r"task 'zeroshot'; known: \["):  # fmt: skip
        run_tasks(
            model, [{"task": "zeroshot", "data": "x", "tempates": "mnist"}], tmp_path, where="evals.yaml"
        )
    with pytest.raises(ConfigError, match=r"evaluation 2: setting 'size' of task 'pixels' is 'big' \(str\); "
                                          r"expected int"):  # fmt: skip
        run_tasks(
            model, [{"task": "pixels", "data": "x"}, {"task": "pixels", "data": "x", "size": "big"}], tmp_path
        )
    with pytest.raises(ConfigError, match=r"evaluation 1 \(retrieval\): no 'data'"):
        run_tasks(model, [{"task": "retrieval"}], tmp_path)
    with pytest.raises(ConfigError, match=r"'seeds' of task 'linear-probe' is \[0, 'a'\] \(list\); expected a list "
                                          r"of int"):  # fmt: skip
        make_settings(get_task("linear_probe"), {"seeds": [0, "a"]}, "here")
    assert not any(tmp_path.iterdir())  # nothing ran: every spec is checked first
    bad = tmp_path / "bad.yaml"
    bad.write_text("- task: nope\n  data: x\n")
    code = main(["eval", "run", "--config", str(bad), "--model", "tiny", "--out", str(tmp_path / "never")])
    assert code == 2 and "unknown evaluation task 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
