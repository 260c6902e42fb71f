"""Peak extra memory and time of the contrastive loss, forward + backward: naive (B×B logits) vs chunked.

Each case runs in a fresh subprocess. Method (Linux): allocate the inputs (image and text features [B, D],
L2-normalised, requiring grad, and the scale); run a small warm-up batch through the same code path (one-time
kernel and allocator set-up); measure the resident set size (RSS); reset the kernel's peak-RSS mark (write
"5" to /proc/self/clear_refs); run forward + backward once, timed; read the peak (VmHWM).
"Extra" = peak − RSS with the inputs allocated, so it includes the two feature gradients (2·B·D·4 bytes) and
everything the loss allocates transiently. Where clear_refs is unavailable the peak is ru_maxrss (flagged).
Naive cases whose estimated extra exceeds --max-gb are skipped, with the estimate shown.

    python benchmarks/bench_loss_memory.py
    python benchmarks/bench_loss_memory.py --batches 4096 8192 --dim 512 --max-gb 12
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GIB = 2**30
# Naive forward + backward holds about this many float32 B×B matrices at its peak (measured with this script:
# 4.5 at B = 4096, 4.1 at 8192, 3.8 at 16384).
NAIVE_MATRICES = 4.0


def naive_estimate_bytes(batch: int, dim: int) -> float:
    return NAIVE_MATRICES * 4 * batch * batch + 2 * 4 * batch * dim


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_case(mode: str, batch: int, dim: int, chunk: str, threads: int) -> dict:
    """Child side: one forward + backward, measured as described in the module docstring."""
    import torch
    import torch.nn.functional as F

    from clipforge.losses import auto_chunk_size, contrastive_loss

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)
    chunk_size = None if mode == "naive" else (auto_chunk_size(batch) if chunk == "auto" else int(chunk))
    warm = min(batch, 256)
    contrastive_loss(image[:warm], text[:warm], scale, chunk_size and min(chunk_size, 64)).backward()
    image.grad = text.grad = scale.grad = None

    baseline = _rss_bytes()
    exact_peak = _reset_peak()
    start = time.perf_counter()
    loss = contrastive_loss(image, text, scale, chunk_size)
    forward_s = time.perf_counter() - start
    loss.backward()
    total_s = time.perf_counter() - start
    peak = _peak_rss_bytes() if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "mode": mode,
        "batch": batch,
        "chunk": chunk_size,
        "extra_bytes": peak - baseline,
        "forward_s": forward_s,
        "total_s": total_s,
        "loss": loss.item(),
        "exact_peak": exact_peak,
    }


def spawn_case(mode: str, batch: int, dim: int, chunk: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--batches", str(batch), "--dim", str(dim)]
    cmd += ["--chunk", chunk, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"mode": mode, "batch": batch, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--max-gb", type=float, default=12.0, help="skip naive cases estimated above this")
    parser.add_argument("--chunk", default="auto", help="chunk size for the chunked loss, or 'auto'")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_case(args.child, args.batches[0], args.dim, args.chunk, args.threads)))
        return

    print(__doc__.split("\n\n")[1].strip(), end="\n\n")
    print(f"D = {args.dim}, {args.threads} threads, logit_scale 100, chunk = {args.chunk}\n")
    header = (
        f"{'B':>6} | {'naive extra':>12} {'naive s':>8} | {'chunk':>5} {'chunked extra':>13} {'chunked s':>9} "
        f"| {'mem ratio':>9} {'time ratio':>10} | {'loss naive':>10} {'loss chunked':>12}"
    )
    print(header)
    print("-" * len(header))
    notes = []
    for batch in args.batches:
        estimate = naive_estimate_bytes(batch, args.dim)
        if estimate / GIB > args.max_gb:
            naive = None
            notes.append(
                f"B={batch}: naive skipped, estimated {estimate / GIB:.1f} GiB > --max-gb {args.max_gb:g}"
            )
        else:
            naive = spawn_case("naive", batch, args.dim, args.chunk, args.threads)
        chunked = spawn_case("chunked", batch, args.dim, args.chunk, args.threads)
        for result in (naive, chunked):
            if result and "error" in result:
                notes.append(f"B={batch} {result['mode']}: failed: {result['error']}")
            elif result and not result["exact_peak"]:
                notes.append(f"B={batch} {result['mode']}: peak from ru_maxrss (includes import-time peak)")
        ok = [r is not None and "error" not in r for r in (naive, chunked)]
        naive_cols = (
            f"{naive['extra_bytes'] / GIB:>10.2f} G {naive['total_s']:>8.2f}"
            if ok[0]
            else f"{'~' + format(estimate / GIB, '.1f') + ' G*':>12} {'-':>8}"
        )
        chunked_cols = (
            f"{chunked['chunk']:>5} {chunked['extra_bytes'] / GIB:>11.3f} G {chunked['total_s']:>9.2f}"
            if ok[1]
            else f"{'-':>5} {'-':>13} {'-':>9}"
        )
        if all(ok):
            ratio_cols = (
                f"{naive['extra_bytes'] / chunked['extra_bytes']:>8.1f}x "
                f"{chunked['total_s'] / naive['total_s']:>9.2f}x"
            )
            loss_cols = f"{naive['loss']:>10.6f} {chunked['loss']:>12.6f}"
        else:
            ratio_cols = f"{'-':>9} {'-':>10}"
            loss_cols = f"{'-':>10} " + (f"{chunked['loss']:>12.6f}" if ok[1] else f"{'-':>12}")
        print(f"{batch:>6} | {naive_cols} | {chunked_cols} | {ratio_cols} | {loss_cols}", flush=True)
    print(
        "\nmem ratio = naive extra / chunked extra; time ratio = chunked time / naive time (forward + backward)."
    )
    print("* estimate, not run.")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
