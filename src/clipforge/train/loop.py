"""The contrastive pretraining run: set-up, resume, the step loop, logging, checkpoints, and the run summary.

One entry point, :func:`train`, used by ``clipforge train`` and by Python callers. Launch several processes with
``torchrun --nproc_per_node N -m clipforge train ...``; only rank 0 logs and writes files.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from clipforge.checkpoint import load_checkpoint
from clipforge.checkpoint.towers import fill_tower_weights, split_tower_weights
from clipforge.config import ConfigError, apply_overrides, get_model_config, merge
from clipforge.data.skipguard import SkipPolicy, StreamFailure
from clipforge.data.sources import open_source
from clipforge.data.stream import Batch, SampleDecoder, TrainStream, default_weights
from clipforge.device import autocast_context, intra_op_threads, resolve_device
from clipforge.distributed import DistEnv, all_reduce_mean, init_distributed, peer_failure_guard, unwrap
from clipforge.model import CLIP
from clipforge.objectives import get_objective, save_model
from clipforge.tokenizer import get_tokenizer
from clipforge.train import checkpoint as ckpt
from clipforge.train.config import TrainConfig, loss_model_defaults, train_config_from_dict
from clipforge.train.lock import apply_locks
from clipforge.train.optim import build_optimizer, build_scheduler
from clipforge.train.report import MetricsWriter, write_loss_plot
from clipforge.train.step import apply_update, freeze_temperature
from clipforge.transforms import get_transforms

log = logging.getLogger("clipforge.train")


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. the loss kept being non-finite); the message says why and what to do."""


@dataclass
class HookContext:
    """What an evaluation hook receives (on rank 0, model in eval mode, no gradients)."""

    model: nn.Module  # a CLIP for the contrastive objective; see clipforge.objectives for the others
    step: int
    samples_seen: int
    run_dir: Path


Hook = Callable[[HookContext], dict[str, float] | None]


@dataclass
class RunSummary:
    run_dir: str
    steps: int
    samples_seen: int
    epochs: float | None
    final_loss: float | None
    wall_time_s: float
    samples_per_s: float
    skipped: dict[str, int] = field(default_factory=dict)
    nonfinite_steps: int = 0
    stopped_early: bool = False  # run.time_limit_s ended it before the planned steps
    model_path: str = ""
    resumed_from: str | None = None
    feature_cache: dict[str, dict[str, int]] = field(default_factory=dict)  # locked towers' caches, by tower


def train(
    config: TrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    hooks: Sequence[Hook] = (),
) -> RunSummary:
    """Run contrastive pretraining as ``config`` says, or resume a run; returns the summary rank 0 writes.

    ``resume``: a run folder (its newest checkpoint) or a training checkpoint file. A resumed run uses the
    config saved in the checkpoint; ``overrides`` (dotted keys) may change only the run length (``steps``,
    ``epochs``) and ``run.*`` settings, since anything else would break the exact continuation.
    """
    if config is None and resume is None:
        raise ConfigError("train() needs a config, or resume= a run folder or checkpoint")
    env = init_distributed()
    with peer_failure_guard(env):
        trainer = _Trainer(config, env, resume, overrides or {}, hooks)
        with intra_op_threads(trainer.config.threads):
            return trainer.run()


def _training_device(requested: str, env: DistEnv) -> torch.device:
    """``device`` ("auto", "cpu", "cuda") resolved; on a GPU, this rank's GPU under torchrun."""
    device = resolve_device(requested)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no GPU is available; use device=auto or cpu")
    return env.device if env.device.type == "cuda" else device


