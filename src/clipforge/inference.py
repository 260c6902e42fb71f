"""Using a model: zero-shot classification of images against free-text labels, image and text embeddings
computed in streamed batches, and the files embeddings are written to (text-to-image search over a folder, with
its embedding cache, is :mod:`clipforge.search`). The functions take a model, tokenizer and transform; none reads CLI arguments or global state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipforge.checkpoint import CheckpointError, load_checkpoint
from clipforge.config import list_models
from clipforge.data.raw import IMAGE_EXTENSIONS
from clipforge.eval.zeroshot import build_classifier, zero_shot_probabilities
from clipforge.export.runtime import OnnxCLIP
from clipforge.features import (
    ImageBatch,
    ImageEmbeddings,
    ImageFailure,
    ImageTransform,
    encode_image_files,
    encode_image_tensor,
    encode_texts,
    iter_image_batches,
)
from clipforge.files import atomic_path
from clipforge.model import CLIP, create_model
from clipforge.tokenizer import Tokenizer

log = logging.getLogger("clipforge.inference")

#: Output suffixes :func:`write_embeddings` understands.
EMBEDDING_SUFFIXES = (".npy", ".npz", ".parquet")
#: Seed of the random weights a registered model name gets (so repeated runs, and the search cache, agree).
RANDOM_WEIGHTS_SEED = 0


class RandomWeightsWarning(UserWarning):
    """A model was built from an architecture name: its weights are random and its outputs meaningless."""


# ----------------------------------------------------------------------------------------------------------------
# Models and inputs


BACKENDS = ("torch", "onnxruntime")


def load_model(
    spec: str | Path,
    *,
    device: str | torch.device | None = None,
    activation: str | None = None,
    backend: str = "torch",
) -> CLIP:
    """A model in eval mode from a checkpoint path (any format :func:`clipforge.load_checkpoint` reads) or, for
    tests and smoke runs, a registered architecture name, built with random weights (seed
    :data:`RANDOM_WEIGHTS_SEED`) and a :class:`RandomWeightsWarning`.

    ``activation`` (``"gelu"``/``"quick_gelu"``) overrides what a checkpoint's format implies (open_clip state
    dicts do not record it). Raises :class:`CheckpointError` when ``spec`` is neither an existing path nor a
    registered name.

    ``backend="onnxruntime"``: ``spec`` is a folder written by ``clipforge export onnx``, loaded as
    :class:`clipforge.export.runtime.OnnxCLIP` (CPU; the same ``encode_image``/``encode_text``, so every encode
    path takes it). Such a folder loads that way whatever ``backend`` says (nothing else can run it).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    path = Path(spec).expanduser()
    if backend == "onnxruntime" or (path / "export.json").is_file():  # an export folder only runs on onnxruntime
        return _load_onnx(path, device)  # type: ignore[return-value]
    if path.exists():
        return load_checkpoint(path, device=device, activation=activation)
    name = str(spec)
    if name in list_models():
        warnings.warn(
            f"'{name}' is an architecture name, not a checkpoint: the model has RANDOM weights (seed "
            f"{RANDOM_WEIGHTS_SEED}) and its outputs mean nothing; pass a checkpoint file or folder to --model",
            RandomWeightsWarning,
            stacklevel=2,
        )
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = create_model(name)  # initialised on the CPU, so the weights do not depend on the device
        return model.to(device).eval() if device is not None else model.eval()
    raise CheckpointError(
        f"{spec}: no such checkpoint file or folder, and not a registered model name; pass the path of a "
        f"checkpoint (clipforge .safetensors, OpenAI/open_clip .pt, a Hugging Face or open_clip folder) "
        f"or one of {', '.join(list_models())} for random weights"
    )


def _load_onnx(path: Path, device: str | torch.device | None) -> OnnxCLIP:
    if not (path / "export.json").is_file():
        raise CheckpointError(
            f"{path}: --backend onnxruntime needs a folder written by `clipforge export onnx` (with export.json); "
            f"export the model first: clipforge export onnx MODEL --out {path}"
        )
    return OnnxCLIP(path).to(device)


