"""The contrastive pretraining run, in three visible phases: build the run (:meth:`_Trainer.build`), one training
step (:meth:`_Trainer.step`), and the loop that calls the logger, the evaluation hooks and the checkpointer
(:meth:`_Trainer.run`), then the summary (:meth:`_Trainer.finish`).

One entry point, :func:`train`, used by ``clipforge train`` and by Python callers. Launch several processes with
``torchrun --nproc_per_node N -m clipforge train ...``; only rank 0 logs and writes files. SIGTERM / SIGINT stop
the run after the current step with a checkpoint (:mod:`clipforge.train.preempt`).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clipforge.config import ConfigError, apply_overrides
from clipforge.data.skipguard import StreamFailure
from clipforge.data.sources import open_source
from clipforge.data.stream import Batch, default_weights
from clipforge.device import intra_op_threads
from clipforge.distributed import DistEnv, all_reduce_mean, init_distributed, peer_failure_guard
from clipforge.files import atomic_write_text
from clipforge.model.compile import compile_module
from clipforge.objectives import objective_for, save_model
from clipforge.train import checkpoint as ckpt
from clipforge.train import fsdp, setup
from clipforge.train.config import TrainConfig, train_config_from_dict
from clipforge.train.data import build_batches, next_batch
from clipforge.train.errors import Preempted, TrainingError
from clipforge.train.feature_cache import FeatureCache
from clipforge.train.loggers import open_reporters
from clipforge.train.optim import build_optimizer, build_scheduler
from clipforge.train.preempt import StopSignals, agreed_drop, agreed_signal, agreed_time_over
from clipforge.train.report import MetricsWriter, write_loss_plot
from clipforge.train.state import Counters, Optimization, checkpoint_payload, global_counts, restore
from clipforge.train.step import UpdateResult, apply_update

log = logging.getLogger("clipforge.train")

__all__ = ["Hook", "HookContext", "Preempted", "RunSummary", "TrainingError", "train"]


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

    ``resume``: a run folder (its newest intact checkpoint) or a training checkpoint file. A resumed run uses the
    config saved in the checkpoint; ``overrides`` (dotted keys) may change only the run length (``steps``,
    ``epochs``) and ``run.*`` settings, since anything else would break the exact continuation. Raises
    :class:`TrainingError` when the run cannot go on, :class:`Preempted` after SIGTERM / SIGINT.
    """
    if config is None and resume is None:
        raise ConfigError("train() needs a config, or resume= a run folder or checkpoint")
    env = init_distributed()
    with peer_failure_guard(env):
        trainer = _Trainer(config, env, resume, overrides or {}, hooks)
        with intra_op_threads(trainer.config.threads):
            return trainer.run()


@dataclass
class _Run:
    """A built run: what the step and the loop work on."""

    model: nn.Module  # the bare model (saved, evaluated)
    # What the step runs: the model, DistributedDataParallel-wrapped with several ranks (with parallel=fsdp: the
    # model itself, sharded in place).
    ddp_model: nn.Module
    optim: Optimization
    batches: Iterator[Batch | StreamFailure]
    caches: dict[str, FeatureCache]
    metrics: MetricsWriter
    bar: Any  # tqdm, or None
    autocast: Callable[[], Any] | None
    dataset_size: int | None
    planned_steps: int
    total_steps: int  # planned_steps, or fewer once run.time_limit_s ran out
    counters: Counters
    start_step: int
    started: float = field(default_factory=time.perf_counter)
    last_loss: float | None = None
    bad_in_a_row: int = 0
    saved_step: int = -1  # the step of the newest checkpoint this process wrote


@dataclass
class _Step:
    loss: float
    update: UpdateResult
    keys: list[tuple[str, str]]  # the samples of the step's batch on this rank: (source, key)


