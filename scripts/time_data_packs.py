"""Time the demo's dataset cache: the first ``ensure_datasets`` call (builds the four pip icon sets) and a second,
cached call (verification only), each in a fresh Python process so import time is counted as a user sees it.

    .venv/bin/python scripts/time_data_packs.py [--cache /tmp/clipforge-cache-timing] [--size 64] [--workers 1]

The cache folder is emptied first. Prints one line per call: seconds in the call, seconds for the whole process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

NAMES = ["openmoji", "mdi", "fontawesome", "simpleicons"]
CHILD = """
import json, sys, time
started = time.perf_counter()
from clipforge.data.packs import ensure_datasets
imported = time.perf_counter()
options = {name: {"size": SIZE, "workers": WORKERS} for name in NAMES}
paths = ensure_datasets(NAMES, options=options, cache_dir=CACHE, progress=False)
done = time.perf_counter()
print(json.dumps({"import_s": round(imported - started, 2), "call_s": round(done - imported, 2)}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/clipforge-cache-timing"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    shutil.rmtree(args.cache, ignore_errors=True)
    code = (
        CHILD.replace("NAMES", repr(NAMES))
        .replace("SIZE", str(args.size))
        .replace("WORKERS", str(args.workers))
        .replace("CACHE", repr(str(args.cache)))
    )
    for label in ("first run", "cached"):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{label}: the ensure_datasets process failed:\n{result.stderr[-3000:]}")
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"{label}: ensure_datasets {figures['call_s']} s, whole process {time.perf_counter() - started:.1f} s"
        )
    sizes = {
        p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        for p in (args.cache / "data").iterdir()
    }
    print(
        "cache:",
        ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(sizes.items()) if not k.startswith(".")),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
