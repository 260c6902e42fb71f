"""ONNX export (``clipforge export onnx``): both towers of each named architecture in onnxruntime equal the PyTorch
model (fp32 max |Δ| ≤ 1e-4, fast paths on and off, batch sizes other than the traced one, real captions of
different lengths and one at full context), ``export.json``, the CLI and its errors, and :class:`OnnxCLIP`."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.config import config_from_dict
from clipforge.export.manifest import IMAGE_FILE, MANIFEST_FILE, TEXT_FILE, ExportError, sha256_file
from clipforge.export.onnx import _check_inputs, export_onnx
from clipforge.export.runtime import OnnxCLIP
from clipforge.inference import RandomWeightsWarning, load_model
from tests.conftest import locked_import, random_images, randomize_batchnorm

onnx = locked_import("onnx")
ort = locked_import("onnxruntime")

TOL = 1e-4
# Real captions of different lengths (and scripts); the last is longer than any context, so it is cut to exactly
# the context length with the end token last.
CAPTIONS = [
    "a photo of a dog",
    "A red and white anemone flower.",
    "un chat noir assis sur une chaise en bois",
    "猫の写真",
    "the flag of Japan",
    "a cup of coffee on a wooden table next to an open book and a pair of reading glasses",
    " ".join(["a long caption about a bicycle leaning against a brick wall in the afternoon sun"] * 6),
]


def _model(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = load_model(name)
    if model.config.vision.arch == "resnet":  # random init leaves BatchNorm the identity: give it real work
        randomize_batchnorm(model.visual)
    return model


def _tokens(model, captions) -> torch.Tensor:
    return clipforge.get_tokenizer(model, on_overflow="truncate")(captions)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    model = _model("tiny")
    result = export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny")
    return model, result


def _check_parity(model, folder) -> None:
    runtime = OnnxCLIP(folder)
    size = model.config.vision.image_size
    context = model.config.text.context_length
    text_graph = ort.InferenceSession(str(folder / TEXT_FILE), providers=["CPUExecutionProvider"])
    for batch, captions in ((1, CAPTIONS[-1:]), (3, CAPTIONS[:3]), (len(CAPTIONS), CAPTIONS)):
        images = random_images(batch, size, seed=batch)
        tokens = _tokens(model, captions)
        assert tokens.shape == (batch, context)
        if batch > 1:
            assert len(set((tokens.argmax(-1) + 1).tolist())) > 1  # texts of different lengths
        if captions[-1] == CAPTIONS[-1]:
            assert int(tokens[-1].argmax()) == context - 1  # one text at full context length
        got_image, got_text = runtime.encode_image(images), runtime.encode_text(tokens)
        # The raw graph on the padded batch (no cut to the longest text): the static computation itself.
        (padded,) = text_graph.run(None, {"tokens": tokens.numpy()})
        for fast in (True, False):
            with torch.no_grad(), clipforge.fast_paths(fast):
                want_image, want_text = model.encode_image(images), model.encode_text(tokens)
            assert got_image.shape == want_image.shape == (batch, model.config.embed_dim)
            assert (got_image - want_image).abs().max() <= TOL, (batch, fast)
            assert (got_text - want_text).abs().max() <= TOL, (batch, fast)
            assert np.abs(padded - want_text.numpy()).max() <= TOL, (batch, fast)


def test_parity_tiny(tiny_export):
    model, result = tiny_export
    _check_parity(model, result.folder)
    _, tokens = _check_inputs(model, 3)  # the export's own check has a text at full context length
    assert int(tokens[0].argmax()) == model.config.text.context_length - 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32", "RN50", "small"])
def test_parity_named_architectures(name, tmp_path):
    model = _model(name)
    result = export_onnx(model, tmp_path / name)
    _check_parity(model, result.folder)
    assert result.manifest["architecture"] == name


def test_static_text_path_equals_the_fast_and_reference_paths():
    """``forward_static`` (every position, no cut: what is traced) gives what ``forward`` gives both ways."""
    model = _model("tiny")
    tokens = _tokens(model, CAPTIONS)
    with torch.no_grad():
        static = model.text.forward_static(tokens)
        for fast in (True, False):
            with clipforge.fast_paths(fast):
                assert (model.encode_text(tokens) - static).abs().max() <= 1e-5


def test_export_json_records_the_export(tiny_export):
    model, result = tiny_export
    folder, manifest = result.folder, result.manifest
    assert json.loads((folder / MANIFEST_FILE).read_text()) == manifest
    assert (
        manifest["architecture"] == "tiny"
        and manifest["opset"] == 17
        and manifest["exporter"] == "torchscript"
    )
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["onnx"] == onnx.__version__ == "1.23.1"
    assert manifest["versions"]["onnxruntime"] == ort.__version__ == "1.30.0"
    for tower, file in (("image", IMAGE_FILE), ("text", TEXT_FILE)):
        assert manifest[tower]["sha256"] == sha256_file(folder / file)
        graph = onnx.load(str(folder / file))
        assert {entry.domain: entry.version for entry in graph.opset_import}[""] == 17
        (graph_input,) = graph.graph.input
        assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch axis
        assert graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 128
    assert manifest["image"]["input"] == {"name": "images", "shape": ["batch", 3, 32, 32], "dtype": "float32"}
    assert manifest["text"]["input"]["dtype"] == "int64" and manifest["text"]["input"]["max_length"] == 32
    assert manifest["preprocess"]["mean"] == list(model.config.preprocess.mean)
    assert manifest["preprocess"]["image_size"] == 32
    assert manifest["tokenizer"] == {"name": "clip-bpe", "context_length": 32, "on_overflow": "truncate"}
    assert manifest["logit_scale"] == pytest.approx(float(model.logit_scale.detach()), abs=1e-7)
    assert config_from_dict(manifest["config"]) == model.config
    parity = manifest["parity"]
    assert parity["tolerance"] == TOL and parity["batch"] == 3
    for tower in ("image", "text"):
        deltas = parity["max_abs_diff"][tower]
        assert set(deltas) == {"fast_paths_on", "fast_paths_off"}
        assert all(0 <= value <= TOL for value in deltas.values())


def test_onnx_clip_behaves_like_the_model(tiny_export):
    model, result = tiny_export
    runtime = OnnxCLIP(result.folder, verify=True)
    assert runtime.image_size == 32 and runtime.context_length == 32 and runtime.embed_dim == 128
    assert torch.equal(runtime.logit_scale, model.logit_scale.detach()) and runtime.logit_bias is None
    assert clipforge.get_tokenizer(runtime).context_length == 32  # the config travels with the export
    assert clipforge.get_transforms(runtime).image_size == 32
    tokens = _tokens(model, CAPTIONS)
    normalised = runtime.encode_text(tokens, normalize=True)
    assert torch.allclose(normalised.norm(dim=-1), torch.ones(len(CAPTIONS)))
    # Grouped by length (many groups) or in one call: the same embeddings.
    one_call = torch.from_numpy(runtime._text.session.run(None, {"tokens": tokens.numpy()})[0])
    assert (runtime.encode_text(tokens) - one_call).abs().max() <= 1e-5
    assert runtime.encode_image(torch.zeros(0, 3, 32, 32)).shape == (0, 128)
    assert runtime.encode_text(torch.zeros(0, 32, dtype=torch.long)).shape == (0, 128)
    with pytest.raises(ValueError, match=r"shape \[batch, 3, 32, 32\], got \(2, 3, 64, 64\)"):
        runtime.encode_image(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="token length 40 exceeds the model's context length 32"):
        runtime.encode_text(torch.zeros(2, 40, dtype=torch.long))


@pytest.mark.slow  # a whole export (two, for the CLI)
def test_export_keeps_the_model_as_it_was(tmp_path):
    """Tracing runs forward passes: a ResNet left in train mode must not have its BatchNorm statistics moved,
    and its mode is restored."""
    model = _model("tiny-rn").train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    result = export_onnx(model, tmp_path / "rn")
    assert model.training and model.visual.stem.bn1.training
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    model.eval()
    _check_parity(model, result.folder)


@pytest.mark.slow  # a whole export (two, for the CLI)
def test_cli_exports_and_replaces_an_earlier_export(tmp_path, capsys):
    out = tmp_path / "export"
    args = ["export", "onnx", "tiny", "--out", str(out), "--opset", "18", "--batch-size-check", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        assert main(args) == 0
        first = json.loads((out / MANIFEST_FILE).read_text())
        assert main(args) == 0  # an earlier export is replaced
    printed = capsys.readouterr().out
    assert f"exported tiny to {out} (opset 18" in printed and "tolerance 0.0001" in printed
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["opset"] == 18 and manifest["parity"]["batch"] == 2
    assert manifest["image"]["sha256"] == first["image"]["sha256"]  # same weights, same graph
    assert sorted(p.name for p in out.parent.iterdir()) == ["export"]  # no building folder left


def test_cli_errors_name_the_fix(tmp_path, capsys):
    assert main(["export", "onnx", "no-such-model", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no-such-model: no such checkpoint file or folder, and not a registered model name" in err
    assert "ViT-B-32" in err
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["export", "onnx", "tiny", "--out", str(a_file)]) == 2
    assert f"--out {a_file}: is a file, not a folder; pass a new folder" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["export", "onnx", "tiny", "--out", str(tmp_path / "busy")]) == 2
    assert "is not empty and is not an earlier ONNX export" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert main(["export", "onnx", "tiny", "--out", str(tmp_path / "y"), "--batch-size-check", "0"]) == 2
    assert "--batch-size-check must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("package", ["onnx", "onnxruntime"])
def test_a_missing_package_says_how_to_install_it(package, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    with pytest.raises(
        ExportError, match=rf"needs the '{package}' package .*pip install 'clipforge\[onnx\]'"
    ):
        export_onnx("tiny", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # a whole export (two, for the CLI)
def test_parity_failure_refuses_and_writes_nothing(tmp_path):
    model = _model("tiny")
    with pytest.raises(ExportError, match=r"ONNX parity check failed: max \|Δ\| .* exceeds the tolerance 0"):
        export_onnx(model, tmp_path / "x", tolerance=0.0)
    assert list(tmp_path.iterdir()) == []


def test_runtime_refuses_a_folder_that_is_not_a_good_export(tiny_export, tmp_path):
    with pytest.raises(ExportError, match="not an ONNX export \\(no export.json\\); make one with"):
        OnnxCLIP(tmp_path)
    _, result = tiny_export
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (MANIFEST_FILE, IMAGE_FILE, TEXT_FILE):
        (copy / name).write_bytes((result.folder / name).read_bytes())
    with open(copy / TEXT_FILE, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(
        ExportError, match="text_encoder.onnx: sha256 differs from export.json field 'text.sha256'"
    ):
        OnnxCLIP(copy, verify=True)
    (copy / IMAGE_FILE).unlink()
    with pytest.raises(ExportError, match="image_encoder.onnx: missing .* field 'image.file'"):
        OnnxCLIP(copy)
    manifest = json.loads((result.folder / MANIFEST_FILE).read_text())
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest | {"version": 99}))
    with pytest.raises(ExportError, match="field 'version' is 99, this clipforge reads version 1"):
        OnnxCLIP(copy)
