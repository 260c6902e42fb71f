"""The Fig. 2 objectives: bag-of-words and captioning losses and zero-shot scorers on toy inputs with known
answers, exact gradient accumulation, and a short run of each through the shared training loop."""

from __future__ import annotations

import math

import pytest
import torch

from clipforge.config import get_model_config, merge
from clipforge.objectives import (
    BagOfWordsObjective,
    CaptioningObjective,
    get_objective,
    load_objective_model,
)
from clipforge.objectives.bag_of_words import bag_of_tokens, bag_of_words_loss
from clipforge.tokenizer import get_tokenizer
from clipforge.train import resolve_train_config, train
from tests.datasets import digits_table

SOT, EOT = 49406, 49407


def _config():
    return merge(get_model_config("tiny"), {"vision.layers": 1, "text.layers": 1, "text.context_length": 16})


def test_bag_of_tokens_is_uniform_over_distinct_caption_tokens():
    tokens = torch.tensor([[SOT, 5, 7, 5, EOT, 0, 9], [SOT, 3, EOT, 8, 0, 0, 0], [SOT, EOT, 0, 0, 0, 0, 0]])
    target = bag_of_tokens(tokens, 12)
    expected = torch.zeros(3, 12)
    expected[0, [5, 7]] = 0.5  # 5 twice counts once; 9 after the end token is padding
    expected[1, 3] = 1.0
    assert torch.equal(target, expected)  # an empty caption has no target at all


def test_bag_of_words_loss_and_scorer_known_answers():
    tokens = torch.tensor([[SOT, 1, 2, EOT], [SOT, 3, EOT, 0]])
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 2.0]])
    log_p = torch.log_softmax(logits, 1)
    expected = (-(log_p[0, 1] + log_p[0, 2]) / 2 - log_p[1, 3]) / 2
    assert torch.allclose(bag_of_words_loss(logits, tokens), expected)

    objective = BagOfWordsObjective()
    model = objective.build_model(_config()).eval()
    tokenizer = get_tokenizer(model)
    names = ["cat", "hot dog"]
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        scores = objective.zero_shot_scorer(model, tokenizer, names, ["a photo of a {}."])(images)
        log_probs = torch.log_softmax(model(images), 1)
    for c, name in enumerate(names):
        ids = tokenizer([name])[0]
        ids = ids[1 : int(ids.argmax())]
        assert torch.allclose(scores[:, c], log_probs[:, ids].mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="class name '' has no tokens"):
        objective.zero_shot_scorer(model, tokenizer, ["cat", ""], ["{}"])


def test_caption_log_probs_equal_step_by_step_decoding():
    torch.manual_seed(0)
    model = CaptioningObjective().build_model(_config()).eval()
    tokens = torch.tensor([[SOT, 11, 12, 13, EOT, 0, 0], [SOT, 21, EOT, 99, 98, 0, 0]])
    features = torch.randn(2, model.config.embed_dim)
    with torch.no_grad():
        picked, mask = model.token_log_probs(features, tokens)
        for row in range(2):
            end = int(tokens[row].argmax())
            total = 0.0
            for j in range(1, end + 1):  # predict token j from the prefix and tokens 0..j-1 alone
                x = _next_token_log_probs(model, features[row : row + 1], tokens[row : row + 1, :j])
                total += float(x[0, tokens[row, j]])
            assert mask[row].sum() == end
            assert math.isclose(float((picked[row] * mask[row]).sum()), total, rel_tol=1e-5, abs_tol=1e-5)
    junk = tokens.clone()
    junk[1, 3:] = torch.tensor([5, 6, 7, 8])  # junk after the end token changes nothing
    with torch.no_grad():
        picked_junk, mask_junk = model.token_log_probs(features, junk)
    assert torch.equal(mask_junk, mask) and torch.allclose(picked_junk * mask, picked * mask, atol=1e-6)


def _next_token_log_probs(model, features, prefix_tokens):
    """Log-probabilities of the token after ``prefix_tokens`` by running the decoder on exactly that prefix."""
    batch, width = prefix_tokens.shape[0], model.token_embed.embedding_dim
    prefix = model.prefix(features).reshape(batch, model.prefix_tokens, width)
    x = torch.cat([prefix, model.token_embed(prefix_tokens)], 1)
    x = model.norm_final(model.transformer(x + model.pos_embed[: x.shape[1]], causal=True))
    return torch.log_softmax(x[:, -1] @ model.token_embed.weight.T, -1)


def test_caption_scorer_averages_prompt_log_likelihoods_over_templates():
    torch.manual_seed(1)
    objective = CaptioningObjective()
    model = objective.build_model(_config()).eval()
    tokenizer = get_tokenizer(model)
    names, templates = ["cat", "small dog"], ["a {}.", "a photo of a {}."]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        scores = objective.zero_shot_scorer(model, tokenizer, names, templates)(images)
        features = model.encode_image(images)
        for i in range(2):
            for c, name in enumerate(names):
                lls = []
                for template in templates:
                    picked, mask = model.token_log_probs(
                        features[i : i + 1], tokenizer([template.format(name)])
                    )
                    lls.append(float((picked * mask).sum()))
                assert math.isclose(float(scores[i, c]), sum(lls) / 2, rel_tol=1e-5)


@pytest.mark.parametrize("name", ["bag_of_words", "captioning"])
def test_accumulation_equals_one_batch(name):
    objective = get_objective(name)
    torch.manual_seed(2)
    model = objective.build_model(_config())
    images = torch.randn(6, 3, 32, 32)
    lengths = [2, 5, 3, 7, 1, 4]  # uneven caption lengths: captioning weights micro-batches by tokens
    tokens = torch.zeros(6, 10, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens[row, 0], tokens[row, 1 : n + 1], tokens[row, n + 1] = SOT, torch.arange(100, 100 + n), EOT
    whole = objective.compute_gradients(model, [(images, tokens)])
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    split = objective.compute_gradients(model, [(images[:2], tokens[:2]), (images[2:], tokens[2:])])
    assert torch.allclose(whole, split, atol=1e-6)
    for key, param in model.named_parameters():
        assert torch.allclose(param.grad, expected[key], atol=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bag_of_words", "captioning"])
def test_each_objective_trains_in_the_shared_loop(tmp_path, name):
    table = digits_table(tmp_path / "digits", n=64)
    config = resolve_train_config(None, {
        "model": "tiny", "objective": name, "model_overrides": {"vision.layers": 1, "text.layers": 1},
        "data.train": [str(table)], "data.batch_size": 16, "data.num_workers": 0, "steps": 3,
        "optim.warmup_steps": 1, "run.output_dir": str(tmp_path / "runs"), "run.name": name, "run.progress": False,
        "run.log_every": 1,
    })  # fmt: skip
    summary = train(config)
    assert summary.steps == 3 and summary.final_loss is not None and math.isfinite(summary.final_loss)
    model, objective = load_objective_model(summary.model_path)
    assert objective == name and type(model).__name__ in ("BagOfWordsModel", "CaptionModel")
    with torch.no_grad():
        scores = get_objective(name).zero_shot_scorer(model, get_tokenizer(model), ["zero", "one"], ["{}"])(
            torch.randn(2, 3, 32, 32)
        )
    assert scores.shape == (2, 2) and torch.isfinite(scores).all()
