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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clipforge.checkpoint import CheckpointError, load_checkpoint
from clipforge.config import list_models
from clipforge.data.raw import IMAGE_EXTENSIONS
from clipforge.files import atomic_path
from clipforge.images import ImageLoadError, load_image
from clipforge.model import CLIP, create_model
from clipforge.tokenizer import Tokenizer

log = logging.getLogger("clipforge.inference")

#: Output suffixes :func:`write_embeddings` understands.
EMBEDDING_SUFFIXES = (".npy", ".npz", ".parquet")
#: Seed of the random weights a registered model name gets (so repeated runs, and the search cache, agree).
RANDOM_WEIGHTS_SEED = 0

#: What ``clipforge.get_transforms(model)`` returns: PIL image -> float tensor [3, S, S].
ImageTransform = Callable[[Image.Image], torch.Tensor]


class RandomWeightsWarning(UserWarning):
    """A model was built from an architecture name: its weights are random and its outputs meaningless."""


# ----------------------------------------------------------------------------------------------------------------
# Models and inputs


def load_model(
    spec: str | Path, *, device: str | torch.device | None = None, activation: str | None = None
) -> CLIP:
    """A model in eval mode from a checkpoint path (any format :func:`clipforge.load_checkpoint` reads) or, for
    tests and smoke runs, a registered architecture name, built with random weights (seed
    :data:`RANDOM_WEIGHTS_SEED`) and a :class:`RandomWeightsWarning`.

    ``activation`` (``"gelu"``/``"quick_gelu"``) overrides what a checkpoint's format implies (open_clip state
    dicts do not record it). Raises :class:`CheckpointError` when ``spec`` is neither an existing path nor a
    registered name.
    """
    path = Path(spec).expanduser()
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


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


# ----------------------------------------------------------------------------------------------------------------
# Classification


@torch.inference_mode()
def text_classifier(
    model: CLIP, tokenizer: Tokenizer, labels: Sequence[str], template: str | None = None
) -> torch.Tensor:
    """L2-normalised text embeddings of the labels' prompts [L, D]: the zero-shot classifier's weights."""
    device, _ = _model_device_dtype(model)
    tokens = tokenizer(build_prompts(labels, template)).to(device)
    return model.encode_text(tokens, normalize=True).float()


def class_probabilities(
    image_features: torch.Tensor, classifier: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """softmax(logit_scale * cosine) over labels: image features [N, D] (any norm), classifier [L, D]
    normalised, ``logit_scale`` the multiplier (exp of the model's stored log-scale) -> [N, L]."""
    cosine = F.normalize(image_features.float(), dim=-1) @ classifier.float().T
    return (float(logit_scale) * cosine).softmax(dim=-1)


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
    labels, each row summing to 1."""
    classifier = text_classifier(model, tokenizer, labels, template)
    device, dtype = _model_device_dtype(model)
    if not isinstance(images, torch.Tensor):
        images = torch.stack([transform(image) for image in images])
    features = model.encode_image(images.to(device=device, dtype=dtype))
    return class_probabilities(features, classifier, model.logit_scale.exp()).cpu()


# ----------------------------------------------------------------------------------------------------------------
# Image batches: decoded and preprocessed in DataLoader workers, failures kept as values


@dataclass(frozen=True)
class ImageFailure:
    """An image that could not be used: its key (the path), the :class:`ImageLoadError` reason and message."""

    key: str
    reason: str
    message: str


@dataclass(frozen=True)
class ImageBatch:
    """Preprocessed images [B, 3, S, S] with their positions in the input list, and the failures among them."""

    indices: list[int]
    pixels: torch.Tensor | None
    failures: list[tuple[int, ImageFailure]]


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], transform: ImageTransform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | ImageFailure]:
        path = self.paths[index]
        try:
            return index, self.transform(load_image(path))
        except ImageLoadError as exc:
            return index, ImageFailure(str(path), exc.reason, str(exc))


def _collate(items: list[tuple[int, torch.Tensor | ImageFailure]]) -> ImageBatch:
    good = [(i, x) for i, x in items if isinstance(x, torch.Tensor)]
    failures = [(i, x) for i, x in items if isinstance(x, ImageFailure)]
    pixels = torch.stack([x for _, x in good]) if good else None
    return ImageBatch([i for i, _ in good], pixels, failures)


def iter_image_batches(
    paths: Sequence[Path], transform: ImageTransform, *, batch_size: int = 32, workers: int = 0
) -> Iterator[ImageBatch]:
    """Load and preprocess ``paths`` in order, ``batch_size`` at a time (``workers`` processes decode), so only
    one batch of pixels is held at once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be 0 (load in this process) or more, got {workers}")
    loader = DataLoader(
        _ImageFiles(paths, transform), batch_size=batch_size, num_workers=workers, collate_fn=_collate
    )
    yield from loader


# ----------------------------------------------------------------------------------------------------------------
# Embeddings


@dataclass(frozen=True)
class ImageEmbeddings:
    """Embeddings [N, D] float32 of the images that loaded, their keys (paths), and the images that failed."""

    keys: list[str]
    embeddings: np.ndarray
    failures: list[ImageFailure] = field(default_factory=list)


def _progress(total: int, desc: str, unit: str, enabled: bool):  # a tqdm bar (tqdm is imported lazily)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


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
    result = _encode_images(model, transform, paths, normalize, batch_size, workers, progress)
    if not result.keys and paths:
        raise ValueError(f"all {len(paths)} images failed to load; the first: {result.failures[0].message}")
    return result


@torch.inference_mode()
def _encode_images(
    model: CLIP,
    transform: ImageTransform,
    paths: Sequence[Path],
    normalize: bool,
    batch_size: int,
    workers: int,
    progress: bool,
) -> ImageEmbeddings:
    device, dtype = _model_device_dtype(model)
    keys: list[str] = []
    chunks: list[np.ndarray] = []
    failures: list[ImageFailure] = []
    with _progress(len(paths), "embedding images", "img", progress and bool(paths)) as bar:
        for batch in iter_image_batches(paths, transform, batch_size=batch_size, workers=workers):
            failures += [failure for _, failure in batch.failures]
            if batch.pixels is not None:
                features = model.encode_image(
                    batch.pixels.to(device=device, dtype=dtype), normalize=normalize
                )
                chunks.append(features.float().cpu().numpy())
                keys += [str(paths[i]) for i in batch.indices]
            bar.update(len(batch.indices) + len(batch.failures))
    for failure in failures:
        log.debug("skipped %s (%s)", failure.key, failure.reason)
    width = model.config.embed_dim
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
    return ImageEmbeddings(keys, embeddings.astype(np.float32, copy=False), failures)


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
    device, _ = _model_device_dtype(model)
    chunks = []
    with _progress(len(texts), "embedding texts", "text", progress) as bar:
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            features = model.encode_text(tokenizer(batch).to(device), normalize=normalize)
            chunks.append(features.float().cpu().numpy())
            bar.update(len(batch))
    return np.concatenate(chunks).astype(np.float32, copy=False)


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
    "class_probabilities",
    "classify",
    "embed_images",
    "embed_texts",
    "find_images",
    "iter_image_batches",
    "load_model",
    "read_embeddings",
    "text_classifier",
    "write_embeddings",
]
