"""Export both towers of a CLIP to ONNX (``DIR/image_encoder.onnx``, ``DIR/text_encoder.onnx``, ``DIR/export.json``)
and prove the graphs compute what the PyTorch model computes.

**Exporter.** Both of torch 2.14's exporters were tried (ViT-B/32 and ``tiny``, the same process and inputs).
The torch.export-based ("dynamo") default gives graphs as exact (max |Δ| ~1e-6) and as fast in onnxruntime
(ViT-B/32, 2 threads: images 8.1 against 7.7 s, texts 10.8 against 11.4 s per batch on a busy machine), but
with a dynamic text-length axis its export of ViT-B/32's text tower had not finished after 8 minutes (batch
axis only: 12 s), it takes 21 s for both of ``tiny``'s towers (2.4 s here), and it writes the weights to a separate
``.onnx.data`` file. The TorchScript exporter (``dynamo=False``) traces in seconds, with dynamic batch and
text-length axes from ``dynamic_axes`` (onnxruntime then runs each group of texts cut to its longest, see
:class:`~clipforge.export.runtime.OnnxCLIP`), one self-contained file per tower. It is deprecated since torch
2.9 (a ``DeprecationWarning``, silenced here) but present in the pinned torch; when it goes, ``dynamo=True``
with ``dynamic_shapes`` is the switch to flip (:data:`EXPORTER`).

**What is traced.** The reference computation (``clipforge.fast_paths(False)``), since the packed-text fast path
has shapes that depend on the tokens: the image tower's ``encode_image`` and the text tower's
:meth:`~clipforge.model.text.TextTransformer.forward_static` (every position, pooled at the end token: the
reference without its cut to the longest text). Outputs are the unnormalised embeddings ``encode_image`` /
``encode_text`` return. After writing, onnxruntime runs both graphs on a fixed batch of random images and real
captions (one at full context length) and the export is refused unless max |Δ| ≤ ``tolerance`` against PyTorch
with its fast paths on and off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.export.manifest import (
    FORMAT,
    FORMAT_VERSION,
    IMAGE_FILE,
    MANIFEST_FILE,
    TEXT_FILE,
    ExportError,
    import_optional,
    sha256_file,
)
from clipforge.export.runtime import OnnxCLIP
from clipforge.files import atomic_directory
from clipforge.inference import checkpoint_identity, load_model
from clipforge.model import CLIP
from clipforge.model.layers import fast_paths
from clipforge.model.text import TextTransformer
from clipforge.tokenizer import get_tokenizer
from clipforge.version import __version__

EXPORTER = "torchscript"  # see the module docstring
DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17; onnxruntime 1.30 runs opsets 7-23
DEFAULT_TOLERANCE = 1e-4  # fp32 max |Δ| against PyTorch
CHECK_SEED = 0
# Real captions for the parity check: different lengths, and the last one longer than any context (truncated to
# exactly the context length, the end token in the last slot).
CHECK_CAPTIONS = (
    "a photo of a dog",
    "A red and white anemone flower.",
    "an emoji of a smiling face with heart-shaped eyes",
    "cat",
    "a diagram of the water cycle showing evaporation from the sea, clouds forming over the mountains, rain "
    "falling on the hills, rivers carrying the water back down through forests, fields and towns, and the "
    "sun warming the surface of the ocean again so that the whole cycle can start once more, year after year, "
    "in every season, from the frozen poles to the warm and humid tropics, through droughts, floods and storms, "
    "as it has done for billions of years",
)


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    manifest: dict[str, Any]


class _ImageEncoder(nn.Module):
    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class _TextEncoder(nn.Module):
    def __init__(self, text: TextTransformer) -> None:
        super().__init__()
        self.text = text

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.forward_static(tokens)


def export_onnx(
    model: str | Path | CLIP,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    check_batch: int = 3,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Export ``model`` (a CLIP, a checkpoint path or a registered architecture name, as
    :func:`clipforge.inference.load_model` reads it) to the folder ``out``, check parity on ``check_batch``
    images and texts, and return the folder with its ``export.json`` contents.

    ``out`` must be new, empty, or an earlier export (replaced). The folder appears complete or not at all: a
    failed parity check raises :class:`ExportError` and leaves nothing behind."""
    onnx = import_optional("onnx")
    ort = import_optional("onnxruntime")
    out = _check_out_folder(Path(out))
    if check_batch < 1:
        raise ExportError(f"--batch-size-check must be at least 1, got {check_batch}")
    source = str(model) if not isinstance(model, CLIP) else None
    clip = model if isinstance(model, CLIP) else load_model(model)
    if not isinstance(clip.text, TextTransformer):
        raise ExportError(
            f"{clip.config.name}: the text tower is a pretrained {type(clip.text).__name__}, which has no "
            "static path to export; ONNX export covers clipforge's own text transformer (ViT and ResNet image "
            "towers)"
        )
    parameter = next(clip.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        raise ExportError(
            f"export a float32 model on the CPU (this one is {parameter.dtype} on {parameter.device}); "
            "call model.float().cpu() first"
        )
    examples = _check_inputs(clip, 2)
    with atomic_directory(out) as building, _inference_state(clip):
        building.mkdir(parents=True)
        _export_graph(
            _ImageEncoder(clip), examples[0], building / IMAGE_FILE, "images", "image_embeddings", opset
        )
        _export_graph(
            _TextEncoder(clip.text), examples[1], building / TEXT_FILE, "tokens", "text_embeddings", opset
        )
        for name in (IMAGE_FILE, TEXT_FILE):
            onnx.checker.check_model(str(building / name))
        manifest = _manifest(clip, source, building, opset, onnx.__version__, ort.__version__)
        (building / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        manifest["parity"] = _parity(clip, building, check_batch, tolerance)
        (building / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():  # an earlier export, checked above: replaced only now that the new one is good
            shutil.rmtree(out)
    return ExportResult(out, manifest)


def _check_out_folder(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file, not a folder; pass a new folder for the export")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise ExportError(
            f"--out {out}: the folder exists, is not empty and is not an earlier ONNX export (no "
            f"{MANIFEST_FILE}); pass a new or empty folder"
        )
    return out


@contextlib.contextmanager
def _inference_state(model: CLIP) -> Iterator[None]:
    """Eval mode, no autograd, fast paths off for the block; the model's mode is restored after. Tracing runs
    forward passes, so a model left in train mode would update BatchNorm statistics (and the exporter's own
    mode handling restores the *wrapper's* mode on the whole tree, so the wrappers are made in eval mode)."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), fast_paths(False):
            yield
    finally:
        model.train(training)


def _export_graph(
    module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str, opset: int
) -> None:
    axes = {0: "batch", 1: "length"} if input_name == "tokens" else {0: "batch"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
        warnings.filterwarnings("ignore", message=".*aten::index.*")  # no negative indices are traced
        # Shape checks (the image size the model expects) are traced as constants, which is what they are.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: axes, output_name: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )


def _check_inputs(model: CLIP, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch: seeded random images and real captions (cycled; the first is at full context length)."""
    size = model.config.vision.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(CHECK_SEED))
    captions = [CHECK_CAPTIONS[(i - 1) % len(CHECK_CAPTIONS)] for i in range(batch)]
    quiet = logging.getLogger("clipforge.tokenizer")  # the long caption is cut on purpose: no warning
    quiet.addFilter(_drop_truncation_notice)
    try:
        tokens = get_tokenizer(model, on_overflow="truncate")(captions)
    finally:
        quiet.removeFilter(_drop_truncation_notice)
    return images, tokens


def _drop_truncation_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("truncated ")


def _parity(model: CLIP, folder: Path, batch: int, tolerance: float) -> dict[str, Any]:
    """Max |Δ| of each graph in onnxruntime against PyTorch with its fast paths on and off."""
    images, tokens = _check_inputs(model, batch)
    runtime = OnnxCLIP(folder)
    got = {"image": runtime.encode_image(images), "text": runtime.encode_text(tokens)}
    deltas: dict[str, dict[str, float]] = {"image": {}, "text": {}}
    for fast in (True, False):
        with fast_paths(fast):
            want = {"image": model.encode_image(images), "text": model.encode_text(tokens)}
        for tower in deltas:
            deltas[tower][f"fast_paths_{'on' if fast else 'off'}"] = float(
                (got[tower] - want[tower]).abs().max()
            )
    worst = max(max(d.values()) for d in deltas.values())
    if not worst <= tolerance:  # also refuses NaN
        raise ExportError(
            f"ONNX parity check failed: max |Δ| against PyTorch {deltas} exceeds the tolerance {tolerance:g} "
            f"(batch {batch}); nothing was written. Report this with the model and opset {model.config.name}"
        )
    return {"tolerance": tolerance, "batch": batch, "max_abs_diff": deltas}


def _manifest(
    model: CLIP, source: str | None, folder: Path, opset: int, onnx_version: str, ort_version: str
) -> dict[str, Any]:
    config = model.config
    size, length, dim = config.vision.image_size, config.text.context_length, config.embed_dim
    bias = model.logit_bias
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "architecture": config.name,
        "source": source,
        "identity": checkpoint_identity(source) if source is not None else None,
        "opset": opset,
        "exporter": EXPORTER,
        "versions": {"clipforge": __version__, "torch": torch.__version__, "onnx": onnx_version,
                     "onnxruntime": ort_version},
        "image": {
            "file": IMAGE_FILE,
            "sha256": sha256_file(folder / IMAGE_FILE),
            "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32"},
            "output": {"name": "image_embeddings", "shape": ["batch", dim], "dtype": "float32"},
        },
        "text": {
            "file": TEXT_FILE,
            "sha256": sha256_file(folder / TEXT_FILE),
            "input": {"name": "tokens", "shape": ["batch", "length"], "dtype": "int64", "max_length": length},
            "output": {"name": "text_embeddings", "shape": ["batch", dim], "dtype": "float32"},
        },
        "preprocess": {"image_size": size, **dataclasses.asdict(config.preprocess)},
        "tokenizer": {"name": config.tokenizer.name, "context_length": length,
                      "on_overflow": config.tokenizer.on_overflow},
        "logit_scale": float(model.logit_scale.detach()),
        "logit_bias": None if bias is None else float(bias.detach()),
        "config": config.to_dict(),
    }  # fmt: skip
    return json.loads(json.dumps(manifest))  # as export.json reads back: lists, not tuples
