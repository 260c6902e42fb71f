"""The matrix-product ceiling: GFLOP/s of plain ``torch.mm`` in fp32 and bf16 on this device and thread count.

The other benchmarks express their throughput as a fraction of the bf16 figure (they re-measure it in their own
process, since a busy machine moves it). Square products of several sizes, plus two shapes taken from the
models (the ViT-B/32 MLP at batch 32, and the small training config's MLP at batch 256); each figure is the
median of timed samples, each sample enough products to last ~0.2 s.

    python benchmarks/bench_matmul.py
    python benchmarks/bench_matmul.py --quick --json matmul.json
"""

from __future__ import annotations

import argparse

import torch

from common import (
    add_common_arguments,
    describe_machine,
    machine_info,
    matmul_gflops,
    mm_gflops,
    pick_device,
    set_threads,
    table,
    write_json,
)

# (label, M, K, N): activations [M, K] @ weights [K, N], as the models' linear layers run them.
MODEL_SHAPES = [
    ("ViT-B/32 MLP, batch 32 (1600x768 @ 768x3072)", 32 * 50, 768, 3072),
    ("small MLP, batch 256 (16640x192 @ 192x768)", 256 * 65, 192, 768),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="square sizes (default 1024 2048 4096)"
    )
    add_common_arguments(parser, quick_help="sizes 1024 2048 only, fewer samples (~10 s)")
    args = parser.parse_args()
    device = pick_device(args.device)
    threads = set_threads(args.threads)
    info = machine_info(device, threads)
    print(describe_machine(info))
    sizes = args.sizes or ([1024, 2048] if args.quick else [1024, 2048, 4096])
    if device.type == "cuda":
        sizes = args.sizes or [2048, 4096, 8192]
    repeats = 5 if args.quick else 10

    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for size in sizes:
            gflops = matmul_gflops(size, dtype, device, repeats=repeats)
            results.append({"shape": f"{size}x{size} @ {size}x{size}", "dtype": str(dtype), "gflops": gflops})
        for label, m, k, n in MODEL_SHAPES:
            results.append(
                {"shape": label, "dtype": str(dtype), "gflops": mm_gflops(m, k, n, dtype, device, repeats)}
            )
    print(table([[r["shape"], r["dtype"].replace("torch.", ""), f"{r['gflops']:.0f}"] for r in results],
                ["shape", "dtype", "GFLOP/s"]))  # fmt: skip
    ceilings = {
        dtype: max(
            r["gflops"]
            for r in results
            if r["dtype"] == dtype and "@" in r["shape"] and "(" not in r["shape"]
        )
        for dtype in ("torch.float32", "torch.bfloat16")
    }
    print(
        "ceiling (best square): "
        + ", ".join(f"{d.replace('torch.', '')} {g:.0f} GFLOP/s" for d, g in ceilings.items())
    )
    info["load_average_end"] = machine_info(device, threads)["load_average"]
    write_json(args.json, {"machine": info, "results": results, "ceiling_gflops": ceilings})


if __name__ == "__main__":
    main()
