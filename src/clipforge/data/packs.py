"""The demo's data cache: datasets built by :mod:`clipforge.data.builders` on first use into the user cache, keyed
by what determines their content, and verified (shard sizes and sha256) on every use.

    paths = ensure_datasets(["openmoji", "mdi", "fontawesome", "simpleicons"])   # {name: dataset folder}

A dataset lives in ``<cache>/data/<name>-<key>`` (``<cache>``: ``cache_dir``, else ``$CLIPFORGE_CACHE``, else
``$XDG_CACHE_HOME/clipforge``, else ``~/.cache/clipforge``); ``key`` hashes the installed versions of the packages
it reads, its builder options (image and split options included), the builder's code version and the rules and
emoji table files, so a new package version, other options or edited rules give a new folder. A build runs in a hidden folder renamed into place when complete; a
folder without ``build.json`` (an interrupted build) or whose shards differ from their manifests is rebuilt, the
latter with a :class:`CacheWarning`. A lock file serialises processes building the same dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from clipforge.data.builders import BUILDERS, build
from clipforge.data.builders.core import BUILD_INFO_NAME, CLASSES_NAME
from clipforge.data.builders.emoji import EMOJI_TABLE_PATH
from clipforge.data.builders.environment import (
    RULES_PATH,
    MissingPackageError,
    package_versions,
    python_package_versions,
)
from clipforge.data.raw import DataError
from clipforge.data.shards import MANIFEST_NAME, Manifest, sha256_file
from clipforge.files import atomic_directory, atomic_path, leftover_directories

CACHE_ENV = "CLIPFORGE_CACHE"
CACHE_RECORD_NAME = "cache.json"
KEY_RECIPE_VERSION = 1  # bump if what goes into the key changes
DEFAULT_OPTIONS: Mapping[str, Any] = {"size": 64}  # the built-in dataset's and the demo's thumbnail size
# Options that do not change what is written, so they are not part of the key.
_NOT_IN_KEY = frozenset({"progress", "overwrite", "workers"})


class CacheWarning(UserWarning):
    """A cached dataset failed verification (and is rebuilt)."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$CLIPFORGE_CACHE``, else ``$XDG_CACHE_HOME/clipforge``, else ``~/.cache/clipforge``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "clipforge"


def installed_versions(name: str) -> dict[str, str | None]:
    """Installed versions of the packages builder ``name`` reads: Python distributions by name, Debian packages
    as ``deb:<name>``; ``None`` for one that is missing."""
    spec = BUILDERS[name]
    versions = python_package_versions(p.distribution for p in spec.python_packages)
    versions.update({f"deb:{k}": v for k, v in package_versions(spec.packages).items()})
    return versions


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def data_file_hashes(options: Mapping[str, Any]) -> dict[str, str | None]:
    """sha256 of the data files that shape every builder's output: the rules (``options["rules"]`` or the packaged
    ``rules.json``) and the packaged emoji table -- so editing them invalidates the cache like a code change."""
    files = {"rules": Path(options.get("rules") or RULES_PATH), "emoji_table": EMOJI_TABLE_PATH}
    return {name: sha256_file(path) if path.is_file() else None for name, path in files.items()}


def key_record(name: str, options: Mapping[str, Any], versions: Mapping[str, str | None]) -> dict[str, Any]:
    """Everything the cache key hashes (also written to the dataset's ``cache.json``)."""
    return {
        "builder": name,
        "code_version": BUILDERS[name].code_version,
        "key_recipe": KEY_RECIPE_VERSION,
        "packages": dict(sorted(versions.items())),
        "data_files": data_file_hashes(options),
        "options": _canonical({k: v for k, v in options.items() if k not in _NOT_IN_KEY}),
    }


