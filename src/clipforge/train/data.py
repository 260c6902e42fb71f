"""The trainer's data: this rank's stream of batches, its DataLoader, and the one call that fetches the next batch
or says clearly why there is none."""

from __future__ import annotations

import signal
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from clipforge.data.remote import RemoteOptions
from clipforge.data.skipguard import SkipPolicy, StreamFailure
from clipforge.data.sources import Source, with_remote_options
from clipforge.data.stream import Batch, SampleDecoder, TrainStream
from clipforge.distributed import DistEnv
from clipforge.tokenizer import get_tokenizer
from clipforge.train.config import TrainConfig
from clipforge.train.errors import TrainingError
from clipforge.transforms import get_transforms


def build_batches(
    config: TrainConfig,
    model: nn.Module,
    sources: Sequence[Source],
    weights: Sequence[float],
    env: DistEnv,
    device: torch.device,
    *,
    micro_batch_size: int,
    start_step: int,
    positions: Mapping[int, int],
    deterministic_images: bool,
) -> Iterator[Batch | StreamFailure]:
    """This rank's batches from ``start_step`` on (``positions``: each data partition's place, from a checkpoint).
    ``deterministic_images``: training images use the eval transform (a cached locked image tower needs the same
    tensor for the same image every epoch)."""
    data = config.data
    decoder = SampleDecoder(
        get_transforms(model, train=not deterministic_images),
        caption=data.caption,
        max_pixels=data.max_pixels,
        fill_color=model.config.preprocess.fill_color,
        caption_guard=True,
        tag_dropout=data.tag_dropout,
        tag_shuffle=data.tag_shuffle,
    )
    remote = RemoteOptions(data.remote_retries, data.remote_backoff_s)
    stream = TrainStream(
        [with_remote_options(s, remote) for s in sources], weights, decoder, get_tokenizer(model),
        batch_size=micro_batch_size, seed=config.seed, rank=env.rank, world_size=env.world_size,
        num_workers=data.num_workers, shuffle_buffer=data.shuffle_buffer,
        start_batch=start_step * config.accum_steps, positions=positions,
        skip_policy=SkipPolicy(data.max_skip_fraction, data.skip_window),
        resampled=data.resampled, shard_failure=data.shard_failure,
    )  # fmt: skip
    return iter(train_loader(stream, data.num_workers, device, data.loader_timeout_s))


def train_loader(
    stream: TrainStream, num_workers: int, device: torch.device, timeout_s: float = 0.0
) -> Iterator[Batch | StreamFailure]:
    """The trainer's DataLoader over ``stream`` (batches come pre-built; ``benchmarks/bench_data_pipeline.py``
    times this same loader). ``timeout_s`` > 0: a worker that delivers nothing for that long raises."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
        timeout=timeout_s if num_workers else 0,
        worker_init_fn=_worker_signals if num_workers else None,
    )


def _worker_signals(worker_id: int) -> None:
    """A loader worker leaves stopping to the training process: Ctrl-C (sent to the whole process group) is
    ignored, so the trainer can finish its step and checkpoint; SIGTERM keeps its default, so the trainer's
    shutdown of the worker works (the trainer's own SIGTERM handler, inherited by the fork, would swallow it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def next_batch(batches: Iterator[Batch | StreamFailure], step: int, run_dir: Path) -> Batch:
    """The next batch for step ``step`` (0-based), or :class:`TrainingError` when the data cannot give one: the skip
    guard stopped the stream, or a loader worker died or went silent for ``data.loader_timeout_s``."""
    saved = f"Checkpoints so far are in {run_dir / 'checkpoints'}" if step else "No step was taken"
    try:
        batch = next(batches)
    except RuntimeError as error:
        text = str(error)
        if "DataLoader worker" not in text and "DataLoader timed out" not in text:
            raise
        raise TrainingError(
            f"stopping at step {step + 1}: a data-loader worker failed ({text.splitlines()[0]}). A worker killed "
            "by a signal is most often out of memory: lower data.num_workers or data.shuffle_buffer; one that "
            f"timed out (data.loader_timeout_s) is stuck reading its data. {saved}."
        ) from error
    if isinstance(batch, StreamFailure):
        raise TrainingError(f"stopping at step {step + 1}: {batch.message} {saved}.")
    return batch
