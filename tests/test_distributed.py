"""Distributed helpers and the gathered loss, with real processes on gloo (localhost, environment-variable init).

One 2-process run checks the gather, DDP-vs-single-process parity (naive and chunked loss) and the unequal-size
error; three more runs kill, crash or hang one rank and check that the survivor fails fast with a clear message.
Children are spawned (not forked), joined with a deadline and killed if still alive.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from clipforge.distributed import (
    DistEnv,
    DistributedError,
    all_gather_with_grad,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    peer_failure_guard,
)
from clipforge.losses import ContrastiveLoss
from clipforge.model import create_model
from tests.conftest import random_images, random_tokens

WORLD = 2
GLOBAL_BATCH = 8
DTYPES = (torch.float32, torch.float64)
CHUNK = 3  # uneven chunks of each rank's 4 rows
EOT = 49407
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _set_torchrun_env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        CUDA_VISIBLE_DEVICES="",
    )
    torch.set_num_threads(1)


def _run_ranks(target, args: tuple, world: int = WORLD, deadline_s: float = 90.0) -> list[int | None]:
    """Start ``target(rank, world, port, *args)`` in ``world`` spawned processes; return their exit codes.

    Processes still alive at the deadline are killed (their exit code is then negative, never None).
    """
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=target, args=(rank, world, port, *args), daemon=True) for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    end = time.monotonic() + deadline_s
    try:
        for proc in procs:
            proc.join(max(0.0, end - time.monotonic()))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return [proc.exitcode for proc in procs]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = random_images(GLOBAL_BATCH, 32, seed=1)
    tokens = random_tokens(GLOBAL_BATCH, 32, seed=2, vocab_size=EOT + 1)
    assert (tokens == EOT).sum(dim=1).eq(1).all()
    return images, tokens


def _tiny_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("tiny", vision={"layers": 1}, text={"layers": 1}, dtype=dtype)


def _loss_and_grads(
    model, images, tokens, chunk_size, reduce
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = ContrastiveLoss(chunk_size=chunk_size)(*model(images, tokens))
    loss.backward()
    module = getattr(model, "module", model)
    return reduce(loss), {name: p.grad.clone() for name, p in module.named_parameters()}


def _main_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _set_torchrun_env(rank, world, port)
    results: dict = {}
    try:
        env = init_distributed(backend="gloo", timeout_s=60)
        results["env"] = env
        local = GLOBAL_BATCH // world
        rows = slice(rank * local, (rank + 1) * local)

        # (1) all_gather_with_grad: forward concatenates in rank order, backward sums every rank's gradient.
        x = (torch.arange(6.0).reshape(3, 2) + 10 * rank).requires_grad_()
        gathered = all_gather_with_grad(x)
        weights = torch.randn(gathered.shape, generator=torch.Generator().manual_seed(100 + rank))
        (gathered * weights).sum().backward()
        results["gathered"], results["gather_grad"] = gathered.detach(), x.grad

        # (2) DDP on half the batch each == one process on the whole batch.
        images, tokens = _batch()
        for dtype in DTYPES:
            model = torch.nn.parallel.DistributedDataParallel(_tiny_model(dtype))
            for chunk in (None, CHUNK):
                results[f"ddp_{dtype}_{chunk}"] = _loss_and_grads(
                    model, images[rows].to(dtype), tokens[rows], chunk, all_reduce_mean
                )

        # (3) unequal local batch sizes are refused on every rank, naming the sizes.
        for name, call in (
            ("gather", lambda: all_gather_with_grad(torch.zeros(2 + rank, 5))),
            ("loss", lambda: ContrastiveLoss()(torch.zeros(2 + rank, 5), torch.zeros(2 + rank, 5), 1.0)),
        ):
            try:
                call()
                results[f"unequal_{name}"] = None
            except DistributedError as error:
                results[f"unequal_{name}"] = str(error)
        barrier()
        cleanup()
    except BaseException:
        results["error"] = traceback.format_exc()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("dist")
    exitcodes = _run_ranks(_main_worker, (str(out_dir),))
    results = []
    for rank in range(WORLD):
        path = out_dir / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} wrote no results (exit codes {exitcodes})"
        with torch.serialization.safe_globals([DistEnv]):  # our own dataclass; nothing else may unpickle
            result = torch.load(path, weights_only=True)
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"
        results.append(result)
    assert exitcodes == [0] * WORLD
    return results


@pytest.mark.slow
def test_init_distributed_reads_torchrun_env(two_rank_results):
    for rank, result in enumerate(two_rank_results):
        env = result["env"]
        assert env == DistEnv(rank, WORLD, rank, "gloo", torch.device("cpu"))
        assert env.is_main == (rank == 0)


@pytest.mark.slow
def test_all_gather_with_grad_matches_single_process(two_rank_results):
    inputs = [(torch.arange(6.0).reshape(3, 2) + 10 * r).requires_grad_() for r in range(WORLD)]
    concatenated = torch.cat(inputs)
    loss = sum(
        (
            concatenated * torch.randn(concatenated.shape, generator=torch.Generator().manual_seed(100 + r))
        ).sum()
        for r in range(WORLD)
    )
    loss.backward()
    for rank, result in enumerate(two_rank_results):
        assert torch.equal(result["gathered"], concatenated.detach())
        assert torch.allclose(result["gather_grad"], inputs[rank].grad, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [None, CHUNK])
def test_two_ranks_with_ddp_match_one_process_on_the_whole_batch(two_rank_results, chunk, dtype):
    # float64 shows the gradients are the same quantity (1e-10); float32 that rounding stays at float32 level
    # (batch 4 vs 8 and 1 vs 2 threads change summation orders: measured ≤ 1e-6 relative to the largest grad).
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    images, tokens = _batch()
    model = _tiny_model(dtype)
    expected_loss, expected_grads = _loss_and_grads(
        model, images.to(dtype), tokens, chunk, torch.Tensor.detach
    )
    for rank, result in enumerate(two_rank_results):
        loss, grads = result[f"ddp_{dtype}_{chunk}"]
        assert abs(loss.item() - expected_loss.item()) <= tol, f"rank {rank}: loss {loss} vs {expected_loss}"
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            expected = expected_grads[name]
            err = (grad - expected).abs().max().item() / max(1.0, expected.abs().max().item())
            assert err <= tol, f"rank {rank}: grad of {name} differs by {err:.3g} (relative)"
    assert expected_grads["logit_scale"].abs().item() > 1e-4  # the scale's gradient is compared, not zero


@pytest.mark.slow
def test_unequal_local_batch_sizes_raise_naming_the_sizes(two_rank_results):
    for result in two_rank_results:
        # The loss gathers both towers at once, as one [b, 2 * D] tensor, and says so.
        for name, dim in (("gather", 5), ("loss", 10)):
            message = result[f"unequal_{name}"]
            assert message is not None, f"{name}: no error for unequal sizes"
            assert f"rank 0: [2, {dim}], rank 1: [3, {dim}]" in message, message
        assert "[image_features | text_features]" in result["unequal_loss"]


def _failing_worker(rank: int, world: int, port: int, out_dir: str, mode: str, failing_rank: int) -> None:
    _set_torchrun_env(rank, world, port)
    env = init_distributed(backend="gloo", timeout_s=3 if mode == "hang" else 30)
    probe = torch.ones(4)
    all_gather_with_grad(probe)  # the group works
    if rank == failing_rank:
        if mode == "exit":
            os._exit(3)
        if mode == "hang":  # alive but never joins the collective; leave once the survivor has reported
            survivor_report = Path(out_dir) / f"rank{1 - rank}.pt"
            deadline = time.monotonic() + 30
            while not survivor_report.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            os._exit(0)
        raise ValueError("simulated crash in the training step")
    start = time.monotonic()
    outcome = "no error"
    try:
        with peer_failure_guard(env):
            all_reduce_mean(probe)
    except DistributedError as error:
        outcome = str(error)
    except Exception as error:
        outcome = f"unexpected {type(error).__name__}: {error}"
    torch.save({"message": outcome, "seconds": time.monotonic() - start}, Path(out_dir) / f"rank{rank}.pt")
    os._exit(0)  # the group is broken: skip destroy_process_group, which could wait on the dead peer


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "failing_rank"), [("raise", 1), ("exit", 0), ("hang", 1)])
def test_dead_or_hung_rank_makes_the_survivor_fail_fast(tmp_path, mode, failing_rank):
    survivor = 1 - failing_rank
    exitcodes = _run_ranks(_failing_worker, (str(tmp_path), mode, failing_rank), deadline_s=60)
    assert exitcodes[survivor] == 0, exitcodes
    result = torch.load(tmp_path / f"rank{survivor}.pt")
    assert result["message"].startswith(f"rank {survivor}: lost contact with another rank"), result["message"]
    assert result["message"].endswith("that rank probably failed: see its log")
    assert result["seconds"] < 30


# ---- single-process behaviour (no spawn) ----


@pytest.fixture
def clean_env(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_env_without_torchrun(clean_env):
    env = init_distributed()
    assert (env.rank, env.world_size, env.backend, env.is_main) == (0, 1, None, True)
    clean_env.setenv("WORLD_SIZE", "1")
    clean_env.setenv("RANK", "0")
    assert init_distributed().world_size == 1
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"),
        (
            {"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"},
            "RANK=2 is out of range for WORLD_SIZE=2",
        ),
    ],
)
def test_bad_env_raises_clear_error(clean_env, variables, message):
    for name, value in variables.items():
        clean_env.setenv(name, value)
    with pytest.raises(DistributedError, match=message):
        init_distributed()


def test_helpers_are_identities_without_a_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x
    mean = all_reduce_mean(x)
    assert torch.equal(mean, x) and not mean.requires_grad
    barrier()
    cleanup()


def test_peer_failure_guard_translates_only_transport_errors():
    env = DistEnv(1, 2, 1, "gloo", torch.device("cpu"))
    gloo = (
        "[/src/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:2734. This is typically"
    )
    with (
        pytest.raises(DistributedError, match=r"^rank 1: lost contact .*\(Connection closed by peer") as info,
        peer_failure_guard(env),
    ):
        raise RuntimeError(gloo)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="shape mismatch"), peer_failure_guard(env):
        raise RuntimeError("shape mismatch")
    with pytest.raises(ValueError, match="timed out"), peer_failure_guard(env):
        raise ValueError("timed out")
    with (
        pytest.raises(RuntimeError, match="Connection reset"),
        peer_failure_guard(DistEnv(0, 1, 0, None, env.device)),
    ):
        raise RuntimeError("Connection reset by peer")
