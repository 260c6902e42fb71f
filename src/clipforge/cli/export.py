"""`clipforge export onnx MODEL --out DIR`: both towers as ONNX graphs, checked against PyTorch."""

from __future__ import annotations

import argparse
import time


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from clipforge.cli.use import loud_random_weights
    from clipforge.export.onnx import export_onnx

    start = time.perf_counter()
    with loud_random_weights():
        result = export_onnx(args.model, args.out, opset=args.opset, check_batch=args.batch_size_check)
    manifest = result.manifest
    deltas = manifest["parity"]["max_abs_diff"]
    worst = {tower: max(values.values()) for tower, values in deltas.items()}
    print(
        f"exported {manifest['architecture']} to {result.folder} (opset {manifest['opset']}, "
        f"{time.perf_counter() - start:.1f}s): image max |Δ| {worst['image']:.2e}, text {worst['text']:.2e} "
        f"against PyTorch (tolerance {manifest['parity']['tolerance']:g})"
    )
    print(f"use it with: clipforge embed|classify|search|index ... --model {result.folder} (onnxruntime), or "
          f"clipforge.export.runtime.OnnxCLIP('{result.folder}')")  # fmt: skip
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from clipforge.export.manifest import INSTALL_HINT

    p = sub.add_parser("export", help="export a model for deployment (ONNX)")
    formats = p.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser(
        "onnx",
        help="both towers as ONNX graphs with a dynamic batch axis, parity-checked with onnxruntime",
        description=f"Needs onnx and onnxruntime: {INSTALL_HINT}.",
    )
    onnx.add_argument("model", help="checkpoint file or folder, or an architecture name (random weights)")
    onnx.add_argument("--out", required=True, help="folder to write (new, empty, or an earlier export)")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    onnx.add_argument(
        "--batch-size-check", type=int, default=3, help="images and texts in the parity check (default: 3)"
    )
    onnx.set_defaults(func=_cmd_export_onnx)
