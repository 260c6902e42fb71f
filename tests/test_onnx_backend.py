"""`--backend onnxruntime` (issue 14, item 4): embed, classify and search with an ONNX export give the PyTorch
model's answers (fp32, |Δ| ≤ 1e-4), with their own cache identity; and the errors name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.export.manifest import ExportError
from clipforge.export.onnx import export_onnx
from clipforge.features import model_fingerprint
from clipforge.inference import find_images, load_model, read_embeddings
from tests.test_use_cli import LABELS, _direct_image_features, _direct_probs, _hits, _picture

CHECKPOINT_SCALE = 37.0  # the logit scale tests.test_use_cli's _direct_probs assumes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    model = clipforge.create_model("tiny")
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(CHECKPOINT_SCALE)))
    return clipforge.save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def model(checkpoint):
    return clipforge.load_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for seed in range(5):
        _picture(seed).save(root / f"{seed}.png")
    return root


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    return export_onnx(str(checkpoint), tmp_path_factory.mktemp("onnx") / "tiny").folder


def test_embed_with_onnxruntime_equals_pytorch(exported, model, folder, tmp_path):
    out = tmp_path / "emb.npy"
    args = [
        "embed",
        "--model",
        str(exported),
        "--backend",
        "onnxruntime",
        "--images",
        str(folder),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    keys, array = read_embeddings(out)
    paths = find_images([folder])
    assert keys == [str(p) for p in paths]
    np.testing.assert_allclose(array, _direct_image_features(model, paths).numpy(), atol=1e-4)

    texts = tmp_path / "texts.npy"
    assert main(["embed", "--model", str(exported), "--backend", "onnxruntime", "--texts", *LABELS,
                 "--out", str(texts)]) == 0  # fmt: skip
    tokens = clipforge.get_tokenizer(model)(LABELS)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    np.testing.assert_allclose(read_embeddings(texts)[1], expected.numpy(), atol=1e-4)


def test_classify_with_onnxruntime_gives_the_models_probabilities(exported, model, folder, capsys):
    assert main(["classify", str(folder), "--model", str(exported), "--backend", "onnxruntime", "--labels",
                 ",".join(LABELS), "--template", "a photo of {}.", "--json", "--top-k", "4"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    good = [Path(r["image"]) for r in report["results"]]
    assert len(good) == 5
    expected = _direct_probs(model, good, [f"a photo of {label}." for label in LABELS])
    for result, row in zip(report["results"], expected):
        got = {entry["label"]: entry["prob"] for entry in result["top"]}
        np.testing.assert_allclose([got[label] for label in LABELS], row, atol=1e-4)


def test_search_with_onnxruntime_ranks_as_pytorch_with_its_own_cache_identity(
    exported, checkpoint, folder, tmp_path, capsys
):
    results = {}
    for backend, spec in (("torch", checkpoint), ("onnxruntime", exported)):
        assert main(["search", "a red square", "--images", str(folder), "--model", str(spec), "--backend", backend,
                     "--cache", str(tmp_path / "cache.npz"), "--top-k", "5"]) == 0  # fmt: skip
        output = capsys.readouterr().out
        assert "0 from cache, 5 encoded" in output.splitlines()[0]  # the other backend's rows are not reused
        results[backend] = _hits(output)
    assert [key for key, _ in results["onnxruntime"]] == [key for key, _ in results["torch"]]
    assert [s for _, s in results["onnxruntime"]] == pytest.approx([s for _, s in results["torch"]], abs=1e-4)
    onnx_model = load_model(exported, backend="onnxruntime")
    assert model_fingerprint(onnx_model) != model_fingerprint(load_model(checkpoint))
    assert model_fingerprint(onnx_model) == model_fingerprint(load_model(exported, backend="onnxruntime"))


def test_backend_errors_name_the_fix(exported, checkpoint, tmp_path, capsys):
    code = main(["embed", "--model", str(checkpoint), "--backend", "onnxruntime", "--texts", "a", "--out",
                 str(tmp_path / "x.npy")])  # fmt: skip
    assert code == 2
    assert "needs a folder written by `clipforge export onnx`" in capsys.readouterr().err
    with pytest.raises(ExportError, match="runs on the CPU, not cuda"):
        load_model(exported, backend="onnxruntime", device="cuda")
    with pytest.raises(ValueError, match=r"backend must be one of \['torch', 'onnxruntime'\]"):
        load_model(exported, backend="tensorrt")
    with pytest.raises(ExportError, match="runs inference only"):
        load_model(exported, backend="onnxruntime").train()


def test_an_index_built_on_onnxruntime_is_searched_with_it_and_refuses_pytorch(
    exported, checkpoint, folder, tmp_path, capsys
):
    index = tmp_path / "photos.index"
    assert main(["index", "build", str(folder), "--model", str(exported), "--backend", "onnxruntime",
                 "--out", str(index), "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["index", "search", str(index), "--text", "a red square", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits["hits"]) == 3  # the build's model (the export folder) is found and run on onnxruntime
    assert main(["index", "search", str(index), "--text", "a red square", "--model", str(checkpoint)]) == 2
    assert "was built with model 'tiny' (weights" in capsys.readouterr().err  # not the index's features
