"""Caption prediction (the paper's slowest baseline in Fig. 2): a transformer language model conditioned on the
image, trained to predict the caption token by token.

The image tower's embedding is projected to ``prefix_tokens`` vectors that precede the caption's tokens in a
causal transformer (a prefix language model); the output head shares the token-embedding matrix. The loss is
the mean next-token cross-entropy over every caption token after the start token, up to and including the end
token. Zero-shot: a class's score is the log-likelihood of its prompts given the image, summed over each
prompt's tokens and averaged over the templates (the ensemble in log space).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from clipforge.config import ModelConfig
from clipforge.model.layers import Transformer
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


class CaptionModel(nn.Module):
    """Image tower + prefix-conditioned causal text decoder sized by ``config.text``."""

    def __init__(self, config: ModelConfig, prefix_tokens: int = 4) -> None:
        super().__init__()
        self.config = config
        text = config.text
        self.prefix_tokens = prefix_tokens
        self.visual = build_image_tower(config)
        self.prefix = nn.Linear(config.embed_dim, prefix_tokens * text.width)
        self.token_embed = nn.Embedding(text.vocab_size, text.width)
        self.pos_embed = nn.Parameter(torch.empty(prefix_tokens + text.context_length, text.width))
        self.transformer = Transformer(text.width, text.layers, text.heads, text.mlp_ratio, config.activation)
        self.norm_final = nn.LayerNorm(text.width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.prefix.weight, std=config.embed_dim**-0.5)
        nn.init.zeros_(self.prefix.bias)
        self.transformer.init_weights()

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        set_tower_checkpointing(self.visual, enabled)
        self.transformer.grad_checkpointing = enabled

    def token_log_probs(
        self, image_features: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log p(tokens[:, j] | image, tokens[:, :j])`` for ``j = 1 .. L'-1`` and the mask of real caption
        positions (up to each row's first end token), both ``[B, L'-1]``; ``L'`` is the longest text's length
        (the padding after it is cut: under the causal mask it cannot change the result)."""
        if tokens.shape[1] > self.config.text.context_length:
            raise ValueError(
                f"token length {tokens.shape[1]} exceeds the context length {self.config.text.context_length}"
            )
        end = tokens.argmax(dim=1)  # the first end token (the largest id)
        length = int(end.max()) + 1
        tokens = tokens[:, :length]
        batch, width = tokens.shape[0], self.token_embed.embedding_dim
        prefix = self.prefix(image_features).reshape(batch, self.prefix_tokens, width)
        x = torch.cat([prefix.to(self.token_embed.weight.dtype), self.token_embed(tokens[:, :-1])], dim=1)
        x = x + self.pos_embed[: x.shape[1]]
        x = self.norm_final(self.transformer(x, causal=True))
        hidden = x[:, self.prefix_tokens :]  # position P + j has seen tokens 0..j: it predicts token j + 1
        logits = hidden @ self.token_embed.weight.T
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        targets = tokens[:, 1:]
        picked = log_probs.gather(2, targets.unsqueeze(-1)).squeeze(-1)
        mask = torch.arange(1, length, device=tokens.device)[None, :] <= end[:, None]
        return picked, mask

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the captions given the images (a scalar)."""
        picked, mask = self.token_log_probs(self.visual(images), tokens)
        return -(picked * mask).sum() / mask.sum().clamp_min(1)


class CaptioningObjective(TowerlessObjective):
    name = "captioning"

    def __init__(self, prefix_tokens: int = 4) -> None:
        self.prefix_tokens = prefix_tokens

    def build_model(self, config: ModelConfig) -> CaptionModel:
        self.check_model_config(config)
        return CaptionModel(config, self.prefix_tokens)

    def compute_gradients(
        self,
        model: nn.Module,
        micro_batches: Sequence[MicroBatch],
        autocast: Autocast = None,
        loss_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # The loss is a mean over caption tokens, so each micro-batch is weighted by its number of predicted
        # tokens (the end token's index per row): exactly the mean over the whole batch's tokens.
        return accumulate_gradients(
            model, lambda m, images, tokens: m(images, tokens), micro_batches, autocast, loss_scale,
            weight_of=lambda images, tokens: float(tokens.argmax(dim=1).sum()),
        )  # fmt: skip

    def zero_shot_scorer(
        self, model: nn.Module, tokenizer: Tokenizer, classnames: Sequence[str], templates: Sequence[str]
    ) -> ZeroShotScorer:
        prompts = [template.replace("{}", name) for name in classnames for template in templates]
        tokens = tokenizer(prompts)
        num_classes, num_templates = len(classnames), len(templates)

        def score(images: torch.Tensor) -> torch.Tensor:
            features = model.encode_image(images)
            prompt_tokens = tokens.to(features.device)
            out = torch.empty(images.shape[0], len(prompts))
            for i in range(images.shape[0]):  # every prompt against image i, in one decoder batch
                picked, mask = model.token_log_probs(
                    features[i : i + 1].expand(len(prompts), -1), prompt_tokens
                )
                out[i] = (picked * mask).sum(dim=1).cpu()
            return out.reshape(-1, num_classes, num_templates).mean(dim=2)

        return score
