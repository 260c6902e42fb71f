"""Errors raised while reading, converting or loading checkpoints."""

from __future__ import annotations

# Defined below the model and checkpoint packages, which both raise them; re-exported here.
from clipforge.errors import CheckpointError, TowerUnavailableError  # noqa: F401


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would have to execute code (or build arbitrary Python objects) to be loaded.

    clipforge never does that; the message names what was refused and how to convert a trusted file.
    """


CONVERT_HELP = (
    "If you trust the file, convert it once in a trusted environment: load it with "
    "`torch.load(path, weights_only=False)` (a TorchScript archive: `torch.jit.load(path)`), re-save its state "
    "dict with `safetensors.torch.save_file(state_dict, 'weights.safetensors')` and load that file instead"
)
REDOWNLOAD_HELP = "it may be an interrupted download or a failed save; download or save it again"