def checkpoint_identity(spec: str | Path) -> str:
    """A string that changes whenever the weights ``spec`` names may have changed: the resolved path with the
    size and modification time of every file (a folder: all files under it), or ``name:<arch>:seed<n>``."""
    path = Path(spec)
    if not path.exists():
        return f"name:{spec}:seed{RANDOM_WEIGHTS_SEED}"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return "files:" + hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def find_images(sources: Sequence[str | Path]) -> list[Path]:
    """Image files from ``sources``: a file is kept as given (whatever its extension, and even if missing, so
    that loading reports it); a folder gives every file under it with an image extension
    (``IMAGE_EXTENSIONS``), recursively, in sorted order, without following symlinked folders.

    Raises ``ValueError`` for an empty ``sources`` or a folder without images.
    """
    if not sources:
        raise ValueError("no images given; pass image files or folders")
    found: list[Path] = []
    for source in sources:
        source = Path(source)
        if not source.is_dir():
            found.append(source)
            continue
        in_folder = []
        for root, dirs, files in os.walk(source):
            dirs.sort()
            in_folder += [
                Path(root, f) for f in sorted(files) if Path(f).suffix[1:].lower() in IMAGE_EXTENSIONS
            ]
        if not in_folder:
            raise ValueError(
                f"{source}: no images (.{', .'.join(sorted(IMAGE_EXTENSIONS))}) found in the folder or below it"
            )
        found += in_folder
    return found


def build_prompts(labels: Sequence[str], template: str | None = None) -> list[str]:
    """The text for each label: the label itself, or ``template`` with ``{}`` replaced by it.

    Raises ``ValueError`` for no labels, an empty or duplicate label, or a template without ``{}``.
    """
    if not labels:
        raise ValueError("the label list is empty; pass --labels 'a cat,a dog' or --labels-file FILE")
    seen: set[str] = set()
    for index, label in enumerate(labels):
        if not label.strip():
            raise ValueError(f"label {index + 1} of {len(labels)} is empty; remove it from the label list")
        if label in seen:
            raise ValueError(f"label {label!r} appears twice; each label must be unique")
        seen.add(label)
    if template is None:
        return list(labels)
    if "{}" not in template:
        raise ValueError(
            f"template {template!r} has no '{{}}' to put the label in, e.g. 'a photo of a {{}}.'"
        )
    return [template.replace("{}", label) for label in labels]


# ----------------------------------------------------------------------------------------------------------------
# Classification


@torch.inference_mode()
def classify(
    model: CLIP,
    tokenizer: Tokenizer,
    transform: ImageTransform,
    images: Sequence[Image.Image] | torch.Tensor,
    labels: Sequence[str],
    template: str | None = None,
) -> torch.Tensor:
    """Zero-shot probabilities [N, L] of N images (PIL images, or a preprocessed batch [N, 3, S, S]) over the
    labels, each row summing to 1: ``softmax(exp(logit_scale) * cosine)`` with the classifier of
    :func:`label_classifier`."""
    classifier = label_classifier(model, tokenizer, labels, template)
    if not isinstance(images, torch.Tensor):
        images = torch.stack([transform(image) for image in images])
    features = encode_image_tensor(model, images, batch_size=max(1, len(images)))
    return zero_shot_probabilities(features, classifier, model.logit_scale.exp()).cpu()


def label_classifier(
    model: CLIP, tokenizer: Tokenizer, labels: Sequence[str], template: str | None = None
) -> torch.Tensor:
    """The zero-shot classifier [D, L] of free-text labels: :func:`clipforge.eval.zeroshot.build_classifier`
    with one template (``template``, or the label itself), after :func:`build_prompts` checks the labels."""
    build_prompts(labels, template)
    return build_classifier(model, tokenizer, list(labels), [template or "{}"])


# ----------------------------------------------------------------------------------------------------------------
# Embeddings (the loops are in clipforge.features)


@torch.inference_mode()
def embed_images(
    model: CLIP,
    transform: ImageTransform,
    paths: Sequence[str | Path],
    *,
    normalize: bool = True,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
) -> ImageEmbeddings:
    """Image embeddings of ``paths`` in batches (tqdm bar when ``progress``), in input order. Images that fail
    to load are reported (name + reason) in ``failures`` and logged; raises ``ValueError`` if every image
    failed."""
    paths = [Path(p) for p in paths]
    result = encode_image_files(
        model,
        transform,
        paths,
        normalize=normalize,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
    )
    if not result.keys and paths:
        raise ValueError(f"all {len(paths)} images failed to load; the first: {result.failures[0].message}")
    return result


