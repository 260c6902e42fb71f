"""The tasks that match images against something: retrieval (images against their captions, Recall@K both ways)
and overlap (evaluation images against the training images, by embedding and perceptual hash)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge.eval.tasks.base import (
    EncodeSettings,
    ModelArg,
    Result,
    Timer,
    describe,
    encode,
    log,
    open_data,
    resolve_model,
)


@dataclass
class RetrievalSettings(EncodeSettings):
    split: str | None = None
    caption_field: tuple[str, ...] | None = None  # caption column(s) (None: detected)
    caption_separator: str | None = None  # split a caption field into several captions
    ks: tuple[int, ...] = (1, 5, 10)


@dataclass
class OverlapSettings(EncodeSettings):
    split: str | None = None  # of the evaluation data
    threshold: float = 0.95  # cosine at or above which a pair is a duplicate
    hash_threshold: int = 6  # perceptual-hash distance at or below which a pair is a duplicate
    top: int = 24  # pairs drawn in overlap.png


class RetrievalTask:
    name = "retrieval"
    Settings = RetrievalSettings

    def run(
        self, model: ModelArg, data: Any, settings: RetrievalSettings, *, out: Path | None = None
    ) -> Result:
        import numpy as np

        from clipforge.eval.features import encode_texts
        from clipforge.eval.retrieval import retrieval_metrics
        from clipforge.tokenizer import get_tokenizer

        elapsed = Timer()
        fields = settings.caption_field if settings.caption_field is None else list(settings.caption_field)
        dataset = open_data(data, settings, settings.split, caption_field=fields,
                            caption_separator=settings.caption_separator)  # fmt: skip
        loaded = resolve_model(model)
        encoded = encode(loaded, dataset, settings)
        skipped = Counter(encoded.skipped)
        keep = [i for i, captions in enumerate(encoded.captions) if captions]
        if len(keep) < len(encoded.captions):
            skipped["no_caption"] += len(encoded.captions) - len(keep)
            log.warning("%d images have no caption and are left out", len(encoded.captions) - len(keep))
        if not keep:
            raise ValueError(f"{data}: no image has a caption; name the caption column with --caption-field")
        texts = [caption for i in keep for caption in encoded.captions[i]]
        text_to_image = np.array([n for n, i in enumerate(keep) for _ in encoded.captions[i]], dtype=np.int64)
        text_features = encode_texts(loaded.module, get_tokenizer(loaded.module), texts,
                                     batch_size=max(settings.batch_size, 256), precision=settings.precision,
                                     progress=not settings.quiet)  # fmt: skip
        metrics = retrieval_metrics(
            encoded.features[keep], text_features, text_to_image, ks=tuple(settings.ks)
        )
        metrics = {**metrics, "num_images": len(keep), "num_captions": len(texts)}
        i2t = ", ".join(f"R@{k} {metrics[f'image_to_text_R@{k}']:.4f}" for k in settings.ks)
        t2i = ", ".join(f"R@{k} {metrics[f'text_to_image_R@{k}']:.4f}" for k in settings.ks)
        lines = [f"image->text: {i2t}", f"text->image: {t2i}", f"({len(keep)} images, {len(texts)} captions)"]
        return Result(self.name, metrics, lines, datasets={"data": describe(dataset)}, checkpoint=loaded.identity,
                      skipped={"data": dict(skipped)}, wall_time_s=elapsed())  # fmt: skip


class OverlapTask:
    name = "overlap"
    Settings = OverlapSettings

    def run(
        self, model: ModelArg, data: Any, settings: OverlapSettings, *, out: Path | None = None
    ) -> Result:
        """``data``: ``{"eval": ..., "train": ...}``; the montage of the closest pairs goes to ``out``."""
        from clipforge.eval.overlap import analyze_overlap, sort_matches
        from clipforge.eval.overlap_montage import overlap_montage

        elapsed = Timer()
        roles = dict(data) if isinstance(data, Mapping) else {"eval": data}
        if roles.get("train") is None:
            raise ValueError(
                "overlap: pass --train-data (the training images) and --data (the evaluation images)"
            )
        eval_set = open_data(roles["eval"], settings, settings.split)
        train_set = open_data(roles["train"], settings, None)
        loaded = resolve_model(model)
        result, _, _ = analyze_overlap(
            ((s.key, s.image) for s in eval_set), ((s.key, s.image) for s in train_set),
            _embedder(loaded.module, settings.precision), batch_size=settings.batch_size,
            cosine_threshold=settings.threshold, hash_threshold=settings.hash_threshold, progress=not settings.quiet,
        )  # fmt: skip
        summary = result.to_dict(top=50)
        metrics = {k: summary[k] for k in ("num_eval", "num_train", "duplicates_by_embedding", "duplicates_by_hash",
                                           "duplicates_either", "fraction_either")}  # fmt: skip
        details: dict[str, Any] = {"overlap": summary}
        lines = [f"overlap: {result.duplicates_either} of {result.num_eval} eval images "
                 f"({100 * result.fraction_either:.2f}%) have a near-duplicate in training "
                 f"(cosine >= {settings.threshold} or hash distance <= {settings.hash_threshold})"]  # fmt: skip
        figures = []
        if out is not None:
            closest = sort_matches(result.nearest, "cosine")[: settings.top]
            eval_images = eval_set.load_images([m.eval_key for m in closest])
            train_images = train_set.load_images([m.train_key for m in closest])
            eval_keys = {m.eval_index: m.eval_key for m in closest}
            train_keys = {m.train_index: m.train_key for m in closest}
            Path(out).mkdir(parents=True, exist_ok=True)
            montage = overlap_montage(closest, lambda i: eval_images[eval_keys[i]],
                                      lambda i: train_images[train_keys[i]], Path(out) / "overlap.png",
                                      top=settings.top, cosine_threshold=settings.threshold,
                                      hash_threshold=settings.hash_threshold)  # fmt: skip
            details["montage"] = str(montage)
            lines.append(f"montage: {montage}")
            figures.append(montage)
        return Result(self.name, metrics, lines, datasets={"eval": describe(eval_set), "train": describe(train_set)},
                      checkpoint=loaded.identity, details=details, figures=figures, wall_time_s=elapsed(),
                      skipped={"eval": dict(eval_set.skipped), "train": dict(train_set.skipped)})  # fmt: skip


def _embedder(model: Any, precision: str) -> Any:
    """PIL images -> normalised features float32 [B, D] (one batch), for the overlap search."""
    import torch

    from clipforge.features import encode_image_tensor
    from clipforge.transforms import get_transforms

    transform = get_transforms(model)

    def embed(images: list[Any]) -> Any:
        batch = torch.stack([transform(image) for image in images])
        return encode_image_tensor(model, batch, batch_size=len(batch), precision=precision).numpy()

    return embed