class _Trainer:
    def __init__(
        self,
        config: TrainConfig | None,
        env: DistEnv,
        resume: str | Path | None,
        overrides: dict[str, Any],
        hooks: Sequence[Hook],
    ) -> None:
        self.env = env
        self.hooks = list(hooks)
        self.resume_path: Path | None = None
        self.state: dict[str, Any] | None = None
        if resume is not None:
            self.resume_path = ckpt.resolve_resume(Path(resume))
            self.state = ckpt.load_training_checkpoint(self.resume_path)
            config = _resumed_config(self.state, overrides)
        elif overrides:
            config = train_config_from_dict(
                apply_overrides(config.to_dict(), overrides, ("model_overrides",))
            )
        assert config is not None
        self.config = config
        self.device = _training_device(config.device, env)
        loss = config.loss
        options = (
            {"chunk_size": config.loss_chunk_size or None, "loss": loss.kind,
             "label_smoothing": loss.label_smoothing, "multi_positive": loss.multi_positive}
            if config.objective == "contrastive" else {}
        )  # fmt: skip
        self.objective = get_objective(config.objective, **options)
        self.run_dir = self._run_dir()

    # ------------------------------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        cfg, env = self.config, self.env
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        objective = self.objective
        model_config = get_model_config(cfg.model)
        model_overrides = {**loss_model_defaults(cfg, model_config), **_nested(cfg.model_overrides)}
        if model_overrides:
            model_config = merge(model_config, model_overrides)
        if cfg.objective != "contrastive" and (model_config.vision.tower or model_config.text.tower):
            raise ConfigError(f"objective '{cfg.objective}' builds its own towers; pretrained towers (vision.tower, "
                              "text.tower) are for the contrastive objective")  # fmt: skip
        model = objective.build_model(model_config)
        if cfg.init_from:
            if not isinstance(model, CLIP):
                raise ConfigError(f"init_from: only the contrastive objective can start from a CLIP checkpoint, not "
                                  f"objective '{cfg.objective}'")  # fmt: skip
            state = load_checkpoint(cfg.init_from, config=model.config).state_dict()
            if getattr(model, "logit_bias", None) is not None and "logit_bias" not in state:
                state["logit_bias"] = model.logit_bias.detach().clone()  # a softmax CLIP starts a SigLIP run
                log.info(
                    "init_from: %s has no logit_bias; it starts at %g",
                    cfg.init_from,
                    float(state["logit_bias"]),
                )
            model.load_state_dict(state)
        caches = apply_locks(model, cfg.lock)
        if not cfg.loss.learn_temperature:
            freeze_temperature(model)
        model.set_grad_checkpointing(cfg.grad_checkpointing)
        model.to(self.device).train()

        sources = [open_source(spec) for spec in cfg.data.train]
        weights = list(cfg.data.weights) or default_weights(sources)
        dataset_size = _dataset_size(sources)
        total_steps = self._total_steps(dataset_size)
        micro = self._micro_batch_size()

        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, total_steps, cfg.optim)
        scaler = self._grad_scaler()
        start_step, samples_seen, positions, counts, nonfinite_total = 0, 0, {}, Counter(), 0
        if self.state is not None:
            start_step, samples_seen, positions, counts, nonfinite_total = self._restore(
                model, optimizer, scheduler, scaler
            )
        ddp_model = model if env.world_size == 1 else DistributedDataParallel(model)

        tokenizer = get_tokenizer(model)
        deterministic_images = "image" in caches  # a cached image's tensor must be the same every epoch
        if deterministic_images:
            log.info(
                "lock: image features are cached, so training images use the eval transform (no random crop)"
            )
        decoder = SampleDecoder(
            get_transforms(model, train=not deterministic_images),
            caption=cfg.data.caption,
            max_pixels=cfg.data.max_pixels,
            fill_color=model.config.preprocess.fill_color,
            caption_guard=True,
            tag_dropout=cfg.data.tag_dropout,
            tag_shuffle=cfg.data.tag_shuffle,
        )
        stream = TrainStream(
            sources, weights, decoder, tokenizer,
            batch_size=micro, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
            num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
            start_batch=start_step * cfg.accum_steps, positions=positions,
            skip_policy=SkipPolicy(cfg.data.max_skip_fraction, cfg.data.skip_window),
        )  # fmt: skip
        batches = iter(train_loader(stream, cfg.data.num_workers, self.device, cfg.data.loader_timeout_s))
        if self.state is not None:  # after iter(): the DataLoader draws its base seed from torch's RNG
            ckpt.set_rng_state(self.state["rng"])

        metrics = MetricsWriter(
            self.run_dir, enabled=env.is_main, resume_step=start_step if self.state else None
        )
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
            log.info(
                "run %s: %s, %d steps of %d pairs (%d ranks x %d micro-batches of %d), %s",
                self.run_dir, model.config.name, total_steps, cfg.data.batch_size, env.world_size,
                cfg.accum_steps, micro, f"{dataset_size:,} pairs per epoch" if dataset_size else "size unknown",
            )  # fmt: skip
        progress = _progress(total_steps, start_step, enabled=env.is_main and cfg.run.progress)
        autocast = self._autocast()
        started, interval_start = time.perf_counter(), time.perf_counter()
        interval_loss, interval_steps, consecutive_bad, last_loss = 0.0, 0, 0, None
        step = start_step
        planned_steps = total_steps
        for step in range(start_step, planned_steps):
            if step >= total_steps:
                break
            micro_batches = []
            for _ in range(cfg.accum_steps):
                batch = next_batch(batches, step, self.run_dir)
                positions[batch.partition] = batch.position
                counts.update(batch.counts)
                micro_batches.append((batch.images.to(self.device), batch.tokens.to(self.device)))
            loss = objective.compute_gradients(
                ddp_model, micro_batches, autocast, scaler.scale if scaler is not None else None
            )
            result = apply_update(ddp_model, optimizer, loss, cfg.optim.grad_clip, scaler)
            with warnings.catch_warnings():  # a skipped update still advances the schedule, on purpose
                warnings.filterwarnings(
                    "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
                )
                scheduler.step()
            samples_seen += cfg.data.batch_size
            if result.applied:
                consecutive_bad = 0
                interval_loss += float(loss)
                interval_steps += 1
            else:
                consecutive_bad += 1
                nonfinite_total += 1
                log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step + 1,
                            consecutive_bad)  # fmt: skip
                if consecutive_bad >= cfg.run.max_nonfinite:
                    raise TrainingError(
                        f"stopping at step {step + 1}: the loss or gradient was not finite for {consecutive_bad} "
                        "steps in a row; lower optim.lr, use precision=fp32/bf16 instead of fp16, or check the "
                        f"data. Checkpoints so far are in {self.run_dir / 'checkpoints'}"
                    )
            done = step + 1
            if cfg.run.time_limit_s and done < total_steps and _out_of_time(started, cfg.run.time_limit_s):
                log.warning("run.time_limit_s=%g reached after %d of %d steps; stopping early", cfg.run.time_limit_s,
                            done, total_steps)  # fmt: skip
                total_steps = done  # the last step: logged, checkpointed and summarised as the end of the run
            if progress is not None:
                progress.update(1)
            if done % cfg.run.log_every == 0 or done == total_steps:
                elapsed = time.perf_counter() - interval_start
                mean_loss = all_reduce_mean(torch.tensor(interval_loss / max(1, interval_steps))).item()
                last_loss = mean_loss
                record = {
                    "step": done,
                    "samples": samples_seen,
                    "epoch": samples_seen / dataset_size if dataset_size else None,
                    "loss": mean_loss,
                    "logit_scale": _logit_scale(unwrap(ddp_model)),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": result.grad_norm,
                    "samples_per_s": interval_steps * cfg.data.batch_size / max(elapsed, 1e-9),
                    "skipped": self._global_counts(counts),
                    "nonfinite_steps": nonfinite_total,
                }
                if caches:
                    record["feature_cache"] = {tower: cache.stats() for tower, cache in caches.items()}
                metrics.write(record)
                if progress is not None:
                    progress.set_postfix(
                        loss=f"{mean_loss:.3f}", scale=f"{record['logit_scale'] or 0:.1f}", lr=f"{record['lr']:.2e}",
                        pairs_s=f"{record['samples_per_s']:.0f}",
                    )  # fmt: skip
                interval_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()
            if cfg.run.eval_every and done % cfg.run.eval_every == 0:
                self._run_hooks(unwrap(ddp_model), done, samples_seen, metrics)
            if done % cfg.run.checkpoint_every == 0 or done == total_steps:
                self._save(unwrap(ddp_model), optimizer, scheduler, scaler, done, samples_seen, positions, counts,
                           nonfinite_total)  # fmt: skip
        if progress is not None:
            progress.close()
        wall = time.perf_counter() - started
        summary = RunSummary(
            run_dir=str(self.run_dir),
            steps=total_steps,
            stopped_early=total_steps < planned_steps,
            samples_seen=samples_seen,
            epochs=samples_seen / dataset_size if dataset_size else None,
            final_loss=last_loss,
            wall_time_s=wall,
            samples_per_s=(total_steps - start_step) * cfg.data.batch_size / max(wall, 1e-9),
            skipped=self._global_counts(counts),
            nonfinite_steps=nonfinite_total,
            resumed_from=str(self.resume_path) if self.resume_path else None,
            feature_cache={tower: cache.stats() for tower, cache in caches.items()},
        )
        if env.is_main:
            model_path = save_model(unwrap(ddp_model), self.run_dir / "model.safetensors", cfg.objective)
            summary.model_path = str(model_path)
            (self.run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
            write_loss_plot(self.run_dir)
            skipped = ", ".join(f"{k} {v}" for k, v in sorted(summary.skipped.items())) or "none"
            log.info("done: %d steps, final loss %s, skipped: %s; model %s", total_steps,
                     f"{last_loss:.4f}" if last_loss is not None else "n/a", skipped, model_path)  # fmt: skip
            for tower, stats in summary.feature_cache.items():
                log.info("feature cache (%s tower): %d hits, %d misses, %d entries, %.1f MB, %d evicted", tower,
                         stats["hits"], stats["misses"], stats["entries"], stats["bytes"] / 2**20, stats["evicted"])  # fmt: skip
        return summary

    # ------------------------------------------------------------------------------------------------------
    def _run_dir(self) -> Path:
        if self.resume_path is not None:
            return self.resume_path.parent.parent
        cfg = self.config
        name = cfg.run.name or f"{Path(cfg.model).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        if self.env.world_size > 1:  # every rank must agree on the (timestamped) name
            holder = [name]
            dist.broadcast_object_list(holder, src=0)
            name = holder[0]
        run_dir = Path(cfg.run.output_dir) / name
        if self.env.is_main and ckpt.list_checkpoints(run_dir):
            raise ConfigError(
                f"{run_dir} already holds checkpoints of a run; resume it with --resume latest, or choose another "
                "run.name / run.output_dir"
            )
        return run_dir

    def _total_steps(self, dataset_size: int | None) -> int:
        cfg = self.config
        if cfg.steps:
            return cfg.steps
        if not dataset_size:
            raise ConfigError(
                "epochs needs the dataset size, which these sources do not record (no manifest.json); set steps"
            )
        return max(1, math.ceil(cfg.epochs * dataset_size / cfg.data.batch_size))

    def _micro_batch_size(self) -> int:
        cfg = self.config
        per_step = self.env.world_size * cfg.accum_steps
        if cfg.data.batch_size % per_step:
            raise ConfigError(
                f"data.batch_size {cfg.data.batch_size} must be divisible by ranks x accum_steps = {per_step}"
            )
        return cfg.data.batch_size // per_step

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        if self.config.precision != "fp16":
            return None
        if self.device.type != "cuda":
            raise ConfigError(
                "precision: fp16 needs a GPU (it uses a grad scaler); on the CPU use bf16 or fp32"
            )
        return torch.amp.GradScaler("cuda")

    def _autocast(self) -> Callable[[], Any] | None:
        if self.config.precision == "fp32":
            return None
        return functools.partial(autocast_context, self.device, self.config.precision)

    def _restore(self, model, optimizer, scheduler, scaler) -> tuple[int, int, dict[int, int], Counter, int]:
        state = self.state
        assert state is not None
        data = state["data"]
        cfg = self.config
        if (data["world_size"], data["num_workers"]) != (self.env.world_size, cfg.data.num_workers):
            raise ConfigError(
                f"exact resume needs the same ranks x data workers as the saved run ({data['world_size']} x "
                f"{data['num_workers']}), not {self.env.world_size} x {cfg.data.num_workers}: the data stream is "
                "split by both. Relaunch with the saved numbers (--set data.num_workers=...)"
            )
        model.load_state_dict(
            fill_tower_weights(model, state["model"], state.get("towers", {}), self.resume_path)
        )
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        counts = Counter(state["counts"]) if self.env.is_main else Counter()
        positions = {int(k): int(v) for k, v in data["positions"].items()}
        log.info("resumed from %s at step %d", self.resume_path, state["step"])
        return state["step"], state["samples_seen"], positions, counts, state["nonfinite_steps"]

    def _global_counts(self, counts: Counter) -> dict[str, int]:
        if self.env.world_size == 1:
            return dict(sorted(counts.items()))
        gathered: list[dict[str, int]] = [{} for _ in range(self.env.world_size)]
        dist.all_gather_object(gathered, dict(counts))
        total: Counter[str] = Counter()
        for part in gathered:
            total.update(part)
        return dict(sorted(total.items()))

    def _save(
        self, model, optimizer, scheduler, scaler, step, samples_seen, positions, counts, nonfinite
    ) -> None:
        all_positions = dict(positions)
        if self.env.world_size > 1:
            gathered: list[dict[int, int]] = [{} for _ in range(self.env.world_size)]
            dist.all_gather_object(gathered, positions)
            for part in gathered:
                all_positions.update(part)
        total_counts = self._global_counts(counts)
        if not self.env.is_main:
            return
        cfg = self.config
        model_state, towers = split_tower_weights(model)  # tensors still equal to a tower package's stay out
        payload = {
            "config": cfg.to_json(),
            "model_config": model.config.to_json(),
            "samples_seen": samples_seen,
            "model": model_state,
            "towers": towers,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": ckpt.rng_state(),
            "data": {
                "positions": {str(k): v for k, v in sorted(all_positions.items())},
                "world_size": self.env.world_size,
                "num_workers": cfg.data.num_workers,
            },
            "counts": total_counts,
            "nonfinite_steps": nonfinite,
        }
        path = ckpt.save_training_checkpoint(self.run_dir, step, payload, cfg.run.keep_last)
        log.debug("saved %s", path)

    def _run_hooks(self, model: nn.Module, step: int, samples_seen: int, metrics: MetricsWriter) -> None:
        if not self.hooks:
            return
        if self.env.is_main:
            model.eval()
            record: dict[str, Any] = {"step": step, "samples": samples_seen}
            with torch.no_grad():
                for hook in self.hooks:
                    record.update(hook(HookContext(model, step, samples_seen, self.run_dir)) or {})
            metrics.write(record, kind="eval")
            model.train()
        if self.env.world_size > 1:
            dist.barrier()


_RESUME_CHANGEABLE = ("steps", "epochs", "run.")


def _resumed_config(state: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """The saved config with the allowed ``overrides`` (run length and run.* settings) applied."""
    saved = json.loads(state["config"])
    for key in overrides:
        if not key.startswith(_RESUME_CHANGEABLE):
            raise ConfigError(
                f"cannot change '{key}' when resuming: an exact continuation needs the saved model, data and "
                "optimiser settings; only steps, epochs and run.* may change"
            )
    if "steps" in overrides or "epochs" in overrides:
        saved["steps"], saved["epochs"] = 0, 0.0
    return train_config_from_dict(apply_overrides(saved, overrides), where="resumed config")


def _nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """Dotted model overrides ({"vision.layers": 2}) as create_model keyword arguments."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[head] = value
    return nested


def _dataset_size(sources) -> int | None:
    sizes = [s.num_samples() for s in sources]
    return sum(sizes) if all(sizes) else None


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
    )


def next_batch(batches: Iterator[Batch | StreamFailure], step: int, run_dir: Path) -> Batch:
    """The next batch for step ``step`` (0-based), or a :class:`TrainingError` when the data cannot give one: the
    skip guard stopped the stream, or a loader worker died or went silent for ``data.loader_timeout_s``."""
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


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _logit_scale(model: nn.Module) -> float | None:
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().exp()) if scale is not None else None


def _out_of_time(started: float, limit_s: float) -> bool:
    """Whether ``limit_s`` has passed since ``started`` (agreed by all ranks: rank 0's clock decides)."""
    flag = torch.tensor([float(time.perf_counter() - started > limit_s)])
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(flag, src=0)
    return bool(flag.item())
