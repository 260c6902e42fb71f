"""Contrastive losses on image and text embeddings: CLIP's symmetric softmax (InfoNCE) loss and SigLIP's pairwise
sigmoid loss, each exact, across processes and in bounded memory.

``chunk_size=None`` builds the full B×B logits matrix (O(B²) memory). An integer (or ``"auto"``) computes the
same loss and the same gradients block by block, never holding more than ``chunk_size`` rows of logits: extra
memory O(chunk_size × B + B × D) instead of O(B²).

Options for small data (docs/recipes.md): ``label_smoothing`` for the softmax loss, and ``multi_positive``: pairs
whose captions are identical (equal :func:`caption_ids`) are positives of each other instead of negatives.
"""

from clipforge.losses.inputs import ChunkSize, auto_chunk_size
from clipforge.losses.positives import caption_ids
from clipforge.losses.sigmoid import SigmoidLoss, _ChunkedSigmoid, sigmoid_loss
from clipforge.losses.softmax import (
    ContrastiveLoss,
    _ChunkedInfoNCE,
    _ChunkedSymmetricInfoNCE,
    _one_direction,
    contrastive_loss,
)

# The private names are the chunked autograd functions and the one-direction reference the tests compare.
__all__ = [
    "ChunkSize",
    "ContrastiveLoss",
    "SigmoidLoss",
    "_ChunkedInfoNCE",
    "_ChunkedSigmoid",
    "_ChunkedSymmetricInfoNCE",
    "_one_direction",
    "auto_chunk_size",
    "caption_ids",
    "contrastive_loss",
    "sigmoid_loss",
]
