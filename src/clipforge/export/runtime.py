"""A CLIP exported to ONNX (:mod:`clipforge.export.onnx`), run with onnxruntime on the CPU, with the PyTorch
model's ``encode_image`` / ``encode_text`` / ``logit_scale`` so the code that encodes can take either."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipforge.config import ModelConfig, config_from_dict
from clipforge.export.manifest import ExportError, import_optional, read_manifest, verify_checksums
from clipforge.model.layers import length_groups

# Texts run in groups of similar length, each cut to its longest text (as the PyTorch fast path groups its
# attention): a group's fixed cost in padded tokens. Here the whole graph runs padded, and a session call costs
# ~0.1-0.3 ms, about one padded token of ViT-B/32's text tower, tens for small towers: an estimate, not tuned
# (benchmarks/bench_onnx.py measures the result).
TEXT_GROUP_COST = 64

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class OnnxCLIP:
    """The two towers of an ONNX export folder in onnxruntime sessions (CPU).

    ``encode_image(images [B, 3, S, S] float) -> [B, D]`` and ``encode_text(tokens [B, L] int) -> [B, D]``
    (L ≤ context length) take and return torch tensors on the CPU, unnormalised unless ``normalize``, as
    :class:`clipforge.model.CLIP` does; ``logit_scale`` is the same scalar parameter (log of 1/τ: use
    ``logit_scale.exp()``), ``config`` the model's :class:`~clipforge.config.ModelConfig`, so
    ``clipforge.get_tokenizer(onnx_model)`` and ``clipforge.get_transforms(onnx_model)`` work unchanged.

    ``threads``: onnxruntime's intra-op threads (0: torch's current count, so both backends use the same
    cores); ``optimization``: onnxruntime's graph optimisation level; ``verify``: check each graph's sha256
    against ``export.json`` first (reads the files once: ~1 s for ViT-B/32).
    """

    def __init__(
        self, folder: str | Path, *, threads: int = 0, optimization: str = "all", verify: bool = False
    ) -> None:
        ort = import_optional("onnxruntime")
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if verify:
            verify_checksums(self.folder, self.manifest)
        if optimization not in OPTIMIZATION_LEVELS:
            raise ExportError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
        self.config: ModelConfig = config_from_dict(
            self.manifest["config"], f"{self.folder}/export.json config"
        )
        self.logit_scale = torch.tensor(float(self.manifest["logit_scale"]))
        bias = self.manifest.get("logit_bias")
        self.logit_bias = None if bias is None else torch.tensor(float(bias))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel,
            f"ORT_{'DISABLE_ALL' if optimization == 'disable' else 'ENABLE_' + optimization.upper()}",
        )
        self._image = _Tower(ort, self.folder, self.manifest["image"], options)
        self._text = _Tower(ort, self.folder, self.manifest["text"], options)

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images [B, 3, S, S] (preprocessed) -> [B, embed_dim] float32."""
        size = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"expected images of shape [batch, 3, {size}, {size}], got {tuple(images.shape)}; preprocess "
                "them with clipforge.get_transforms(model)"
            )
        if images.shape[0] == 0:
            return images.new_zeros(0, self.embed_dim, dtype=torch.float32)
        features = self._image.run(images.detach().cpu().float())
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """token ids [B, L] (L ≤ context length) -> [B, embed_dim] float32.

        Rows run in groups of similar length (:func:`~clipforge.model.layers.length_groups`), each cut to its
        longest text: the graph is the static padded computation, so a cut changes no value (the end token
        never sees what follows it) and short captions do not pay for long ones."""
        if tokens.ndim != 2:
            raise ValueError(f"expected token ids of shape [batch, length], got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"token length {tokens.shape[1]} exceeds the model's context length {self.context_length}; "
                "tokenize with clipforge.get_tokenizer(model)"
            )
        if tokens.shape[0] == 0:
            return torch.zeros(0, self.embed_dim)
        tokens = tokens.detach().cpu().long()
        lengths = tokens.argmax(dim=-1) + 1  # up to and including the end token (the row's largest id)
        groups = length_groups(lengths, TEXT_GROUP_COST)
        if len(groups) == 1:
            features = self._text.run(tokens[:, : groups[0][1]])
        else:
            features = torch.empty(tokens.shape[0], self.embed_dim)
            for rows, length in groups:
                features[rows] = self._text.run(tokens[rows, :length])
        return F.normalize(features, dim=-1) if normalize else features

    # For code written for an ``nn.Module`` (the encode layer, zero-shot classifiers, search): an export is
    # always in inference mode, has no trainable parameters and runs on the CPU.
    training = False

    def eval(self) -> OnnxCLIP:
        return self

    def train(self, mode: bool = True) -> OnnxCLIP:
        if mode:
            raise ExportError(f"{self.folder}: an ONNX export runs inference only; train the PyTorch model")
        return self

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return iter(())

    def to(self, device: str | torch.device | None = None, *args: object, **kwargs: object) -> OnnxCLIP:
        if device is not None and torch.device(device).type != "cpu":
            raise ExportError(
                f"{self.folder}: the onnxruntime backend runs on the CPU, not {device}; use --device cpu, or the "
                "PyTorch backend on a GPU"
            )
        return self

    def fingerprint(self) -> str:
        """This export's identity for feature caches and indexes (:func:`clipforge.features.model_fingerprint`):
        the config and both graphs' recorded sha256 — not the source weights' fingerprint, since onnxruntime's
        features differ from PyTorch's in the last bits."""
        digest = hashlib.sha256(b"onnxruntime\0" + self.config.to_json().encode())
        for tower in ("image", "text"):
            digest.update(f"\0{tower}\0{self.manifest[tower]['sha256']}".encode())
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"OnnxCLIP({str(self.folder)!r}, architecture={self.config.name!r})"


class _Tower:
    """One graph in one onnxruntime session: a torch tensor in, a torch tensor out."""

    def __init__(self, ort: Any, folder: Path, entry: dict[str, Any], options: Any) -> None:
        path = folder / entry["file"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ExportError(f"{path}: onnxruntime cannot load it ({exc}); export the model again") from exc
        self.input_name = entry["input"]["name"]
        self.dtype = np.dtype(entry["input"]["dtype"])

    def run(self, inputs: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(inputs.numpy(), dtype=self.dtype)
        (output,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(output)
