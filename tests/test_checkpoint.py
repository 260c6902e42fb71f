"""clipforge checkpoints: self-describing files, strict loading with clear errors, and lossless round trips
through every foreign format (OpenAI state dicts and TorchScript, open_clip files and folders, Hugging Face)."""

from __future__ import annotations

import json
import pickle
import warnings
import zipfile

import pytest
import torch
from safetensors import safe_open

import clipforge
from clipforge.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    export_checkpoint,
    load_checkpoint,
    load_weights,
    read_weights,
    save_checkpoint,
)
from clipforge.cli import main
from clipforge.model import create_model
from clipforge.model.convert import to_openai
from tests.conftest import open_clip_model, random_images, random_tokens, reduced_config


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_native_round_trip_is_self_describing(tmp_path, name):
    model = create_model(name, activation="quick_gelu").eval()
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left behind
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    assert header["format"] == "clipforge" and header["clipforge_version"] == clipforge.__version__
    stored = json.loads(header["config"])
    assert stored["activation"] == "quick_gelu" and stored["preprocess"]["interpolation"] == "bicubic"
    assert stored["tokenizer"]["name"] == "clip-bpe" and stored["text"]["context_length"] == 32

    loaded = load_checkpoint(path)  # from the file alone
    assert loaded.config == model.config and not loaded.training
    assert_same_weights(model, loaded)
    images, tokens = random_images(2, model.image_size), random_tokens(2, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images, tokens).image_features, model(images, tokens).image_features)


@pytest.mark.slow
def test_mismatched_architecture_names_key_and_shapes(tmp_path):
    path = save_checkpoint(create_model("tiny"), tmp_path / "tiny.safetensors")
    weights = read_weights(path)
    with pytest.raises(CheckpointError) as err:
        load_weights(create_model("small"), weights.state_dict, source=path)
    message = str(err.value)
    assert "tiny.safetensors" in message
    assert (
        "weight 'visual.class_token' has shape (128,) in the checkpoint but (192,) in model 'small'"
        in message
    )

    with pytest.raises(
        CheckpointError, match=r"'visual.transformer.blocks.4.norm1.weight' \(shape \(128,\)\) is missing"
    ):
        load_weights(create_model("tiny", vision={"layers": 6}), weights.state_dict, source=path)
    with pytest.raises(CheckpointError, match=r"24 checkpoint weight\(s\) have no place.*blocks.2"):
        load_weights(create_model("tiny", vision={"layers": 2}), weights.state_dict, source=path)
    with pytest.raises(CheckpointError, match=r"pos_embed.*resize_image"):
        load_weights(create_model("tiny", vision={"image_size": 64}), weights.state_dict, source=path)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "layers"), [("ViT-B-32", 2), ("RN50", [1, 1, 1, 1])])
def test_round_trip_through_openai_format(tmp_path, name, layers):
    model = create_model(reduced_config(name, "quick_gelu", layers, 2)).eval()
    path = export_checkpoint(model, tmp_path / "openai.pt", to="openai")
    raw = torch.load(path, weights_only=True)
    assert "visual.proj" in raw or "visual.attnpool.c_proj.weight" in raw
    back = load_checkpoint(path, format="openai")
    assert back.config.vision == model.config.vision and back.config.activation == "quick_gelu"
    assert_same_weights(model, back)


@pytest.mark.slow
def test_openai_layout_without_activation_is_refused(tmp_path):
    model = create_model(reduced_config("ViT-B-32", "quick_gelu", 1, 1))
    path = tmp_path / "state.pt"
    torch.save(to_openai(model.state_dict(), model.config), path)
    with pytest.raises(
        CheckpointError, match=r"state.pt: the activation cannot be read.*activation='quick_gelu'"
    ):
        load_checkpoint(path)
    assert load_checkpoint(path, activation="gelu").config.activation == "gelu"
    assert load_checkpoint(path, config=model.config).config.activation == "quick_gelu"