def dataset_key(record: Mapping[str, Any]) -> str:
    """16 hex digits of the sha256 of the canonical JSON of :func:`key_record`."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def verify_dataset(folder: str | Path) -> list[str]:
    """Problems with a built dataset folder (empty when complete): ``build.json``, ``classes.json``, and every
    split's shards against its manifest (present, same size, same sha256) and the manifest against build.json."""
    folder = Path(folder)
    if not (folder / BUILD_INFO_NAME).is_file():
        return [f"no {BUILD_INFO_NAME} (an interrupted build)"]
    try:
        info = json.loads((folder / BUILD_INFO_NAME).read_text(encoding="utf-8"))
        splits = info["layout"]["splits"]
        recorded = info["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{BUILD_INFO_NAME} unreadable ({exc})"]
    problems = [] if (folder / CLASSES_NAME).is_file() else [f"no {CLASSES_NAME}"]
    for split in splits:
        try:
            manifest = Manifest.load(folder / split / MANIFEST_NAME)
        except DataError as exc:
            problems.append(f"{split}: {exc}")
            continue
        expected = recorded.get(split, {})
        if (manifest.num_samples, len(manifest.shards)) != (expected.get("samples"), expected.get("shards")):
            problems.append(f"{split}: the manifest's counts differ from {BUILD_INFO_NAME}")
        for shard in manifest.shards:
            path = folder / split / shard.name
            if not path.is_file():
                problems.append(f"{split}/{shard.name}: missing")
            elif path.stat().st_size != shard.num_bytes:
                problems.append(
                    f"{split}/{shard.name}: {path.stat().st_size:,} bytes, manifest says {shard.num_bytes:,}"
                )
            elif sha256_file(path) != shard.sha256:
                problems.append(f"{split}/{shard.name}: sha256 differs from the manifest")
    return problems


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (POSIX ``flock``; no lock where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock between processes
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_datasets(
    names: Sequence[str],
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """The folder of each dataset in ``names``, built into the cache on first use (see the module docstring).

    ``options[name]`` are builder options (:func:`clipforge.data.builders.build`) over :data:`DEFAULT_OPTIONS`.
    Raises ``KeyError`` for an unknown builder or an ``options`` entry for a dataset not in ``names``, and
    :class:`MissingPackageError` (with the ``pip install`` line) when a package is not installed.
    """
    options = dict(options or {})
    unknown = sorted(set(names) - set(BUILDERS)) + sorted(set(options) - set(names))
    if unknown:
        raise KeyError(
            f"unknown dataset(s) or options for a dataset not asked for: {unknown}; builders: {sorted(BUILDERS)}"
        )
    root = cache_root(cache_dir) / "data"
    paths: dict[str, Path] = {}
    for name in names:
        merged = {**DEFAULT_OPTIONS, **options.get(name, {})}
        versions = installed_versions(name)
        missing = [p for p in BUILDERS[name].python_packages if versions.get(p.distribution) is None]
        if missing:
            lines = " ".join(f"{p.distribution}=={p.version}" for p in missing)
            raise MissingPackageError(f"{name}: not installed: {lines}. Install: pip install {lines}")
        record = key_record(name, merged, versions)
        folder = root / f"{name}-{dataset_key(record)}"
        with _locked(root / f".{folder.name}.lock"):
            paths[name] = _ensure_one(name, folder, merged, record, progress)
    return paths


def _ensure_one(
    name: str, folder: Path, options: dict[str, Any], record: dict[str, Any], progress: bool
) -> Path:
    if folder.exists():
        problems = verify_dataset(folder)
        if not problems:
            return folder
        if (
            folder / BUILD_INFO_NAME
        ).is_file():  # an interrupted build is expected; damage is worth a warning
            warnings.warn(f"{folder}: {'; '.join(problems[:3])}; rebuilding it", CacheWarning, stacklevel=3)
        shutil.rmtree(folder)
    for stale in leftover_directories(folder):  # left by a killed build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    if progress:
        tqdm.write(f"building dataset {name} into {folder} (first use)")
    started = time.perf_counter()
    with atomic_directory(folder) as building:
        build(name, building, **{**options, "progress": progress})
        seconds = round(time.perf_counter() - started, 1)
        with atomic_path(building / CACHE_RECORD_NAME) as temporary:
            text = json.dumps({**record, "build_seconds": seconds}, indent=1) + "\n"
            temporary.write_text(text, encoding="utf-8")
    return folder
