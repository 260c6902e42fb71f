"""Distributed helpers: process-group setup from torchrun's environment and an all-gather that carries gradients.

Every helper is a no-op (or the identity) when no process group is initialised, so single-process code calls
them unconditionally.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class DistributedError(RuntimeError):
    """A distributed run is misconfigured, was given inconsistent inputs, or lost one of its processes."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the run. ``backend`` is None when no process group was initialised."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or any ``.module``) wrapper; ``model`` itself otherwise."""
    return getattr(model, "module", model)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def _device_for(local_rank: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedError(
            f"LOCAL_RANK={local_rank} but this node has only {count} visible CUDA device(s); "
            "launch at most one process per GPU (torchrun --nproc-per-node) or set CUDA_VISIBLE_DEVICES"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def dist_timeout_s(default: float = 600.0) -> float:
    """The collective and rendezvous timeout: ``CLIPFORGE_DIST_TIMEOUT_S`` seconds if set, else ``default``."""
    text = os.environ.get("CLIPFORGE_DIST_TIMEOUT_S", "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise DistributedError(f"CLIPFORGE_DIST_TIMEOUT_S={text!r} must be a positive number of seconds")
    return value


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> DistEnv:
    """Initialise the default process group from torchrun's environment and return where this process sits.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without WORLD_SIZE (or with WORLD_SIZE=1)
    this is a single-process run and no process group is created. ``backend`` defaults to nccl when CUDA is
    available, else gloo; with CUDA the current device becomes ``cuda:LOCAL_RANK``. ``timeout_s`` (default
    :func:`dist_timeout_s`) bounds the rendezvous, where a rank that never arrives is named, and every collective,
    so a rank that died makes the others fail instead of waiting forever.
    Raises :class:`DistributedError` for an inconsistent environment.
    """
    if dist.is_available() and dist.is_initialized():
        local_rank = _env_int(os.environ, "LOCAL_RANK") or 0
        return DistEnv(
            dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), _device_for(local_rank)
        )
    env = os.environ
    rank, world_size, local_rank = (_env_int(env, n) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if world_size is None:
        if rank not in (None, 0):
            raise DistributedError(
                f"RANK={rank} is set but WORLD_SIZE is not; launch with torchrun or set WORLD_SIZE too"
            )
        world_size = 1
    if world_size < 1:
        raise DistributedError(f"WORLD_SIZE={world_size} must be at least 1")
    if world_size == 1:
        if rank not in (None, 0):
            raise DistributedError(f"RANK={rank} is out of range for WORLD_SIZE=1")
        return DistEnv(0, 1, local_rank or 0, None, _device_for(local_rank or 0))

    missing = [n for n, v in (("RANK", rank), ("LOCAL_RANK", local_rank)) if v is None]
    missing += [n for n in ("MASTER_ADDR", "MASTER_PORT") if not env.get(n)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with torchrun, "
            "which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
    assert rank is not None and local_rank is not None
    if not 0 <= rank < world_size:
        raise DistributedError(f"RANK={rank} is out of range for WORLD_SIZE={world_size}")
    if local_rank < 0:
        raise DistributedError(f"LOCAL_RANK={local_rank} must be non-negative")
    if env["MASTER_PORT"].strip() == "0":
        raise DistributedError(
            "MASTER_PORT=0: the ranks cannot meet on port 0 (each would wait forever); "
            "use `torchrun --standalone ...` to pick a free port, or give a real --master_port"
        )
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed support")

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise DistributedError("backend 'nccl' needs CUDA, which is not available here; use backend='gloo'")
    device = _device_for(local_rank)
    timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else dist_timeout_s())
    store = _meet(env["MASTER_ADDR"], int(env["MASTER_PORT"]), rank, world_size, timeout)
    prefix = f"clipforge/pg/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore(prefix, store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
    return DistEnv(rank, world_size, local_rank, backend, device)


def _meet(host: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The ranks' shared store, once every rank has checked in; a rank that never arrives within ``timeout``
    is named in a :class:`DistributedError` instead of leaving the others waiting without a word.

    Rank 0 hosts the store unless torchrun's agent already does (TORCHELASTIC_USE_AGENT_STORE)."""
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    where = f"{host}:{port}"
    try:
        store = dist.TCPStore(
            host, port, world_size, is_master=rank == 0 and not hosted_by_agent, timeout=timeout,
            wait_for_workers=False,
        )  # fmt: skip
    except (RuntimeError, OSError) as error:  # DistStoreError is a RuntimeError
        raise DistributedError(
            f"rank {rank}: could not {'open' if rank == 0 else 'reach'} the rendezvous at {where} within "
            f"{timeout.total_seconds():g} s ({_summary(error)}); check MASTER_ADDR/MASTER_PORT and that rank 0 "
            "started"
        ) from error
    prefix = f"clipforge/arrived/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store.set(f"{prefix}/{rank}", "1")
    deadline = time.monotonic() + timeout.total_seconds()
    missing = list(range(world_size))
    while True:
        missing = [r for r in missing if not store.check([f"{prefix}/{r}"])]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if missing:
        names = ", ".join(str(r) for r in missing)
        raise DistributedError(
            f"rank {rank}: rank(s) {names} of {world_size} never joined at {where} within "
            f"{timeout.total_seconds():g} s; check that every rank was launched (same WORLD_SIZE, MASTER_ADDR and "
            "MASTER_PORT) and look at the missing ranks' logs"
        )
    return store


