"""A persistent image index: build it once over a collection (resumable, updatable), then search it by text, by
image or by vector, exactly or approximately (faiss). The folder format is described in :mod:`.layout`."""

from clipforge.index.approximate import APPROXIMATE_THRESHOLD, TARGET_RECALL, exact_top_k, recall_at_10
from clipforge.index.build import BuildReport, EncodeOptions, SearchOptions, build_index, update_index
from clipforge.index.errors import ApproximateUnavailableError, IndexFormatError, ModelMismatchError
from clipforge.index.identity import ModelIdentity
from clipforge.index.reader import Hit, Index

__all__ = [
    "APPROXIMATE_THRESHOLD",
    "TARGET_RECALL",
    "ApproximateUnavailableError",
    "BuildReport",
    "EncodeOptions",
    "Hit",
    "Index",
    "IndexFormatError",
    "ModelIdentity",
    "ModelMismatchError",
    "SearchOptions",
    "build_index",
    "exact_top_k",
    "recall_at_10",
    "update_index",
]
