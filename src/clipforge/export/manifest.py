"""The layout of an ONNX export folder: its file names, ``export.json`` and the errors both sides raise."""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
MANIFEST_FILE = "export.json"
FORMAT = "clipforge.onnx_export"
FORMAT_VERSION = 1
INSTALL_HINT = "pip install 'clipforge[onnx]' (onnx, onnxruntime and onnxscript at the pinned versions)"


class ExportError(ValueError):
    """An export that cannot be made or used: a missing package, a bad folder, parity out of tolerance."""


def import_optional(name: str) -> ModuleType:
    """``onnx`` / ``onnxruntime``, or an :class:`ExportError` that says how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the '{name}' package ({exc}); {INSTALL_HINT}") from exc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """``folder/export.json``, checked to be a clipforge ONNX export whose two graphs are present."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ExportError(
            f"{folder}: not an ONNX export (no {MANIFEST_FILE}); make one with `clipforge export onnx MODEL "
            f"--out {folder}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc}); export the model again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: field 'format' is not {FORMAT!r}; this is not a clipforge ONNX export")
    if manifest.get("version") != FORMAT_VERSION:
        raise ExportError(
            f"{path}: field 'version' is {manifest.get('version')!r}, this clipforge reads version "
            f"{FORMAT_VERSION}; export the model again with this clipforge"
        )
    for tower in ("image", "text"):
        graph = folder / manifest[tower]["file"]
        if not graph.is_file():
            raise ExportError(
                f"{graph}: missing (named by {path} field '{tower}.file'); export the model again"
            )
    return manifest


def verify_checksums(folder: str | Path, manifest: dict[str, Any]) -> None:
    """Raise :class:`ExportError` if a graph's sha256 differs from the one ``export.json`` records."""
    for tower in ("image", "text"):
        graph = Path(folder) / manifest[tower]["file"]
        if sha256_file(graph) != manifest[tower]["sha256"]:
            raise ExportError(
                f"{graph}: sha256 differs from {MANIFEST_FILE} field '{tower}.sha256' (the file changed after "
                "export); export the model again"
            )
