"""The errors an image index raises. All are ``ValueError``s, so the CLI reports them as bad input (exit 2)."""

from __future__ import annotations


class IndexFormatError(ValueError):
    """An index folder that cannot be read: missing, not a folder, or a damaged or foreign ``index.json``."""


class ModelMismatchError(ValueError):
    """A model (or preprocessing) other than the one that built the index was used to query or extend it."""


class ApproximateUnavailableError(ValueError):
    """An approximate index was asked for (or is stored) but faiss-cpu is not installed."""


__all__ = ["ApproximateUnavailableError", "IndexFormatError", "ModelMismatchError"]