@torch.inference_mode()
def embed_texts(
    model: CLIP,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    normalize: bool = True,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Text embeddings [N, D] float32 of ``texts``, in order, ``batch_size`` texts per forward pass."""
    if not texts:
        raise ValueError("no texts given; pass strings or a file with one text per line")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return encode_texts(
        model, tokenizer, texts, batch_size=batch_size, normalize=normalize, progress=progress
    )


def check_embeddings_path(path: str | Path) -> Path:
    """``path`` as a Path if its suffix is one :func:`write_embeddings` writes, else ``ValueError`` (checked
    before any work is done, so a typo does not cost an embedding run)."""
    path = Path(path)
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        shown = path.suffix or "(none)"
        raise ValueError(
            f"{path}: unknown output suffix {shown!r}; use one of {', '.join(EMBEDDING_SUFFIXES)} "
            "(.npy writes a <name>.keys.txt beside it)"
        )
    return path


def write_embeddings(path: str | Path, keys: Sequence[str], array: np.ndarray) -> list[Path]:
    """Write embeddings [N, D] (as float32) and their N keys atomically; returns the files written.

    ``.npy``: the array, plus the keys one per line in a sidecar ``<stem>.keys.txt`` (keys must not contain
    line breaks); ``.npz``: arrays ``embeddings`` and ``keys``; ``.parquet`` (needs pyarrow): columns ``key``
    (string) and ``embedding`` (list of float32). Raises ``ValueError`` for another suffix or mismatched sizes.
    """
    path = check_embeddings_path(path)
    suffix = path.suffix.lower()
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != len(keys):
        raise ValueError(
            f"{path}: need an array [N, D] and N keys, got shape {array.shape} and {len(keys)} keys"
        )
    if suffix == ".npy":
        bad = next((k for k in keys if "\n" in k or "\r" in k), None)
        if bad is not None:
            raise ValueError(
                f"{path}: key {bad!r} contains a line break, which the .keys.txt sidecar cannot hold; "
                "write .npz or .parquet instead"
            )
        sidecar = path.with_name(path.name[: -len(path.suffix)] + ".keys.txt")
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, array)
        with atomic_path(sidecar) as tmp:
            tmp.write_text("".join(f"{k}\n" for k in keys), encoding="utf-8")
        return [path, sidecar]
    if suffix == ".npz":
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, embeddings=array, keys=np.array(list(keys), dtype=str))
        return [path]
    pa, pq = _pyarrow()
    offsets = pa.array(np.arange(len(keys) + 1, dtype=np.int64) * array.shape[1], type=pa.int64())
    embedding = pa.LargeListArray.from_arrays(offsets, pa.array(array.reshape(-1), type=pa.float32()))
    table = pa.table(
        {"key": pa.array(list(keys), type=pa.string()), "embedding": embedding.cast(pa.list_(pa.float32()))}
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return [path]


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read what :func:`write_embeddings` wrote: (keys, embeddings [N, D] float32)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        sidecar = path.with_name(path.name[: -len(path.suffix)] + ".keys.txt")
        keys = sidecar.read_text(encoding="utf-8").splitlines()
        return keys, np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return [str(k) for k in data["keys"]], data["embeddings"]
    if suffix == ".parquet":
        _, pq = _pyarrow()
        table = pq.read_table(path)
        column = table.column("embedding").combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        width = len(column[0]) if len(column) else 0
        if values.size != len(column) * width:
            raise ValueError(f"{path}: the 'embedding' lists do not all have the same length ({width} first)")
        return table.column("key").to_pylist(), values.reshape(len(column), width)
    raise ValueError(
        f"{path}: unknown embeddings suffix {path.suffix!r}; use one of {', '.join(EMBEDDING_SUFFIXES)}"
    )


def _pyarrow():  # (pyarrow, pyarrow.parquet), imported lazily: pyarrow is an optional dependency
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError(
            "writing .parquet needs pyarrow: pip install 'clipforge[parquet]' (or pyarrow), or write .npy/.npz"
        ) from exc
    return pa, pq


__all__ = [
    "EMBEDDING_SUFFIXES",
    "ImageBatch",
    "ImageEmbeddings",
    "ImageFailure",
    "RandomWeightsWarning",
    "build_prompts",
    "check_embeddings_path",
    "checkpoint_identity",
    "classify",
    "embed_images",
    "embed_texts",
    "find_images",
    "iter_image_batches",
    "label_classifier",
    "load_model",
    "read_embeddings",
    "write_embeddings",
]
