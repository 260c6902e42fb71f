"""The long fuzz run: one target of ``tests/fuzz_targets.py`` for a given time; prints executions and findings.

    python scripts/fuzz.py --target shard_tar --seconds 60            # atheris if installed, else mutation
    python scripts/fuzz.py --target all --seconds 60 --engine mutate  # every target in turn, no atheris

Engines: ``atheris`` (coverage-guided libFuzzer, ``pip install -e .[fuzz]``; clipforge's modules are
instrumented, the seeds are its starting corpus) and ``mutate`` (random byte/text mutations of the real seeds,
tar checksums repaired half the time). Each execution runs under the targets' contract (``check``): allowed
error types only, an answer within ``--timeout`` seconds, and the process's address space capped at its size
after imports plus ``--memory-mib`` (so a parse that allocates from an unchecked length fails with
MemoryError instead of swapping). Every violation is written to ``--findings``/TARGET/ as ``<sha1>.input``
(the bytes, or UTF-8 text) and ``<sha1>.txt`` (the traceback); distinct findings are counted by exception
type and the line that raised it. Exit status: 0 without findings, 1 with.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from tests import fuzz_targets  # noqa: E402


class Findings:
    """Violations written to disk, deduplicated by (exception type, raising file:line)."""

    def __init__(self, folder: Path, target: str) -> None:
        self.folder = folder / target
        self.signatures: dict[str, str] = {}
        self.total = 0

    def record(self, data: bytes | str, violation: fuzz_targets.ContractViolation) -> None:
        self.total += 1
        cause = violation.__cause__ or violation
        frames = traceback.extract_tb(cause.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        signature = f"{type(cause).__name__} at {where}" if cause is not violation else str(violation)[:80]
        if signature in self.signatures:
            return
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
        digest = hashlib.sha1(raw).hexdigest()[:16]
        self.signatures[signature] = digest
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{digest}.input").write_bytes(raw)
        text = "".join(traceback.format_exception(violation))
        (self.folder / f"{digest}.txt").write_text(f"{signature}\n\n{text}", encoding="utf-8")
        print(f"  finding {len(self.signatures)}: {signature} -> {self.folder / digest}.input", flush=True)


def run_mutate(name: str, seconds: float, findings: Findings, timeout: float, seed: int) -> int:
    target = fuzz_targets.TARGETS[name]
    rng = random.Random(seed)
    seeds = target.seeds()
    executions = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        base = rng.choice(seeds)
        if target.kind == "str":
            data: bytes | str = fuzz_targets.mutate_text(base, rng)
        else:
            data = fuzz_targets.mutate(base, rng)
            if name == "shard_tar" and rng.random() < 0.5:
                data = fuzz_targets.repair_tar_checksums(data)
        try:
            fuzz_targets.check(name, data, timeout)
        except fuzz_targets.ContractViolation as violation:
            findings.record(data, violation)
        executions += 1
    return executions


def run_atheris_worker(name: str, seconds: float, findings: Findings, timeout: float, corpus: Path) -> None:
    """Runs inside a child process: libFuzzer ends it with exit(), after printing 'Done N runs'."""
    import atheris

    with atheris.instrument_imports(include=["clipforge"]):
        import clipforge.bpe
        import clipforge.checkpoint
        import clipforge.data.shards
        import clipforge.data.tables
        import clipforge.eval.datasets
        import clipforge.images  # noqa: F401
    target = fuzz_targets.TARGETS[name]
    corpus.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(target.seeds()):
        (corpus / f"seed-{index}").write_bytes(seed.encode("utf-8") if isinstance(seed, str) else seed)

    def one_input(raw: bytes) -> None:
        data: bytes | str = raw.decode("utf-8", "replace") if target.kind == "str" else raw
        try:
            fuzz_targets.check(name, data, timeout)
        except fuzz_targets.ContractViolation as violation:
            findings.record(data, violation)

    # -timeout=0: the contract's own SIGALRM timer bounds each input (libFuzzer's would share the signal).
    args = [sys.argv[0], str(corpus), f"-max_total_time={int(seconds)}", "-timeout=0", "-rss_limit_mb=0"]
    atheris.Setup(args, one_input)
    atheris.Fuzz()


def run_atheris(name: str, seconds: float, folder: Path, timeout: float, memory: int) -> tuple[int, int]:
    """The atheris run in a child (it exits the process); returns (executions, distinct findings)."""
    command = [sys.executable, __file__, "--target", name, "--seconds", str(seconds), "--engine", "atheris",
               "--findings", str(folder), "--timeout", str(timeout), "--memory-mib", str(memory), "--worker"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=seconds + 300)
    done = re.findall(r"Done (\d+) runs", result.stderr)
    for line in result.stdout.splitlines():
        print(line)
    if not done:
        print(result.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"atheris run of {name} ended without its summary (exit {result.returncode})")
    found = len(list((folder / name).glob("*.input"))) if (folder / name).is_dir() else 0
    return int(done[-1]), found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", required=True, help=f"one of {sorted(fuzz_targets.TARGETS)}, or 'all'")
    parser.add_argument("--seconds", type=float, default=60.0, help="time per target (default 60)")
    parser.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto")
    parser.add_argument("--findings", type=Path, default=ROOT / "fuzz-findings", help="folder for findings")
    parser.add_argument("--timeout", type=float, default=fuzz_targets.DEFAULT_TIMEOUT_S, help="s per input")
    parser.add_argument("--memory-mib", type=int, default=1024, help="address space allowed beyond imports")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the mutate engine")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = sorted(fuzz_targets.TARGETS) if args.target == "all" else [args.target]
    unknown = [n for n in names if n not in fuzz_targets.TARGETS]
    if unknown:
        parser.error(f"unknown target {unknown[0]!r}; choose from {sorted(fuzz_targets.TARGETS)} or 'all'")
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "mutate"
    if args.worker:
        _prepare(names[0])
        fuzz_targets.limit_memory(args.memory_mib)
        findings = Findings(args.findings, names[0])
        run_atheris_worker(
            names[0], args.seconds, findings, args.timeout, args.findings / "corpus" / names[0]
        )
        return 0
    if engine == "mutate":
        for name in names:
            _prepare(name)
        fuzz_targets.limit_memory(args.memory_mib)
    status = 0
    for name in names:
        print(f"{name} ({fuzz_targets.TARGETS[name].parser}), {engine}, {args.seconds:g} s:", flush=True)
        if engine == "atheris":
            executions, found = run_atheris(name, args.seconds, args.findings, args.timeout, args.memory_mib)
        else:
            findings = Findings(args.findings, name)
            executions = run_mutate(name, args.seconds, findings, args.timeout, args.seed)
            found = len(findings.signatures)
        print(f"{name}: {executions} executions, {found} distinct findings", flush=True)
        status = status or int(found > 0)
    return status


def _prepare(name: str) -> None:
    """Build the seeds and import the parser before the memory cap, so the cap measures parsing alone."""
    for seed in fuzz_targets.TARGETS[name].seeds():
        try:
            fuzz_targets.check(name, seed)
        except fuzz_targets.ContractViolation as violation:
            raise SystemExit(f"{name}: a seed input breaks the contract: {violation}") from None


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
