"""Bag-of-words prediction (the paper's middle baseline in Fig. 2): from the image alone, predict which BPE
tokens the caption contains, ignoring their order.

Loss: softmax cross-entropy of the image's vocabulary logits against the caption's token set, normalised to a
distribution (each distinct token of the caption — start/end tokens and padding excluded — gets equal mass).
Zero-shot: a class's score is the mean log-probability of its name's tokens (the template's words are shared by
every class and carry no order here, so only the class name is scored).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from clipforge.config import ModelConfig
from clipforge.objectives.base import (
    Autocast,
    MicroBatch,
    Tokenizer,
    TowerlessObjective,
    ZeroShotScorer,
    accumulate_gradients,
    build_image_tower,
    set_tower_checkpointing,
)


class BagOfWordsModel(nn.Module):
    """An image tower and a linear head over the BPE vocabulary: images -> vocabulary logits [B, V]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = build_image_tower(config)
        self.head = nn.Linear(config.embed_dim, config.text.vocab_size)
        nn.init.normal_(self.head.weight, std=config.embed_dim**-0.5)
        nn.init.zeros_(self.head.bias)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.visual(images))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        set_tower_checkpointing(self.visual, enabled)


def bag_of_tokens(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, L]`` token ids -> ``[B, V]`` target distributions: uniform over each row's distinct caption tokens
    (after the start token, before the first end token). A row without any caption token gets all zeros."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    end = tokens.argmax(dim=1, keepdim=True)  # the first end token (the largest id)
    inside = (positions > 0) & (positions < end)  # position 0 is the start token
    target = torch.zeros(tokens.shape[0], vocab_size, device=tokens.device)
    # Adds (not sets) so that padding positions, which add 0, never overwrite a caption token of the same id.
    target.scatter_add_(1, tokens.masked_fill(~inside, 0), inside.float())
    target = (target > 0).float()  # a set of tokens, not counts
    return target / target.sum(dim=1, keepdim=True).clamp_min(1.0)


def bag_of_words_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the cross-entropy between the token-set distribution and softmax(logits)."""
    target = bag_of_tokens(tokens, logits.shape[1])
    return -(target * torch.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


class BagOfWordsObjective(TowerlessObjective):
    name = "bag_of_words"

    def build_model(self, config: ModelConfig) -> BagOfWordsModel:
        self.check_model_config(config)
        return BagOfWordsModel(config)

    def compute_gradients(
        self,
        model: nn.Module,
        micro_batches: Sequence[MicroBatch],
        autocast: Autocast = None,
        loss_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return accumulate_gradients(
            model, lambda m, images, tokens: bag_of_words_loss(m(images), tokens), micro_batches, autocast,
            loss_scale,
        )  # fmt: skip

    def zero_shot_scorer(
        self, model: nn.Module, tokenizer: Tokenizer, classnames: Sequence[str], templates: Sequence[str]
    ) -> ZeroShotScorer:
        ids = class_token_ids(tokenizer, classnames)

        def score(images: torch.Tensor) -> torch.Tensor:
            log_probs = torch.log_softmax(model(images).float(), dim=1)
            return torch.stack([log_probs[:, i.to(log_probs.device)].mean(dim=1) for i in ids], dim=1)

        return score


def class_token_ids(tokenizer: Tokenizer, classnames: Sequence[str]) -> list[torch.Tensor]:
    """Each class name's BPE token ids (without start/end tokens); a name with no tokens is an error."""
    tokens = tokenizer(list(classnames))
    ids = []
    for name, row in zip(classnames, tokens):
        inner = row[1 : int(row.argmax())]  # between the start token and the first end token
        if inner.numel() == 0:
            raise ValueError(f"class name {name!r} has no tokens; give every class a non-empty name")
        ids.append(inner)
    return ids
