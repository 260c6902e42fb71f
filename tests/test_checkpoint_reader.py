"""read_checkpoint: every container yields the right flat tensors, and no file ever gets to run code."""

from __future__ import annotations

import argparse
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipforge.checkpoint.errors import CheckpointError, UnsafeCheckpointError
from clipforge.checkpoint.reader import RawCheckpoint, read_checkpoint


def _small_clip(vision_cfg: dict) -> torch.nn.Module:
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    text_cfg = dict(context_length=16, vocab_size=100, width=64, heads=2, layers=2)
    return open_clip.model.CLIP(
        embed_dim=64, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True
    ).eval()


VIT_CFG = dict(layers=2, width=64, patch_size=8, image_size=32)
RESNET_CFG = dict(layers=[1, 1, 1, 1], width=16, image_size=64)


def _jit_state_dict(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; it is the reference here
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


def _script_and_save(module: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def _assert_same(raw: RawCheckpoint, expected: dict[str, torch.Tensor]) -> None:
    assert list(raw.tensors) == list(expected)  # same keys in the same order
    for name, tensor in expected.items():
        got = raw.tensors[name]
        assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape), name
        assert torch.equal(_bits(got), _bits(tensor)), name


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that comparisons are bitwise (NaNs and -0.0 included)."""
    return tensor.reshape(-1).view(torch.uint8)


def _rewrite_zip(src: Path, dst: Path, edit: Callable[[str, bytes], tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            name, data = edit(info.filename, zin.read(info))
            zout.writestr(name, data)
    return dst


@pytest.fixture(scope="module")
def scripted_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _script_and_save(_small_clip(VIT_CFG), tmp_path_factory.mktemp("ts") / "vit.pt")


# ----------------------------------------------------------------------------------------------------------------
# safetensors and torch.save


def test_safetensors_with_and_without_metadata(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    save_file(tensors, str(tmp_path / "meta.safetensors"), metadata={"format": "clipforge", "k": "v"})
    save_file(tensors, str(tmp_path / "plain.bin"))  # the extension does not matter

    with_meta = read_checkpoint(tmp_path / "meta.safetensors")
    assert with_meta.container == "safetensors"
    assert with_meta.metadata == {"format": "clipforge", "k": "v"}
    _assert_same(with_meta, tensors)

    plain = read_checkpoint(str(tmp_path / "plain.bin"))
    assert plain.metadata == {}
    assert plain.path == tmp_path / "plain.bin"
    _assert_same(plain, tensors)


def test_torch_save_state_dict_keeps_fp16(tmp_path: Path) -> None:
    state = {
        "visual.proj": torch.randn(4, 2).half(),
        "logit_scale": torch.tensor(4.6052),
        "n": torch.tensor([1, 2]),
    }
    torch.save(state, tmp_path / "sd.pt")
    raw = read_checkpoint(tmp_path / "sd.pt")
    assert raw.container == "torch"
    assert raw.tensors["visual.proj"].dtype == torch.float16
    _assert_same(raw, state)


def test_legacy_torch_save_format(tmp_path: Path) -> None:
    state = {"w": torch.randn(2, 3), "h": torch.randn(3).half()}
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    raw = read_checkpoint(tmp_path / "legacy.pt")
    assert raw.container == "torch"
    _assert_same(raw, state)


def test_open_clip_training_checkpoint_is_unwrapped(tmp_path: Path) -> None:
    weights = {"module.a.weight": torch.randn(2, 2), "module.b.bias": torch.randn(2)}
    checkpoint = {
        "epoch": 3,
        "name": "x",
        "state_dict": weights,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 0.1}]},
    }
    torch.save(checkpoint, tmp_path / "epoch_3.pt")
    raw = read_checkpoint(tmp_path / "epoch_3.pt")
    assert list(raw.tensors) == ["a.weight", "b.bias"]
    assert torch.equal(raw.tensors["a.weight"], weights["module.a.weight"])
    assert raw.metadata == {"epoch": "3", "name": "x"}
    assert raw.ignored == ("optimizer",)


def test_model_wrapper_nested_dicts_and_partial_module_prefix(tmp_path: Path) -> None:
    checkpoint = {"model": {"visual": {"proj": torch.ones(2)}, "module.x": torch.zeros(1), "step": 7}}
    torch.save(checkpoint, tmp_path / "wrapped.pt")
    raw = read_checkpoint(tmp_path / "wrapped.pt")
    assert list(raw.tensors) == ["visual.proj", "module.x"]  # "module." is kept unless every key has it
    assert raw.metadata == {"step": "7"}


# ----------------------------------------------------------------------------------------------------------------
# TorchScript


def test_torchscript_vit_matches_jit_state_dict(scripted_vit: Path) -> None:
    raw = read_checkpoint(scripted_vit)
    assert raw.container == "torchscript"
    _assert_same(raw, _jit_state_dict(scripted_vit))
    assert "attn_mask" in raw.tensors  # a buffer: TorchScript keeps non-persistent buffers in its state dict
    assert raw.metadata["context_length"] == "16"
    # TorchScript mangles class names ("___torch_mangle_N.CLIP") when a process scripts several variants.
    assert re.fullmatch(
        r"__torch__\.open_clip\.model\.(___torch_mangle_\d+\.)?CLIP", raw.metadata["torchscript.class"]
    )


@pytest.mark.slow
def test_torchscript_fp16_modified_resnet_matches_jit_state_dict(tmp_path: Path) -> None:
    path = _script_and_save(_small_clip(RESNET_CFG).half(), tmp_path / "rn.pt")
    raw = read_checkpoint(path)
    expected = _jit_state_dict(path)
    _assert_same(raw, expected)
    assert raw.tensors["visual.conv1.weight"].dtype == torch.float16
    # BatchNorm buffers are included, with their own dtype
    assert raw.tensors["visual.bn1.num_batches_tracked"].dtype == torch.int64


def test_traced_module_matches_jit_state_dict(tmp_path: Path) -> None:
    visual = _small_clip(VIT_CFG).visual
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(visual, torch.randn(1, 3, 32, 32)), str(tmp_path / "traced.pt"))
    _assert_same(read_checkpoint(tmp_path / "traced.pt"), _jit_state_dict(tmp_path / "traced.pt"))


def test_torchscript_archive_with_another_root_folder(scripted_vit: Path, tmp_path: Path) -> None:
    def rename(name: str, data: bytes) -> tuple[str, bytes]:
        return "ViT-B-32/" + name.split("/", 1)[1], data

    renamed = _rewrite_zip(scripted_vit, tmp_path / "ViT-B-32.pt", rename)
    _assert_same(read_checkpoint(renamed), _jit_state_dict(scripted_vit))


def _storage_itemsizes(data_pkl: bytes) -> dict[str, int]:
    """Storage key -> element size, from the persistent ids ('storage', torch.<X>Storage, key, ...) of data.pkl."""
    sizes = {"FloatStorage": 4, "HalfStorage": 2, "LongStorage": 8, "BoolStorage": 1}
    values: list[str] = []  # the strings and globals data.pkl pushes, memo reads resolved
    memo: dict[int, str] = {}
    for op, arg, _ in pickletools.genops(data_pkl):
        if op.name in ("BINUNICODE", "GLOBAL"):
            values.append(arg.split()[-1])
        elif op.name == "BINGET" and arg in memo:
            values.append(memo[arg])
        elif op.name == "BINPUT" and values:
            memo[arg] = values[-1]
    return {values[i + 2]: sizes[values[i + 1]] for i, value in enumerate(values) if value == "storage"}


@pytest.mark.slow
def test_torchscript_big_endian_archive(tmp_path: Path) -> None:
    path = _script_and_save(_small_clip(RESNET_CFG).half(), tmp_path / "rn.pt")  # fp16 and int64 storages
    with zipfile.ZipFile(path) as archive:
        itemsizes = _storage_itemsizes(archive.read("rn/data.pkl"))

    def swap(name: str, data: bytes) -> tuple[str, bytes]:
        if name.endswith("/byteorder"):
            return name, b"big"
        if "/data/" in name:
            size = itemsizes[name.rsplit("/", 1)[1]]
            data = (
                torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, size).flip(1).numpy().tobytes()
            )
        return name, data

    big = read_checkpoint(_rewrite_zip(path, tmp_path / "big.pt", swap))
    _assert_same(big, _jit_state_dict(path))


class _OpenAIStyle(torch.nn.Module):
    """Like OpenAI's archives: integer settings stored as tensors next to the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.register_buffer("input_resolution", torch.tensor(224))
        self.context_length = 77
        self.plain = torch.zeros(3)  # a tensor attribute that is neither a parameter nor a buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.input_resolution + self.plain.sum() + self.context_length


def test_torchscript_settings_are_reported_as_they_are(tmp_path: Path) -> None:
    path = _script_and_save(_OpenAIStyle(), tmp_path / "openai_style.pt")
    raw = read_checkpoint(path)
    _assert_same(raw, _jit_state_dict(path))
    assert "input_resolution" in raw.tensors  # a tensor buffer stays a tensor
    assert raw.metadata["context_length"] == "77"  # a plain int is metadata
    assert raw.ignored == ("plain",)  # torch.jit drops it from state_dict(); clipforge says so


# ----------------------------------------------------------------------------------------------------------------
# Security: nothing from the file runs


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class _RunsExec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


SYSTEM_GLOBAL = f"{os.system.__module__}.system"  # posix.system on Linux


def _torchscript_like_zip(path: Path, payload: object) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        archive.writestr("archive/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n")
        archive.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("archive/version", "3\n")
    return path


def test_torch_save_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "x": _RunsShell(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=SYSTEM_GLOBAL) as info:
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    assert "evil.pt" in str(info.value) and "safetensors" in str(info.value)


def test_legacy_torch_save_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"x": _RunsShell(marker)}, tmp_path / "evil.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match=SYSTEM_GLOBAL):
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize(("payload", "refused"), [(_RunsShell, SYSTEM_GLOBAL), (_RunsExec, "builtins.exec")])
def test_torchscript_payload_is_refused(tmp_path: Path, payload: type, refused: str) -> None:
    marker = tmp_path / "pwned"
    path = _torchscript_like_zip(tmp_path / "evil_ts.pt", payload(marker))
    with pytest.raises(UnsafeCheckpointError, match=refused) as info:
        read_checkpoint(path)
    assert not marker.exists()
    assert "evil_ts.pt" in str(info.value)


