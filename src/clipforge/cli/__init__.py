"""The ``clipforge`` command: one sub-command per job, one module per job under ``clipforge/cli/``. Each parses
its arguments and calls the library; nothing here holds logic of its own."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from clipforge.checkpoint import CheckpointError
from clipforge.cli import data, demo, experiment, export, models, train, use
from clipforge.cli import eval as eval_cli
from clipforge.cli import index as index_cli
from clipforge.distributed import DistributedError
from clipforge.train import Preempted, TrainingError

_COMMAND_MODULES = (models, train, data, experiment, use, eval_cli, demo, export, index_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipforge",
        description="Train, evaluate and use CLIP models (contrastive language-image pretraining).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:  # a checkpoint was written; 128 + the signal, as a shell reports a signalled job
        print(f"stopped: {exc}", file=sys.stderr)
        return exc.exit_status
    except (TrainingError, DistributedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


__all__ = ["build_parser", "main"]