def cleanup() -> None:
    """Destroy the default process group if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank; no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks, detached (for logging). A detached copy of ``x`` without a process group."""
    out = x.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def _check_equal_sizes(x: torch.Tensor, world_size: int, what: str) -> None:
    # Pad the shape to a fixed length so tensors of different rank can still be compared in one collective.
    max_dims = 8
    if x.dim() > max_dims - 1:
        raise DistributedError(f"all_gather_with_grad supports at most {max_dims - 1} dims, got {x.dim()}")
    shape = torch.full((max_dims,), -1, dtype=torch.long, device=x.device)
    shape[0] = x.dim()
    shape[1 : 1 + x.dim()] = torch.tensor(x.shape, dtype=torch.long)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    sizes = [tuple(int(d) for d in s[1 : 1 + int(s[0])]) for s in shapes]
    if any(s != sizes[0] for s in sizes):
        listing = ", ".join(f"rank {r}: {list(s)}" for r, s in enumerate(sizes))
        raise DistributedError(
            f"all_gather_with_grad: {what} must have the same shape (the same local batch size) on every rank, "
            f"got {listing}; drop the last partial batch (drop_last) or pad it"
        )


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.batch = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on every rank's features: sum the gradients, keep this rank's rows.
        # (all_reduce + slice rather than reduce_scatter, which gloo lacks.)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def all_gather_with_grad(x: torch.Tensor, *, what: str = "the tensor") -> torch.Tensor:
    """Concatenate ``x`` [b, ...] from every rank in rank order -> [world_size * b, ...], differentiably.

    The backward pass sums the incoming gradient over ranks and returns this rank's slice, so a loss computed
    on the gathered tensor sends each rank the gradient for its own rows from every rank's loss. Every rank
    must pass the same shape (checked; :class:`DistributedError` names the sizes, and ``what`` was gathered,
    otherwise). The identity without a process group or with one process.
    """
    if not is_distributed():
        return x
    _check_equal_sizes(x, dist.get_world_size(), what)
    return _AllGatherWithGrad.apply(x)


# What gloo / NCCL say when the process at the other end went away or stopped answering.
_PEER_FAILURE = re.compile(
    r"connection (closed|reset|refused|aborted)|(closed|reset) by peer|broken pipe|timed out|timeout|"
    r"ECONNRESET|EPIPE|communicator was aborted",
    re.IGNORECASE,
)


def _summary(error: BaseException) -> str:
    """First sentence of a transport error, without gloo's "[.../pair.cc:545] " source-location prefix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")


@contextmanager
def peer_failure_guard(env: DistEnv) -> Iterator[None]:
    """Turn a collective's failure caused by a dead or hung peer into a :class:`DistributedError`.

    When one rank crashes, the others see an opaque transport error ("Connection closed by peer", a timeout)
    in their next collective. Inside this context such errors become a message telling the reader to look at
    the other ranks' logs for the real cause; every other exception passes through unchanged.
    """
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as error:
        if env.world_size <= 1 or not _PEER_FAILURE.search(str(error)):
            raise
        raise DistributedError(
            f"rank {env.rank}: lost contact with another rank ({_summary(error)}); that rank probably failed: "
            "see its log"
        ) from error