class _Interval:
    """The steps since the last metrics line: their mean loss and throughput."""

    def __init__(self) -> None:
        self.loss, self.steps, self.start = 0.0, 0, time.perf_counter()


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
            self.resume_path, self.state = ckpt.load_resume(Path(resume))
            config = setup.resumed_config(self.state, overrides)
        elif overrides:
            config = train_config_from_dict(
                apply_overrides(config.to_dict(), overrides, ("model_overrides",))
            )
        assert config is not None
        self.config = config
        self.device = setup.training_device(config.device, env)
        self.objective = objective_for(config)
        self.run_dir = setup.run_folder(config, env, self.resume_path)

    # -- phase 1: build the run -----------------------------------------------------------------------------
    def build(self) -> _Run:
        cfg, env = self.config, self.env
        model, caches = setup.build_model(cfg, self.objective, self.device)
        if cfg.parallel == "fsdp":  # before the optimizer, which must hold the sharded parameters
            fsdp.shard_model(model, cfg, env, caches, self.device)
        sources = [open_source(spec) for spec in cfg.data.train]
        dataset_size = setup.dataset_size(sources, cfg)
        total_steps = setup.total_steps(cfg, dataset_size)
        optimizer = build_optimizer(model, cfg.optim)
        optim = Optimization(
            optimizer, build_scheduler(optimizer, total_steps, cfg.optim), setup.grad_scaler(cfg, self.device)
        )
        counters = Counters()
        if self.state is not None:
            assert self.resume_path is not None
            counters = restore(self.state, model, optim, cfg, env, self.resume_path)
        ddp_model = model if env.world_size == 1 or fsdp.is_sharded(model) else DistributedDataParallel(model)
        if cfg.compile:
            ddp_model = compile_module(ddp_model, self.device)
        deterministic = "image" in caches  # a cached image's tensor must be the same every epoch
        if deterministic:
            log.info(
                "lock: image features are cached, so training images use the eval transform (no random crop)"
            )
        batches = build_batches(
            cfg, model, sources, list(cfg.data.weights) or default_weights(sources), env, self.device,
            micro_batch_size=setup.micro_batch_size(cfg, env), start_step=counters.step,
            positions=counters.positions, deterministic_images=deterministic,
        )  # fmt: skip
        if self.state is not None:  # after iter(): the DataLoader draws its base seed from torch's RNG
            ckpt.set_rng_state(self.state["rng"])
        resume_step = counters.step if self.state else None
        metrics = MetricsWriter(
            self.run_dir, enabled=env.is_main, resume_step=resume_step,
            reporters=lambda: open_reporters(self.run_dir, cfg.run, cfg.to_json(), resume_step),
        )  # fmt: skip
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
            log.info(
                "run %s: %s, %d steps of %d pairs (%d ranks x %d micro-batches of %d), %s",
                self.run_dir, model.config.name, total_steps, cfg.data.batch_size, env.world_size,
                cfg.accum_steps, setup.micro_batch_size(cfg, env),
                f"{dataset_size:,} pairs per epoch" if dataset_size else "size unknown",
            )  # fmt: skip
        bar = _progress(total_steps, counters.step, enabled=env.is_main and cfg.run.progress)
        return _Run(
            model, ddp_model, optim, batches, caches, metrics, bar, setup.autocast_for(cfg, self.device),
            dataset_size, total_steps, total_steps, counters, start_step=counters.step,
        )  # fmt: skip

    # -- phase 2: one training step -------------------------------------------------------------------------
    def fetch(self, run: _Run, signals: StopSignals) -> list[Batch] | None:
        """The step's micro-batches, or None when the step is dropped: a loader worker died with a stop signal on
        this rank, or on any rank (they agree, so no rank starts a step whose collectives another never joins)."""
        try:
            batches: list[Batch] | None = [
                next_batch(run.batches, run.counters.step, self.run_dir)
                for _ in range(self.config.accum_steps)
            ]
        except TrainingError:
            if signals.signum is None:
                raise
            batches = None  # a loader worker died with the signal
        return None if agreed_drop(batches is None, self.device) else batches

    def step(self, run: _Run, batches: list[Batch]) -> _Step:
        """Accumulate the gradient of the step's micro-batches, update; counters move only here, so a dropped step
        leaves them at the last finished step."""
        cfg, counters = self.config, run.counters
        for batch in batches:
            counters.positions[batch.partition] = batch.position
            counters.counts.update(batch.counts)
        micro_batches = [(b.images.to(self.device), b.tokens.to(self.device)) for b in batches]
        scaler = run.optim.scaler
        loss = self.objective.compute_gradients(
            run.ddp_model, micro_batches, run.autocast, scaler.scale if scaler is not None else None
        )
        update = apply_update(
            run.ddp_model, run.optim.optimizer, loss, cfg.optim.grad_clip, scaler, self.objective.after_update
        )
        with warnings.catch_warnings():  # a skipped update still advances the schedule, on purpose
            warnings.filterwarnings(
                "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
            )
            run.optim.scheduler.step()
        counters.step += 1
        counters.samples_seen += cfg.data.batch_size
        return _Step(float(loss), update, [key for batch in batches for key in batch.keys])

    # -- phase 3: the loop ----------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        run = self.build()
        counters, interval = run.counters, _Interval()
        try:
            with StopSignals() as signals:
                while counters.step < run.total_steps:
                    batches = self.fetch(run, signals)
                    if batches is not None:
                        interval = self.after_step(run, self.step(run, batches), interval)
                    signum = agreed_signal(signals, self.device)
                    if signum and counters.step < run.total_steps:
                        raise Preempted(signum, counters.step, self._preempted_checkpoint(run))
            return self.finish(run)
        finally:
            run.metrics.close()  # reporters flushed and closed, also when the run stops with an error

    def after_step(self, run: _Run, result: _Step, interval: _Interval) -> _Interval:
        """What follows a step: the finite check, the time limit, progress, the metrics line, the evaluation
        hooks, the checkpoint. Returns the interval the next metrics line counts (a new one after a line)."""
        cfg, done = self.config, run.counters.step
        self._check_finite(run, result, interval)
        self._apply_time_limit(run)
        if run.bar is not None:
            run.bar.update(1)
        if done % cfg.run.log_every == 0 or done == run.total_steps:
            self._log(run, result, interval)
            interval = _Interval()
        if cfg.run.eval_every and done % cfg.run.eval_every == 0:
            self._run_hooks(run)
        if done % cfg.run.checkpoint_every == 0 or done == run.total_steps:
            self._save(run)
        return interval

    # -- what the loop calls --------------------------------------------------------------------------------
    def _apply_time_limit(self, run: _Run) -> None:
        """Once ``run.time_limit_s`` has passed, the step just taken becomes the last: logged, checkpointed and
        summarised as the end of the run."""
        done, limit = run.counters.step, self.config.run.time_limit_s
        if agreed_time_over(run.started, limit, self.device) and done < run.total_steps:
            log.warning("run.time_limit_s=%g reached after %d of %d steps; stopping early", limit, done,
                        run.total_steps)  # fmt: skip
            run.total_steps = done

    def _check_finite(self, run: _Run, result: _Step, interval: _Interval) -> None:
        """Count the step's loss into the interval, or count it as skipped; too many in a row stop the run."""
        if result.update.applied:
            run.bad_in_a_row = 0
            interval.loss += result.loss
            interval.steps += 1
            return
        run.bad_in_a_row += 1
        run.counters.nonfinite_steps += 1
        step = run.counters.step
        log.warning(
            "step %d: non-finite loss or gradient; update skipped (%d in a row)", step, run.bad_in_a_row
        )
        if run.bad_in_a_row >= self.config.run.max_nonfinite:
            keys = self.run_dir / f"nonfinite-step_{step:08d}-rank_{self.env.rank}.json"
            keys.parent.mkdir(parents=True, exist_ok=True)
            keys.write_text(
                json.dumps({"step": step, "rank": self.env.rank, "samples": result.keys}, indent=1)
            )
            first = ", ".join(f"{source} {key}" for source, key in result.keys[:3])
            raise TrainingError(
                f"stopping at step {step}: the loss or gradient was not finite for {run.bad_in_a_row} steps in a "
                f"row; lower optim.lr, use precision=fp32/bf16 instead of fp16, or check the data. The last "
                f"batch's {len(result.keys)} samples on this rank are listed in {keys} (first: {first}). "
                f"Checkpoints so far are in {self.run_dir / 'checkpoints'}"
            )

    def _log(self, run: _Run, result: _Step, interval: _Interval) -> None:
        cfg, counters = self.config, run.counters
        elapsed = time.perf_counter() - interval.start
        mean_loss = all_reduce_mean(torch.tensor(interval.loss / max(1, interval.steps))).item()
        run.last_loss = mean_loss
        record = {
            "step": counters.step,
            "samples": counters.samples_seen,
            "epoch": counters.samples_seen / run.dataset_size if run.dataset_size else None,
            "loss": mean_loss,
            "logit_scale": _logit_scale(run.model),
            "lr": run.optim.scheduler.get_last_lr()[0],
            "grad_norm": result.update.grad_norm,
            "samples_per_s": interval.steps * cfg.data.batch_size / max(elapsed, 1e-9),
            "skipped": global_counts(counters.counts, self.env),
            "nonfinite_steps": counters.nonfinite_steps,
        }
        if run.caches:
            record["feature_cache"] = {tower: cache.stats() for tower, cache in run.caches.items()}
        run.metrics.write(record)
        if run.bar is not None:
            run.bar.set_postfix(
                loss=f"{mean_loss:.3f}", scale=f"{record['logit_scale'] or 0:.1f}", lr=f"{record['lr']:.2e}",
                pairs_s=f"{record['samples_per_s']:.0f}",
            )  # fmt: skip

    def _run_hooks(self, run: _Run) -> None:
        if not self.hooks:
            return
        model, counters = self._whole_model(run), run.counters
        if self.env.is_main:
            model.to(self.device).eval()
            record: dict[str, Any] = {"step": counters.step, "samples": counters.samples_seen}
            with torch.no_grad():
                for hook in self.hooks:
                    context = HookContext(model, counters.step, counters.samples_seen, self.run_dir)
                    record.update(hook(context) or {})
            run.metrics.write(record, kind="eval")
            model.train()
        if self.env.world_size > 1:
            torch.distributed.barrier()

    def _save(self, run: _Run) -> Path:
        """Checkpoint the current step (a collective); a failed write (disk full) stops the run, the previous
        checkpoint intact."""
        step, sharded = run.counters.step, fsdp.is_sharded(run.model)
        payload = checkpoint_payload(run.model, run.optim, run.counters, self.config, self.env)
        path = ckpt.checkpoint_path(self.run_dir, step, sharded)
        if payload is None and not sharded:
            run.saved_step = step
            return path
        previous = ckpt.list_checkpoints(self.run_dir)
        try:
            if sharded:  # every rank writes its shards
                fsdp.save_sharded_checkpoint(
                    self.run_dir, step, run.model, run.optim.optimizer, payload, self.config.run.keep_last
                )
            else:
                ckpt.save_training_checkpoint(self.run_dir, step, payload, self.config.run.keep_last)
        except OSError as exc:
            kept = (
                f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint"
            )
            raise TrainingError(
                f"stopping at step {step}: could not write the checkpoint {path} ({exc.strerror or exc}); nothing "
                f"partial was left and {kept}. Free space on {self.run_dir} (or move the run folder), then "
                "--resume latest"
            ) from exc
        run.saved_step = step
        log.debug("saved %s", path)
        return path

    def _preempted_checkpoint(self, run: _Run) -> Path | None:
        """The checkpoint holding the last finished step, written now unless it already exists (None: a fresh run
        that took no step)."""
        if run.bar is not None:
            run.bar.close()
        step = run.counters.step
        if step == run.saved_step:
            return ckpt.checkpoint_path(self.run_dir, step, fsdp.is_sharded(run.model))
        if step == run.start_step:
            return self.resume_path
        return self._save(run)

    # -- phase 4: the summary -------------------------------------------------------------------------------
    def finish(self, run: _Run) -> RunSummary:
        if run.bar is not None:
            run.bar.close()
        counters, cfg = run.counters, self.config
        wall = time.perf_counter() - run.started
        summary = RunSummary(
            run_dir=str(self.run_dir),
            steps=run.total_steps,
            stopped_early=run.total_steps < run.planned_steps,
            samples_seen=counters.samples_seen,
            epochs=counters.samples_seen / run.dataset_size if run.dataset_size else None,
            final_loss=run.last_loss,
            wall_time_s=wall,
            samples_per_s=(run.total_steps - run.start_step) * cfg.data.batch_size / max(wall, 1e-9),
            skipped=global_counts(counters.counts, self.env),
            nonfinite_steps=counters.nonfinite_steps,
            resumed_from=str(self.resume_path) if self.resume_path else None,
            feature_cache={tower: cache.stats() for tower, cache in run.caches.items()},
        )
        model = self._whole_model(run)
        if self.env.is_main:
            self._write_results(run, summary, model)
        return summary

    def _whole_model(self, run: _Run) -> nn.Module:
        """The model with every weight, on rank 0: the model itself, or a sharded one gathered (a collective)."""
        if not fsdp.is_sharded(run.model):
            return run.model
        return fsdp.export_model(run.model, self.objective)  # type: ignore[return-value]

    def _write_results(self, run: _Run, summary: RunSummary, model: nn.Module) -> None:
        try:
            summary.model_path = str(
                save_model(model, self.run_dir / "model.safetensors", self.config.objective)
            )
            atomic_write_text(self.run_dir / "summary.json", json.dumps(asdict(summary), indent=2) + "\n")
            write_loss_plot(self.run_dir)
        except OSError as exc:
            raise TrainingError(
                f"the run finished but its results could not be written to {self.run_dir} ({exc.strerror or exc});"
                f" the last checkpoint is intact: free space, then --resume latest writes them again"
            ) from exc
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(summary.skipped.items())) or "none"
        last = f"{run.last_loss:.4f}" if run.last_loss is not None else "n/a"
        log.info("done: %d steps, final loss %s, skipped: %s; model %s", summary.steps, last, skipped,
                 summary.model_path)  # fmt: skip
        for tower, stats in summary.feature_cache.items():
            log.info("feature cache (%s tower): %d hits, %d misses, %d entries, %.1f MB, %d evicted", tower,
                     stats["hits"], stats["misses"], stats["entries"], stats["bytes"] / 2**20, stats["evicted"])  # fmt: skip


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _logit_scale(model: nn.Module) -> float | None:
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().exp()) if scale is not None else None
