"""The built-in dataset shipped inside the package (``clipforge/builtin_data/``): openclipart clip art (public
domain) and Noto emoji (Apache-2.0) as small thumbnails with captions, class labels and held-out classes, in
the layout of :mod:`clipforge.data.builders.core`, one folder per source. The digits are not shipped: build
them with :func:`build_digits` (scikit-learn bundles them). Rebuild with ``scripts/build_builtin_data.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipforge.data.raw import DataError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin_data"
MANIFEST_FILE = "MANIFEST.json"
MANIFEST_FORMAT = "clipforge.builtin_dataset"
BUDGET_BYTES = 25_000_000


def builtin_dataset_path(source: str | None = None) -> Path:
    """The built-in dataset's folder, or one source's folder in it (``"openclipart"``, ``"emoji"``).

    Each source folder holds ``train/``, ``val/``, ``test/``, ``test_heldout/`` (shards + ``manifest.json``),
    ``classes.json`` and ``build.json``. Raises :class:`DataError` if the data is missing or the source unknown.
    """
    info = builtin_dataset_info()
    if source is None:
        return BUILTIN_DIR
    if source not in info["sources"]:
        raise DataError(f"the built-in dataset has no source {source!r}; it has {sorted(info['sources'])}")
    return BUILTIN_DIR / info["sources"][source]["path"]


def builtin_dataset_info() -> dict[str, Any]:
    """``MANIFEST.json``: counts per source and split, classes, held-out classes, licences, sha256 of every file,
    the thumbnail size and the measurement that chose it."""
    path = BUILTIN_DIR / MANIFEST_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path}: the built-in dataset is missing or unreadable ({exc}); reinstall clipforge, or rebuild it "
            "with `python scripts/build_builtin_data.py` (needs the Debian packages listed in docs/data.md)"
        ) from exc
    if info.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not a clipforge built-in dataset manifest (format {info.get('format')!r})")
    return info


def builtin_split_shards(split: str, sources: list[str] | None = None) -> list[Path]:
    """The shard files of one split (``train``, ``val``, ``test``, ``test_heldout``) across ``sources`` (all)."""
    info = builtin_dataset_info()
    chosen = sources if sources is not None else sorted(info["sources"])
    shards: list[Path] = []
    for source in chosen:
        folder = builtin_dataset_path(source) / split
        if not folder.is_dir():
            raise DataError(f"the built-in source {source!r} has no split {split!r} ({folder} is missing)")
        shards += sorted(folder.glob("shard-*.tar"))
    return shards


def verify_builtin(root: str | Path | None = None) -> list[str]:
    """Problems with the shipped files: a checksum or size that differs from ``MANIFEST.json``, a listed file
    that is missing, a file that is not listed, or a total over the budget. Empty when all is well."""
    from clipforge.data.shards import sha256_file

    root = Path(root) if root is not None else BUILTIN_DIR
    info = json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
    problems: list[str] = []
    listed = info["files"]
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    present = {p for p in present if "__pycache__" not in p}
    for name in sorted(set(listed) - present):
        problems.append(f"{name}: listed in {MANIFEST_FILE} but missing")
    for name in sorted(present - set(listed)):
        problems.append(f"{name}: present but not listed in {MANIFEST_FILE}")
    for name in sorted(set(listed) & present):
        path = root / name
        if path.stat().st_size != listed[name]["bytes"] or sha256_file(path) != listed[name]["sha256"]:
            problems.append(f"{name}: size or sha256 differs from {MANIFEST_FILE}")
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    if total > info.get("budget_bytes", BUDGET_BYTES):
        problems.append(
            f"total {total:,} bytes is over the budget of {info.get('budget_bytes', BUDGET_BYTES):,}"
        )
    return problems


def build_digits(out: str | Path, size: int = 64, **options: Any):
    """scikit-learn's digits in the same layout (not shipped: generated here); returns the BuildResult."""
    from clipforge.data.builders import build

    return build("digits", out, size=size, **options)


__all__ = [
    "BUDGET_BYTES",
    "BUILTIN_DIR",
    "build_digits",
    "builtin_dataset_info",
    "builtin_dataset_path",
    "builtin_split_shards",
    "verify_builtin",
]