def test_torchscript_payload_inside_module_state_is_refused(scripted_vit: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    # The payload's opcodes without PROTO, STOP and memo writes (which would clobber the host pickle's memo).
    evil = pickletools.optimize(pickle.dumps(_RunsShell(marker), protocol=2))[2:-1]

    def inject(name: str, data: bytes) -> tuple[str, bytes]:
        if name.endswith("/data.pkl"):  # replace the value of the root module's `training` attribute
            key = b"X\x08\x00\x00\x00training"
            start = data.index(key) + len(key)
            start += 2 if data[start : start + 1] == b"q" else 0  # skip the BINPUT of the key
            data = data[:start] + evil + data[start + 1 :]
        return name, data

    with pytest.raises(UnsafeCheckpointError, match=SYSTEM_GLOBAL):
        read_checkpoint(_rewrite_zip(scripted_vit, tmp_path / "tampered.pt", inject))
    assert not marker.exists()


def test_pickled_python_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1), "args": argparse.Namespace(lr=0.1)}, tmp_path / "args.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace"):
        read_checkpoint(tmp_path / "args.pt")


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such file"):
        read_checkpoint(tmp_path / "nope.pt")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: the file is empty"):
        read_checkpoint(tmp_path / "empty.pt")


def test_text_file(tmp_path: Path) -> None:
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a checkpoint: expected safetensors") as info:
        read_checkpoint(tmp_path / "notes.pt")
    assert not isinstance(info.value, UnsafeCheckpointError)


