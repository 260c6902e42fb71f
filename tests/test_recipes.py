"""Recipes for small data (issue 12), the loss and model side: SigLIP's sigmoid loss, duplicate-aware (multi-positive)
targets, label smoothing, a fixed temperature and FLIP patch dropout; exact against direct formulas, chunked against
unchunked, 2 gloo processes against one, and through the trainer (including a bitwise resume).

Tolerances as in tests/test_losses.py: relative to the largest value compared (floored at 1).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clipforge.checkpoint import CheckpointError, export_checkpoint, load_checkpoint
from clipforge.config import ConfigError, get_model_config
from clipforge.distributed import cleanup, init_distributed
from clipforge.losses import (
    ContrastiveLoss,
    SigmoidLoss,
    _ChunkedInfoNCE,
    _ChunkedSigmoid,
    _ChunkedSymmetricInfoNCE,
    _one_direction,
    caption_ids,
    contrastive_loss,
    sigmoid_loss,
)
from clipforge.model import create_model
from clipforge.model.vision import drop_patches, kept_patches
from clipforge.objectives import get_objective
from clipforge.objectives.contrastive import compute_gradients
from clipforge.train import resolve_train_config, train
from clipforge.train.config import OptimConfig, loss_model_defaults
from clipforge.train.optim import build_optimizer
from clipforge.train.report import read_metrics
from clipforge.train.step import apply_update, freeze_temperature
from tests.conftest import random_images, random_tokens
from tests.datasets import digits_table
from tests.test_distributed import _run_ranks, _set_torchrun_env
from tests.test_losses import assert_close_relative, pair_features

BUILTIN = Path(__file__).resolve().parents[1] / "src/clipforge/builtin_data"
# Pairs 0 and 1 share a caption, and 3, 4, 5 share another.
IDS = torch.tensor([7, 7, 2, 9, 9, 9, 4, 1, 3, 8, 5])


def grads_of(loss_fn, image, text, scale, bias=None):
    """(loss, d image, d text, d scale[, d bias]) of ``loss_fn(image, text, scale[, bias])``."""
    leaves = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    leaves.append(torch.tensor(scale, dtype=image.dtype, requires_grad=True))
    if bias is not None:
        leaves.append(torch.tensor(bias, dtype=image.dtype, requires_grad=True))
    loss = loss_fn(*leaves)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


def assert_all_close(got, expected, tol, what=""):
    names = ("loss", "d image", "d text", "d scale", "d bias")
    for name, a, b in zip(names, got, expected):
        assert_close_relative(a, b, tol, f"{what} {name}")


def positives_of(ids: torch.Tensor) -> torch.Tensor:
    return ids[:, None] == ids[None, :]


# ---- SigLIP sigmoid loss -----------------------------------------------------------------------------------------


def sigmoid_double_loop(image, text, scale, bias, ids=None):
    ids = torch.arange(image.shape[0]) if ids is None else ids
    total = image.new_zeros(())
    for i in range(image.shape[0]):
        for j in range(text.shape[0]):
            z = 1.0 if ids[i] == ids[j] else -1.0
            total = total - F.logsigmoid(z * (scale * image[i] @ text[j] + bias))
    return total / image.shape[0]


def sigmoid_full_matrix(image, text, scale, bias, ids=None):
    ids = torch.arange(image.shape[0]) if ids is None else ids
    labels = 2 * positives_of(ids).to(image.dtype) - 1
    return -F.logsigmoid(labels * (scale * image @ text.T + bias)).sum() / image.shape[0]


@pytest.mark.parametrize("ids", [None, IDS], ids=["paired", "duplicates"])
def test_sigmoid_loss_matches_the_direct_formulas(ids):
    image, text = pair_features(11, dim=8, dtype=torch.float64)
    expected = grads_of(lambda x, y, s, b: sigmoid_double_loop(x, y, s, b, ids), image, text, 10.0, -10.0)
    matrix = grads_of(lambda x, y, s, b: sigmoid_full_matrix(x, y, s, b, ids), image, text, 10.0, -10.0)
    ours = grads_of(lambda x, y, s, b: sigmoid_loss(x, y, s, b, caption_ids=ids), image, text, 10.0, -10.0)
    module = grads_of(lambda x, y, s, b: SigmoidLoss(multi_positive=ids is not None)(x, y, s, b, ids), image,
                      text, 10.0, -10.0)  # fmt: skip
    assert_all_close(matrix, expected, 1e-12, "full matrix")
    assert_all_close(ours, expected, 1e-12, "sigmoid_loss")
    assert_all_close(module, expected, 1e-12, "SigmoidLoss")


def test_sigmoid_known_value_with_duplicates():
    # x = y = one-hot rows, captions [a, a, b]: every logit is s·[i = j] + b.
    s, b = 3.0, -2.0
    eye = torch.eye(3, dtype=torch.float64)

    def nll(x):  # -log σ(x)
        return math.log1p(math.exp(-x))

    # Row 0 and row 1: positives at (s + b) and b, a negative at b. Row 2: positive s + b, two negatives at b.
    expected = (2 * (nll(s + b) + nll(b) + nll(-b)) + nll(s + b) + 2 * nll(-b)) / 3
    got = sigmoid_loss(eye, eye, s, b, caption_ids=torch.tensor([5, 5, 6]))
    assert abs(got.item() - expected) < 1e-12
    assert abs(sigmoid_loss(eye, eye, s).item() - (nll(s) + 2 * nll(0.0))) < 1e-12  # no bias: b = 0


CHUNK_CASES = [(1, 1), (11, 3), (11, 64), (64, 7), (300, 64)]


@pytest.mark.parametrize(("batch", "chunk"), CHUNK_CASES)
@pytest.mark.parametrize("duplicates", [False, True])
def test_sigmoid_chunked_equals_unchunked(batch, chunk, duplicates):
    image, text = pair_features(batch, seed=batch)
    ids = torch.randint(0, max(1, batch // 3), (batch,)) if duplicates else None
    naive = grads_of(lambda x, y, s, b: sigmoid_loss(x, y, s, b, caption_ids=ids), image, text, 10.0, -10.0)
    chunked = grads_of(
        lambda x, y, s, b: sigmoid_loss(x, y, s, b, chunk, caption_ids=ids), image, text, 10.0, -10.0
    )
    assert_all_close(chunked, naive, 1e-6, f"B={batch} chunk={chunk}")


def test_sigmoid_chunked_gradcheck_and_float64_exactness():
    image, text = pair_features(5, dim=4, seed=2, dtype=torch.float64)
    leaves = (
        image.requires_grad_(),
        text.requires_grad_(),
        torch.tensor(7.5, dtype=torch.float64, requires_grad=True),
        torch.tensor(-1.5, dtype=torch.float64, requires_grad=True),
    )
    ids = torch.tensor([0, 1, 0, 2, 1])
    assert torch.autograd.gradcheck(lambda x, y, s, b: _ChunkedSigmoid.apply(x, y, s, b, 0, 2), leaves)
    assert torch.autograd.gradcheck(
        lambda x, y, s, b: _ChunkedSigmoid.apply(x, y, s, b, 0, 2, ids, ids), leaves
    )
    image, text = pair_features(300, seed=3, dtype=torch.float64)
    naive = grads_of(sigmoid_full_matrix, image, text, 100.0, -10.0)
    chunked = grads_of(lambda x, y, s, b: sigmoid_loss(x, y, s, b, 64), image, text, 100.0, -10.0)
    assert_all_close(chunked, naive, 1e-12, "float64")


def test_sigmoid_dtypes_and_autocast():
    image, text = pair_features(16, seed=4)
    expected = sigmoid_loss(image, text, 10.0, -10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for chunk in (None, 5):
            loss = SigmoidLoss(chunk_size=chunk)(image, text, torch.tensor(10.0), torch.tensor(-10.0))
            assert loss.dtype == torch.float32
            assert_close_relative(loss, expected, 1e-6)
    assert sigmoid_loss(image.double(), text.double(), 10.0, None, 5).dtype == torch.float64


# ---- multi-positive softmax and label smoothing ---------------------------------------------------------------


def multi_positive_reference(image, text, scale, ids, smoothing=0.0):
    """Soft-target cross-entropy on the full matrix, both directions."""
    positives = positives_of(ids).to(image.dtype)
    targets = positives / positives.sum(dim=1, keepdim=True)
    logits = scale * image @ text.T
    return (
        F.cross_entropy(logits, targets, label_smoothing=smoothing)
        + F.cross_entropy(logits.T, targets, label_smoothing=smoothing)
    ) / 2


def test_multi_positive_known_value():
    # x = y = one-hot rows, captions [a, a, b], scale s: rows 0 and 1 put half their target on a logit s and half
    # on 0, row 2 all on s; every row's log-sum-exp is log(e^s + 2). Both directions agree.
    s = 4.0
    eye = torch.eye(3, dtype=torch.float64)
    expected = math.log(math.exp(s) + 2) - 2 * s / 3
    for chunk in (None, 1, 2):
        got = contrastive_loss(eye, eye, s, chunk, caption_ids=torch.tensor([5, 5, 6]))
        assert abs(got.item() - expected) < 1e-12, chunk
    # Four copies of one caption over identical features: each row's target is the uniform softmax itself.
    same = F.normalize(torch.ones(4, 3, dtype=torch.float64), dim=-1)
    assert abs(contrastive_loss(same, same, 20.0, caption_ids=torch.zeros(4, dtype=torch.long)).item()
               - math.log(4)) < 1e-12  # fmt: skip
    # Two pairs with one caption and features at cosine 0.8, scale 10: the standard loss pushes them apart
    # (log(1 + e^-2)); as positives each row's target is half on its own logit 10, half on the other's 8.
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6]], dtype=torch.float64)
    assert abs(contrastive_loss(x, x, 10.0).item() - math.log1p(math.exp(-2))) < 1e-12
    merged = contrastive_loss(x, x, 10.0, 1, caption_ids=torch.tensor([1, 1]))
    assert abs(merged.item() - (1 + math.log1p(math.exp(-2)))) < 1e-12


@pytest.mark.parametrize("chunk", [None, 1, 3, 64])
def test_multi_positive_equals_standard_loss_when_captions_are_unique(chunk):
    image, text = pair_features(20, seed=5)
    unique = torch.randperm(20) * 1000
    standard = grads_of(lambda x, y, s: contrastive_loss(x, y, s, chunk), image, text, 30.0)
    multi = grads_of(lambda x, y, s: contrastive_loss(x, y, s, chunk, caption_ids=unique), image, text, 30.0)
    for a, b in zip(multi, standard):
        assert torch.equal(a, b)  # unique ids take the standard path: bit for bit
    # The soft-target arithmetic itself also reduces to the standard loss (to rounding).
    if chunk is not None:
        soft = grads_of(
            lambda x, y, s: _ChunkedSymmetricInfoNCE.apply(x, y, s, chunk, 0.0, unique), image, text, 30.0
        )
        assert_all_close(soft, standard, 1e-6, "soft targets, unique ids")
    sigmoid = grads_of(
        lambda x, y, s: sigmoid_loss(x, y, s, -5.0, chunk, caption_ids=unique), image, text, 10.0
    )
    assert_all_close(
        sigmoid, grads_of(lambda x, y, s: sigmoid_loss(x, y, s, -5.0, chunk), image, text, 10.0), 0
    )


@pytest.mark.parametrize("chunk", [None, 2])
def test_identical_caption_embeddings_make_multi_positive_softmax_the_standard_loss(chunk):
    """Identical token rows give identical text embeddings. Then each image row's positives share one logit, and
    the two text columns' targets sum to what the one-hot targets sum to: the softmax loss and its gradients are
    unchanged (so the option only matters for the sigmoid loss, or for ids that group different texts)."""
    image = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1).requires_grad_()
    distinct = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1).requires_grad_()
    rows, ids = [0, 0, 1, 2, 3, 3], torch.tensor([0, 0, 1, 2, 3, 3])
    for smoothing in (0.0, 0.1):
        losses = []
        for caption_ids_or_none in (None, ids):
            loss = contrastive_loss(image, distinct[rows], 20.0, chunk, label_smoothing=smoothing,
                                    caption_ids=caption_ids_or_none)  # fmt: skip
            losses.append((loss.detach(), *torch.autograd.grad(loss, (image, distinct))))
        assert_all_close(losses[1], losses[0], 1e-12, f"softmax smoothing {smoothing}")
    plain = sigmoid_loss(image, distinct[rows], 10.0, -10.0, chunk)
    merged = sigmoid_loss(image, distinct[rows], 10.0, -10.0, chunk, caption_ids=ids)
    assert abs(plain - merged) > 1.0  # the sigmoid loss does change: each duplicate pair becomes a positive


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [None, 1, 3, 64])
def test_multi_positive_matches_soft_target_cross_entropy(chunk, smoothing):
    image, text = pair_features(11, seed=6)
    expected = grads_of(lambda x, y, s: multi_positive_reference(x, y, s, IDS, smoothing), image, text, 20.0)
    symmetric = grads_of(
        lambda x, y, s: contrastive_loss(x, y, s, chunk, label_smoothing=smoothing, caption_ids=IDS),
        image,
        text,
        20.0,
    )
    directional = grads_of(
        lambda x, y, s: (_one_direction(x, y, s, 0, chunk, smoothing, IDS, IDS)
                         + _one_direction(y, x, s, 0, chunk, smoothing, IDS, IDS)) / 2,
        image, text, 20.0,
    )  # fmt: skip
    assert_all_close(symmetric, expected, 1e-6, "symmetric")
    assert_all_close(directional, expected, 1e-6, "one direction")


@pytest.mark.parametrize("smoothing", [0.05, 0.3])
@pytest.mark.parametrize("chunk", [None, 1, 4, 64])
def test_label_smoothing_equals_torch_cross_entropy(chunk, smoothing):
    image, text = pair_features(13, seed=7)
    labels = torch.arange(13)

    def torch_reference(x, y, s):
        logits = s * x @ y.T
        return (F.cross_entropy(logits, labels, label_smoothing=smoothing)
                + F.cross_entropy(logits.T, labels, label_smoothing=smoothing)) / 2  # fmt: skip

    expected = grads_of(torch_reference, image, text, 14.3)
    module = ContrastiveLoss(chunk_size=chunk, label_smoothing=smoothing)
    assert_all_close(grads_of(module, image, text, 14.3), expected, 1e-6, "module")
    one_way = grads_of(lambda x, y, s: _one_direction(x, y, s, 0, chunk, smoothing), image, text, 14.3)
    assert_all_close(one_way, grads_of(lambda x, y, s: F.cross_entropy(s * x @ y.T, labels,
                     label_smoothing=smoothing), image, text, 14.3), 1e-6, "one direction")  # fmt: skip


def test_chunked_softmax_gradcheck_with_ids_and_smoothing():
    image, text = pair_features(5, dim=4, seed=2, dtype=torch.float64)
    leaves = (
        image.requires_grad_(),
        text.requires_grad_(),
        torch.tensor(7.5, dtype=torch.float64, requires_grad=True),
    )
    ids = torch.tensor([0, 1, 0, 2, 1])
    assert torch.autograd.gradcheck(
        lambda x, y, s: _ChunkedSymmetricInfoNCE.apply(x, y, s, 2, 0.1, ids), leaves
    )
    assert torch.autograd.gradcheck(
        lambda x, y, s: _ChunkedInfoNCE.apply(x, y, s, 0, 2, 0.2, ids, ids), leaves
    )


def test_caption_ids_identify_token_rows():
    tokens = random_tokens(6, 77, seed=3)
    tokens[4] = tokens[1]
    ids = caption_ids(tokens)
    assert ids.dtype == torch.int64 and ids.shape == (6,)
    assert ids[4] == ids[1] and len(set(ids.tolist())) == 5
    assert torch.equal(ids, caption_ids(tokens.int()))
    one_token_apart = tokens[2].clone()
    one_token_apart[5] += 1
    assert caption_ids(one_token_apart[None])[0] != ids[2]


def test_loss_argument_errors():
    image, text = pair_features(4)
    with pytest.raises(ValueError, match="no logit bias"):
        ContrastiveLoss()(image, text, 10.0, torch.tensor(-10.0))
    with pytest.raises(ValueError, match="needs caption_ids"):
        SigmoidLoss(multi_positive=True)(image, text, 10.0, -10.0)
    with pytest.raises(ValueError, match=r"caption_ids must be integers of shape \[4\]"):
        contrastive_loss(image, text, 10.0, caption_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="label_smoothing"):
        ContrastiveLoss(label_smoothing=1.0)


# ---- two processes (gloo) -----------------------------------------------------------------------------------------

WORLD, GLOBAL_BATCH = 2, 8


def _batch_with_duplicates() -> tuple[torch.Tensor, torch.Tensor]:
    images = random_images(GLOBAL_BATCH, 32, seed=11)
    tokens = random_tokens(GLOBAL_BATCH, 32, seed=12)
    tokens[5] = tokens[6] = tokens[1]  # one caption on both ranks (rows 0-3 | 4-7)
    tokens[3] = tokens[2]  # another within rank 0
    return images, tokens


def _model(bias: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"init_logit_bias": -10.0, "init_logit_scale": math.log(10)} if bias else {}
    return create_model("tiny", vision={"layers": 1}, text={"layers": 1}, dtype=torch.float64, **extra)


DIST_LOSSES = {
    "sigmoid": (True, lambda chunk: SigmoidLoss(chunk_size=chunk)),
    "sigmoid_multi": (True, lambda chunk: SigmoidLoss(chunk_size=chunk, multi_positive=True)),
    "softmax_multi": (False, lambda chunk: ContrastiveLoss(chunk_size=chunk, multi_positive=True)),
    "softmax_multi_smooth": (
        False,
        lambda chunk: ContrastiveLoss(chunk_size=chunk, multi_positive=True, label_smoothing=0.1),
    ),
}


def _step(model, loss_fn, micro_batches, reduce) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module = getattr(model, "module", model)
    module.zero_grad(set_to_none=True)
    loss = compute_gradients(model, loss_fn, micro_batches)
    return reduce(loss), {name: p.grad.clone() for name, p in module.named_parameters()}


def _recipes_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from clipforge.distributed import all_reduce_mean

    _set_torchrun_env(rank, world, port)
    results: dict = {}
    try:
        init_distributed(backend="gloo", timeout_s=60)
        images, tokens = _batch_with_duplicates()
        rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        local = [(images[rows].double(), tokens[rows])]
        for name, (bias, make) in DIST_LOSSES.items():
            model = torch.nn.parallel.DistributedDataParallel(_model(bias))
            for chunk in (None, 3):
                results[f"{name}_{chunk}"] = _step(model, make(chunk), local, all_reduce_mean)
        # Two micro-batches per rank under DDP, twice in a row (a parameter left out of the synchronised backward
        # would fail the second step): the trainer's cached-feature path with the bias and gathered caption ids.
        model = torch.nn.parallel.DistributedDataParallel(_model(True))
        micro = [(local[0][0][:2], local[0][1][:2]), (local[0][0][2:], local[0][1][2:])]
        for _ in range(2):
            results["accumulated"] = _step(model, SigmoidLoss(multi_positive=True), micro, all_reduce_mean)
        cleanup()
    except BaseException:
        results["error"] = traceback.format_exc()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def recipe_ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("recipes_dist")
    exitcodes = _run_ranks(_recipes_worker, (str(out_dir),), world=WORLD)
    results = []
    for rank in range(WORLD):
        path = out_dir / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} wrote no results (exit codes {exitcodes})"
        result = torch.load(path, weights_only=True)
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"
        results.append(result)
    return results


def _assert_same_step(got, expected, what, tol=1e-10):
    loss, grads = got
    expected_loss, expected_grads = expected
    assert abs(loss.item() - expected_loss.item()) <= tol, f"{what}: loss {loss} vs {expected_loss}"
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        err = (grad - expected_grads[name]).abs().max().item() / max(
            1.0, expected_grads[name].abs().max().item()
        )
        assert err <= tol, f"{what}: grad of {name} differs by {err:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DIST_LOSSES))
@pytest.mark.parametrize("chunk", [None, 3])
def test_two_ranks_match_one_process(recipe_ranks, name, chunk):
    images, tokens = _batch_with_duplicates()
    bias, make = DIST_LOSSES[name]
    expected = _step(_model(bias), make(chunk), [(images.double(), tokens)], torch.Tensor.detach)
    if bias:
        assert expected[1]["logit_bias"].abs().item() > 1e-6  # the bias gradient is compared, not zero
    for rank, result in enumerate(recipe_ranks):
        _assert_same_step(result[f"{name}_{chunk}"], expected, f"rank {rank} {name} chunk {chunk}")


@pytest.mark.slow
def test_two_ranks_with_accumulation_match_one_process(recipe_ranks):
    images, tokens = _batch_with_duplicates()
    expected = _step(
        _model(True), SigmoidLoss(multi_positive=True), [(images.double(), tokens)], torch.Tensor.detach
    )
    for rank, result in enumerate(
        recipe_ranks
    ):  # cached features are float32 (train.step): float32 tolerance
        _assert_same_step(result["accumulated"], expected, f"rank {rank}", tol=1e-5)


# ---- the model: logit bias, fixed temperature, patch dropout ------------------------------------------------------


def test_logit_bias_only_when_configured():
    plain = create_model("tiny")
    assert plain.logit_bias is None and "logit_bias" not in plain.state_dict()
    siglip = create_model("tiny", init_logit_bias=-10.0)
    assert siglip.logit_bias.item() == -10.0 and "logit_bias" in siglip.state_dict()
    assert get_model_config("tiny").init_logit_bias is None


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_fixed_temperature_is_unchanged_by_optimizer_steps(accum):
    torch.manual_seed(0)
    model = create_model("tiny", vision={"layers": 1}, text={"layers": 1}, init_logit_bias=-10.0,
                         init_logit_scale=math.log(10))  # fmt: skip
    freeze_temperature(model)
    scale, bias = model.logit_scale.detach().clone(), model.logit_bias.detach().clone()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(model.logit_scale) not in held and id(model.logit_bias) not in held
    before = model.text.proj.weight.detach().clone()
    images, tokens = random_images(8, 32, seed=1), random_tokens(8, 32, seed=2)
    size = 8 // accum
    micro = [(images[i : i + size], tokens[i : i + size]) for i in range(0, 8, size)]
    for _ in range(3):
        loss = compute_gradients(model, SigmoidLoss(), micro)
        assert model.logit_scale.grad is None and model.logit_bias.grad is None
        assert apply_update(model, optimizer, loss, grad_clip=1.0).applied
    assert torch.equal(model.logit_scale, scale) and torch.equal(model.logit_bias, bias)
    assert not torch.equal(model.text.proj.weight, before)


def test_drop_patches_keeps_the_class_token_and_distinct_patches():
    tokens = torch.arange(2 * 17, dtype=torch.float32).reshape(2, 17, 1).expand(2, 17, 3).contiguous()
    kept = drop_patches(tokens, 0.5)
    assert kept.shape == (2, 1 + kept_patches(16, 0.5), 3) == (2, 9, 3)
    for row in range(2):
        values = kept[row, :, 0]
        assert values[0] == tokens[row, 0, 0]  # class token first
        patches = values[1:]
        assert torch.all(patches[1:] > patches[:-1])  # distinct, in grid order
        assert set(patches.tolist()) <= set(tokens[row, 1:, 0].tolist())
    assert kept_patches(49, 0.5) == 24 and kept_patches(49, 0.75) == 12 and kept_patches(4, 0.99) == 1


@pytest.mark.slow
def test_patch_dropout_in_the_vit():
    torch.manual_seed(0)
    model = create_model("tiny", vision={"patch_dropout": 0.75}).train()
    reference = create_model("tiny").eval()
    reference.load_state_dict(model.state_dict())
    seen = []
    model.visual.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    images, tokens = random_images(3, 32, seed=4), random_tokens(3, 32, seed=5)
    out = model(images, tokens)
    assert out.image_features.shape == (3, 128)
    assert seen == [1 + kept_patches(64, 0.75)] == [17]  # class token + round(0.25 * 64) of the 8 x 8 patches
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), reference.encode_image(images))
    assert torch.equal(model.encode_image(images), reference.encode_image(images))  # eval with autograd too
    assert seen[1:] == [65, 65]
    with pytest.raises(ConfigError, match="patch_dropout"):
        create_model("tiny", vision={"patch_dropout": 1.0})
    with pytest.raises(ConfigError, match="needs a ViT"):
        create_model("RN50", vision={"patch_dropout": 0.5})


def test_accumulation_replays_the_patch_dropout_draws():
    """Cached features and their recompute draw the same patches: the accumulated gradient is the gradient of the
    loss on exactly the features whose gradients are back-propagated."""
    torch.manual_seed(0)
    model = create_model("tiny", vision={"layers": 1, "patch_dropout": 0.5}, text={"layers": 1})
    images, tokens = random_images(8, 32, seed=1), random_tokens(8, 32, seed=2)
    micro = [(images[:4], tokens[:4]), (images[4:], tokens[4:])]
    loss_fn = ContrastiveLoss()
    torch.manual_seed(1)
    loss = compute_gradients(model, loss_fn, micro)
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    outs = [model(x, t) for x, t in micro]
    direct = loss_fn(torch.cat([o.image_features for o in outs]), torch.cat([o.text_features for o in outs]),
                     outs[0].logit_scale)  # fmt: skip
    direct.backward()
    assert abs(loss.item() - direct.item()) <= 1e-6
    for name, param in model.named_parameters():
        assert_close_relative(accumulated[name], param.grad, 1e-6, name)


@pytest.mark.slow
def test_logit_bias_and_patch_dropout_through_open_clip(tmp_path):
    """open_clip builds the bias from init_logit_bias and reads patch_dropout from vision_cfg; both come back."""
    torch.manual_seed(0)
    model = create_model("tiny", init_logit_bias=-7.0, vision={"patch_dropout": 0.5}).eval()
    with torch.no_grad():
        model.logit_bias.fill_(-6.5)  # a trained value, not the init
    folder = export_checkpoint(model, tmp_path / "oc", to="open_clip")
    back = load_checkpoint(folder)
    assert back.config.init_logit_bias is not None and back.config.vision.patch_dropout == 0.5
    assert back.logit_bias.item() == -6.5
    weights = export_checkpoint(model, tmp_path / "w.pt", to="open_clip")  # bare tensors: bias inferred
    assert load_checkpoint(weights, activation="gelu").logit_bias.item() == -6.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import open_clip

        reference = open_clip.create_model(f"local-dir:{folder}").eval()
    assert reference.logit_bias.item() == -6.5
    assert reference.visual.patch_dropout.prob == 0.5
    images = random_images(2, model.image_size)
    with torch.no_grad():
        assert (reference.encode_image(images) - model.encode_image(images)).abs().max() <= 1e-5
    with pytest.raises(CheckpointError, match="logit_bias"):  # Hugging Face CLIPModel has no bias
        export_checkpoint(model, tmp_path / "hf", to="hf")


# ---- configuration ------------------------------------------------------------------------------------------------


def _config(**overrides):
    base = {"data.train": ["x"], "steps": 1}
    return resolve_train_config(None, {**base, **overrides})


def test_loss_options_resolve_and_validate():
    config = _config(**{"loss.kind": "sigmoid", "loss.multi_positive": True, "loss.learn_temperature": False})
    assert (config.loss.kind, config.loss.multi_positive, config.loss.learn_temperature) == (
        "sigmoid",
        True,
        False,
    )
    assert _config().loss.kind == "softmax" and _config().loss.label_smoothing == 0.0
    bad = [
        ({"loss.kind": "hinge"}, "loss.kind"),
        ({"loss.label_smoothing": 1.5}, "loss.label_smoothing: must be in"),
        ({"loss.kind": "sigmoid", "loss.label_smoothing": 0.1}, "softmax loss only"),
        ({"objective": "bag_of_words", "loss.kind": "sigmoid"}, "only the contrastive objective"),
        ({"data.tag_dropout": 1.0}, "data.tag_dropout"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            _config(**overrides)


def test_sigmoid_loss_sets_siglip_init_unless_given():
    tiny = get_model_config("tiny")
    sigmoid = _config(**{"loss.kind": "sigmoid"})
    assert loss_model_defaults(sigmoid, tiny) == {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}
    assert loss_model_defaults(_config(), tiny) == {}
    own = dataclasses.replace(tiny, init_logit_scale=2.0, init_logit_bias=-3.0)
    assert loss_model_defaults(sigmoid, own) == {}
    objective = get_objective("contrastive", loss="softmax")
    with pytest.raises(ConfigError, match="init_logit_bias"):
        objective.build_model(own)


# ---- through the trainer ------------------------------------------------------------------------------------------


def _train_overrides(data: Path, out: Path, name: str, steps: int, **extra) -> dict:
    return {
        "model": "tiny", "data.train": [str(data)], "data.batch_size": 16, "data.num_workers": 0,
        "data.shuffle_buffer": 32, "steps": steps, "optim.warmup_steps": 2, "run.output_dir": str(out),
        "run.name": name, "run.log_every": 1, "run.checkpoint_every": 2, "run.progress": False, **extra,
    }  # fmt: skip


STOCHASTIC_RECIPES = {
    "loss.kind": "sigmoid",
    "loss.multi_positive": True,
    "accum_steps": 2,
    "data.caption": "random",  # openclipart's third caption is a keyword list
    "data.tag_dropout": 0.3,
    "data.tag_shuffle": True,
    "model_overrides": {
        "vision.patch_dropout": 0.5,
        "preprocess.train_hflip": 0.5,
        "preprocess.train_color_jitter": [0.3, 0.3, 0.3],
    },
}


@pytest.mark.slow
def test_resume_with_random_recipes_is_bitwise_identical(tmp_path):
    """Patch dropout draws from torch's RNG every step; flips, jitter and tag dropout from the per-sample
    generators. A run resumed from its step-2 checkpoint ends with exactly the uninterrupted run's weights."""
    data = BUILTIN / "openclipart" / "train"
    summary = train(
        resolve_train_config(None, _train_overrides(data, tmp_path, "full", 4, **STOCHASTIC_RECIPES))
    )
    full = Path(summary.run_dir)
    assert (full / "checkpoints" / "step_00000002.pt").is_file()
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_00000002.pt", resumed_dir / "checkpoints")
    train(resume=resumed_dir)
    expected, got = load_file(full / "model.safetensors"), load_file(resumed_dir / "model.safetensors")
    assert expected.keys() == got.keys() and "logit_bias" in got
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    losses = [r["loss"] for r in read_metrics(full)]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


@pytest.mark.slow
def test_trainer_with_fixed_temperature_and_label_smoothing(tmp_path):
    table = digits_table(tmp_path / "digits", n=64)  # 30 distinct captions: duplicates in every batch
    overrides = _train_overrides(table, tmp_path, "fixed", 3, **{
        "loss.label_smoothing": 0.1, "loss.multi_positive": True, "loss.learn_temperature": False,
        "accum_steps": 2,
    })  # fmt: skip
    summary = train(resolve_train_config(None, overrides))
    scales = [r["logit_scale"] for r in read_metrics(Path(summary.run_dir))]
    init = torch.tensor(math.log(1 / 0.07))  # the parameter's float32 value
    assert scales == [init.exp().item()] * 3
    model = load_checkpoint(Path(summary.run_dir) / "model.safetensors")
    assert torch.equal(model.logit_scale.detach(), init) and model.logit_bias is None
