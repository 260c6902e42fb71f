"""Which tokenizer a model uses: :func:`get_tokenizer` gives CLIP's byte-level BPE (:mod:`clipforge.bpe`) or,
for a pretrained BERT text tower, WordPiece (:mod:`clipforge.wordpiece`), with the model's context length and
overflow policy. ``Tokenizer`` and its error are re-exported here, where users have always imported them.
"""

from __future__ import annotations

from typing import Any

from clipforge.bpe import Tokenizer, TokenizerOverflowError, clean_text
from clipforge.config import ModelConfig, get_model_config
from clipforge.wordpiece import WordPieceTokenizer


def get_tokenizer(name_or_model: str | ModelConfig | Any | None = None, **kwargs: Any) -> Tokenizer:
    """The tokenizer for a model name, a :class:`ModelConfig`, or a model with a ``.config``; None: defaults.

    The context length comes from ``config.text.context_length`` and the overflow policy from
    ``config.tokenizer.on_overflow``; keyword arguments override both. ``tokenizer.name == 'wordpiece'`` (a
    pretrained BERT text tower) gives a :class:`clipforge.wordpiece.WordPieceTokenizer` over the tower's files.
    """
    if name_or_model is None:
        return Tokenizer(**kwargs)
    if isinstance(name_or_model, str):
        config = get_model_config(name_or_model)
    elif isinstance(name_or_model, ModelConfig):
        config = name_or_model
    elif isinstance(getattr(name_or_model, "config", None), ModelConfig):
        config = name_or_model.config
    else:
        raise TypeError(
            "get_tokenizer expects a model name, a ModelConfig or a model with a .config ModelConfig, "
            f"got {type(name_or_model).__name__}"
        )
    settings: dict[str, Any] = {
        "context_length": config.text.context_length,
        "on_overflow": config.tokenizer.on_overflow,
    }
    settings.update(kwargs)
    if config.tokenizer.name == "wordpiece":
        from clipforge.model.towers import tower_files, tower_spec  # the model package, only when needed

        return WordPieceTokenizer(tower_files(tower_spec(config.text.tower)), **settings)
    return Tokenizer(**settings)


__all__ = ["Tokenizer", "TokenizerOverflowError", "WordPieceTokenizer", "clean_text", "get_tokenizer"]