@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_safetensors(tmp_path: Path, cut: str) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path), metadata={"a": "b" * 200})
    data = path.read_bytes()
    path.write_bytes(data[:100] if cut == "header" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: safetensors file is truncated or corrupt"):
        read_checkpoint(path)


def test_truncated_torch_zip(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match=r"cut\.pt: zip archive is truncated or corrupt"):
        read_checkpoint(_truncate(tmp_path / "cut.pt"))


def test_truncated_legacy_torch_save(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "cut.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"cut\.pt: .*truncated or corrupt") as info:
        read_checkpoint(_truncate(tmp_path / "cut.pt"))
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_torchscript_with_missing_storage(scripted_vit: Path, tmp_path: Path) -> None:
    def drop(name: str, data: bytes) -> tuple[str, bytes]:
        return (name + ".gone" if name.endswith("/data/0") else name), data

    with pytest.raises(CheckpointError, match=r"missing\.pt: record vit/data/0 is missing"):
        read_checkpoint(_rewrite_zip(scripted_vit, tmp_path / "missing.pt", drop))


def test_zips_without_tensors(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "name": "x"}, tmp_path / "scalars.pt")
    with pytest.raises(CheckpointError, match=r"scalars\.pt: the file holds no tensors"):
        read_checkpoint(tmp_path / "scalars.pt")

    with zipfile.ZipFile(tmp_path / "docs.zip", "w") as archive:
        archive.writestr("docs/readme.txt", "hello")
    with pytest.raises(CheckpointError, match=r"docs\.zip: not a checkpoint: expected safetensors"):
        read_checkpoint(tmp_path / "docs.zip")


def test_plain_pickle_is_not_a_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "weights.pkl").write_bytes(pickle.dumps({"x": _RunsShell(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=r"weights\.pkl: not a checkpoint: expected safetensors"):
        read_checkpoint(tmp_path / "weights.pkl")
    assert not marker.exists()