def test_openai_export_refuses_what_openai_would_misread(tmp_path):
    with pytest.raises(CheckpointError, match="QuickGELU"):
        export_checkpoint(create_model("tiny"), tmp_path / "x.pt", to="openai")
    with pytest.raises(CheckpointError, match=r"different (vision|text)\.\w+"):
        export_checkpoint(create_model("tiny", activation="quick_gelu"), tmp_path / "x.pt", to="openai")
    with pytest.raises(CheckpointError, match="ResNet"):
        export_checkpoint(create_model("tiny-rn"), tmp_path / "hf", to="hf")
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_round_trip_through_open_clip_folder_and_files(tmp_path, name):
    model = create_model(name).eval()
    folder = export_checkpoint(model, tmp_path / "oc", to="open_clip")
    back = load_checkpoint(folder)
    assert back.config.vision == model.config.vision and back.config.activation == model.config.activation
    assert_same_weights(model, back)

    for suffix in (".safetensors", ".bin"):
        file = export_checkpoint(model, tmp_path / f"weights{suffix}", to="open_clip")
        assert_same_weights(model, load_checkpoint(file, config=name))

    # open_clip itself loads the folder and computes the same embeddings.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import open_clip

        reference = open_clip.create_model(f"local-dir:{folder}").eval()
    images, tokens = random_images(2, model.image_size), random_tokens(2, 32)
    with torch.no_grad():
        assert (reference.encode_image(images) - model.encode_image(images)).abs().max() <= 1e-5
        assert (reference.encode_text(tokens) - model.encode_text(tokens)).abs().max() <= 1e-5


@pytest.mark.slow
def test_round_trip_through_hf_folder(tmp_path):
    model = create_model("tiny").eval()
    folder = export_checkpoint(model, tmp_path / "hf", to="hf")
    assert {p.name for p in folder.iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    }
    back = load_checkpoint(folder)
    assert back.config.vision == model.config.vision and back.config.text == model.config.text
    assert_same_weights(model, back)
    assert_same_weights(model, load_checkpoint(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="need their config.json"):
        (tmp_path / "alone").mkdir()
        (tmp_path / "alone" / "w.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        load_checkpoint(tmp_path / "alone" / "w.safetensors")


@pytest.mark.slow
def test_open_clip_training_checkpoint(tmp_path):
    """open_clip's training checkpoints wrap a DDP state dict with epoch/optimizer entries."""
    config = reduced_config("RN50", "quick_gelu", [1, 1, 1, 1], 1)
    reference = open_clip_model(config)
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, path)
    model = load_checkpoint(path, activation="quick_gelu")
    images, tokens = random_images(1, 224), random_tokens(2, 77)
    with torch.no_grad():
        assert (model.encode_image(images) - reference.encode_image(images)).abs().max() <= 1e-5
        assert (model.encode_text(tokens) - reference.encode_text(tokens)).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:FutureWarning")
def test_torchscript_archive_like_openai_release(tmp_path):
    """OpenAI ships TorchScript archives; clipforge reads their tensors without running their code."""
    config = reduced_config("ViT-B-32", "quick_gelu", 1, 1)
    reference = open_clip_model(config)
    images, tokens = random_images(1, 224), random_tokens(2, 77)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace_module(
            reference, {"encode_image": images, "encode_text": tokens}, check_trace=False
        )
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.save(scripted, str(path))
    model = load_checkpoint(path)  # auto-detected as OpenAI: QuickGELU
    assert model.config.activation == "quick_gelu"
    with torch.no_grad():
        assert (model.encode_image(images) - reference.encode_image(images)).abs().max() <= 1e-5
        assert (model.encode_text(tokens) - reference.encode_text(tokens)).abs().max() <= 1e-5


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"logit_scale": torch.zeros(())}, "x": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        load_checkpoint(path)
    assert main(["convert", str(path), str(tmp_path / "out.safetensors"), "--to", "clipforge"]) == 2
    assert not marker.exists()

    archive = tmp_path / "evil_script.pt"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(_Payload(marker), protocol=2))
        zf.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        zf.writestr("archive/code/__torch__/model.py", "")
        zf.writestr("archive/version", "3\n")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_checkpoint(archive)
    assert not marker.exists()


def test_bad_files_give_clear_errors(tmp_path):
    good = save_checkpoint(create_model("tiny"), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (truncated, text, empty, tmp_path / "missing.pt"):
        with pytest.raises(CheckpointError, match=path.name):
            load_checkpoint(path)


@pytest.mark.slow
def test_cli_convert_and_info(tmp_path, capsys):
    src = save_checkpoint(create_model("tiny"), tmp_path / "tiny.safetensors")
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert (
        main(["convert", str(tmp_path / "hf"), str(tmp_path / "again.safetensors"), "--to", "clipforge"]) == 0
    )
    assert_same_weights(load_checkpoint(src), load_checkpoint(tmp_path / "again.safetensors"))
    capsys.readouterr()
    assert main(["info", str(src)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "clipforge" and info["config"]["name"] == "tiny"
    assert main(["convert", str(tmp_path / "nothing.pt"), str(tmp_path / "o"), "--to", "hf"]) == 2
    assert "nothing.pt" in capsys.readouterr().err
