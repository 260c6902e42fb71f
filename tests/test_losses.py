"""The contrastive loss: naive against explicit cross-entropy and open_clip, chunked against naive, gradcheck.

Tolerances are relative to the largest value compared (floored at 1). In float32 chunked and naive agree to
1e-6 at scale 14.3. At scale 100 a float32 logit near 100 is only known to ±4e-6, so any two float32
implementations (and naive float32 against float64: measured 1.8e-6) differ by more than 1e-6 in the
gradients; there the bound is 3e-6, and the float64 tests show the chunked algorithm itself is exact (1e-12).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from clipforge.losses import (
    ContrastiveLoss,
    _ChunkedInfoNCE,
    _ChunkedSymmetricInfoNCE,
    _one_direction,
    auto_chunk_size,
    contrastive_loss,
)


def pair_features(batch: int, dim: int = 32, seed: int = 0, dtype=torch.float32):
    """L2-normalised image and text features where each text is close to its image (a trained-like batch)."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(image + 0.8 * torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1)
    return image.to(dtype), text.to(dtype)


def loss_and_grads(loss_fn, image, text, scale):
    image = image.clone().requires_grad_()
    text = text.clone().requires_grad_()
    scale = torch.tensor(scale, dtype=image.dtype, requires_grad=True)
    loss = loss_fn(image, text, scale)
    grads = torch.autograd.grad(loss, (image, text, scale))
    return (loss.detach(), *grads)


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max |Δ| {err:.3g} > {tol:g} × {scale:.3g}"


def explicit_cross_entropy(image, text, scale):
    labels = torch.arange(image.shape[0])
    logits_per_image = scale * image @ text.T
    logits_per_text = scale * text @ image.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("scale", [14.3, 100.0])
def test_naive_equals_explicit_cross_entropy_and_open_clip(batch, scale):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from open_clip.loss import ClipLoss

    image, text = pair_features(batch)
    ours = loss_and_grads(contrastive_loss, image, text, scale)
    explicit = loss_and_grads(explicit_cross_entropy, image, text, scale)
    reference = loss_and_grads(ClipLoss(), image, text, scale)
    module = loss_and_grads(ContrastiveLoss(), image, text, scale)
    for name, other in (("explicit", explicit), ("open_clip", reference), ("module", module)):
        for part, a, b in zip(("loss", "d image", "d text", "d scale"), ours, other):
            assert_close_relative(a, b, 1e-6, f"{name} {part}")


def test_known_values():
    # Orthonormal features, perfectly matched: every row is softmax over [s, 0, 0, ...].
    batch, scale = 4, 10.0
    eye = torch.eye(batch)
    expected = torch.log(torch.exp(torch.tensor(scale)) + batch - 1) - scale
    assert torch.allclose(contrastive_loss(eye, eye, torch.tensor(scale)), expected, atol=1e-6)
    # Identical features everywhere: uniform softmax, loss log(B) whatever the scale.
    same = F.normalize(torch.ones(batch, 3), dim=-1)
    assert torch.allclose(contrastive_loss(same, same, 50.0), torch.log(torch.tensor(4.0)), atol=1e-6)


FLOAT32_TOL = {14.3: 1e-6, 100.0: 3e-6}
# Tiny chunks at large B are hundreds of small ops (slow on a busy CPU) and add nothing the small-B cases miss.
CHUNKED_CASES = [
    (b, c)
    for b in (1, 7, 64, 300, 1024)
    for c in (1, 3, 64, 2048)
    if not (b >= 300 and c == 1) and (b, c) != (1024, 3)
]


@pytest.mark.parametrize(("batch", "chunk"), CHUNKED_CASES)
@pytest.mark.parametrize("scale", [14.3, 100.0])
def test_chunked_equals_naive(batch, chunk, scale):
    tol = FLOAT32_TOL[scale]
    image, text = pair_features(batch, seed=batch)
    naive = loss_and_grads(contrastive_loss, image, text, scale)
    chunked = loss_and_grads(lambda x, y, s: contrastive_loss(x, y, s, chunk), image, text, scale)
    directional = loss_and_grads(
        lambda x, y, s: (_one_direction(x, y, s, 0, chunk) + _one_direction(y, x, s, 0, chunk)) / 2,
        image,
        text,
        scale,
    )
    for part, a, b, c in zip(("loss", "d image", "d text", "d scale"), naive, chunked, directional):
        assert_close_relative(b, a, tol, f"symmetric {part}")
        assert_close_relative(c, a, tol, f"one-direction {part}")


@pytest.mark.parametrize(("batch", "chunk"), [(1, 1), (7, 3), (300, 64), (300, 1000)])
def test_chunked_is_exact_in_float64(batch, chunk):
    # The Functions work in the dtype they are given: in float64 they match the naive formula to rounding.
    image, text = pair_features(batch, seed=1, dtype=torch.float64)
    naive = loss_and_grads(explicit_cross_entropy, image, text, 100.0)
    symmetric = loss_and_grads(
        lambda x, y, s: _ChunkedSymmetricInfoNCE.apply(x, y, s, chunk), image, text, 100.0
    )
    directional = loss_and_grads(
        lambda x, y, s: (
            (_ChunkedInfoNCE.apply(x, y, s, 0, chunk) + _ChunkedInfoNCE.apply(y, x, s, 0, chunk)) / 2
        ),
        image,
        text,
        100.0,
    )
    for part, a, b, c in zip(("loss", "d image", "d text", "d scale"), naive, symmetric, directional):
        assert_close_relative(b, a, 1e-12, f"symmetric {part}")
        assert_close_relative(c, a, 1e-12, f"one-direction {part}")


def test_one_direction_with_offset_matches_slice_of_full_loss():
    # A rank's rows [offset, offset + b) against all keys: the distributed building block.
    image, text = pair_features(12, seed=3)
    logits = 20.0 * image @ text.T
    expected = F.cross_entropy(logits[4:8], torch.arange(4, 8))
    for chunk in (None, 1, 3, 100):
        got = _one_direction(image[4:8], text, torch.tensor(20.0), 4, chunk)
        assert_close_relative(got, expected, 1e-6, f"chunk {chunk}")


def test_gradcheck_float64():
    image, text = pair_features(5, dim=4, seed=2, dtype=torch.float64)
    inputs = (
        image.requires_grad_(),
        text.requires_grad_(),
        torch.tensor(7.5, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(lambda x, y, s: _ChunkedSymmetricInfoNCE.apply(x, y, s, 2), inputs)
    keys = torch.cat([text.detach(), image.detach()]).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, s: _ChunkedInfoNCE.apply(q, k, s, 3, 2), (inputs[0], keys, inputs[2])
    )


@pytest.mark.parametrize("chunk", [None, 16])
def test_bfloat16_inputs_give_float32_loss(chunk):
    image, text = pair_features(64, dim=64, seed=4)
    image_bf16 = image.bfloat16().requires_grad_()
    text_bf16 = text.bfloat16()
    scale = torch.tensor(14.3, dtype=torch.bfloat16, requires_grad=True)
    loss = contrastive_loss(image_bf16, text_bf16, scale, chunk)
    assert loss.dtype == torch.float32
    expected = contrastive_loss(image_bf16.float(), text_bf16.float(), scale.float())
    assert torch.allclose(loss, expected, atol=1e-6)  # the same numbers, cast up exactly
    assert abs(loss.item() - contrastive_loss(image, text, 14.3).item()) < 0.05  # bf16 rounding only
    loss.backward()
    assert image_bf16.grad.dtype == torch.bfloat16 and scale.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("chunk", [None, 16])
def test_float32_under_autocast(chunk):
    image, text = pair_features(64, dim=64, seed=4)
    expected = contrastive_loss(image, text, 14.3, chunk)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ContrastiveLoss(chunk_size=chunk)(image, text, torch.tensor(14.3))
    assert loss.dtype == torch.float32
    assert_close_relative(loss, expected, 1e-6)


def test_float64_stays_float64():
    image, text = pair_features(8, seed=5, dtype=torch.float64)
    for chunk in (None, 3):
        assert contrastive_loss(image, text, 10.0, chunk).dtype == torch.float64


def test_module_defaults_and_auto_chunk():
    image, text = pair_features(50, seed=5)
    expected = contrastive_loss(image, text, 30.0)
    for chunk in (None, "auto", 7):
        loss = ContrastiveLoss(chunk_size=chunk)(image, text, torch.tensor(30.0))
        assert loss.shape == () and loss.dtype == torch.float32
        assert_close_relative(loss, expected, 1e-6, f"chunk {chunk}")
    assert auto_chunk_size(65536) * 65536 * 4 * 3 <= 256 * 2**20
    assert auto_chunk_size(10) == 10 and auto_chunk_size(10**9) == 1
    assert auto_chunk_size(4096, budget_bytes=4 * 4096 * 3 * 100) == 100


@pytest.mark.parametrize("bad", [0, -2, 1.5, "big", True])
def test_bad_chunk_size_is_rejected(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        ContrastiveLoss(chunk_size=bad)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match=r"\[4, 8\] and \[3, 8\]"):
        contrastive_loss(torch.zeros(4, 8), torch.zeros(3, 8), 1.0)


@pytest.mark.parametrize("chunk", [1, 5])
def test_gradients_when_only_some_inputs_need_them(chunk):
    # A locked (frozen) image tower and a fixed scale: only the text features get a gradient.
    image, text = pair_features(13, seed=7)
    text_naive, text_chunked = text.clone().requires_grad_(), text.clone().requires_grad_()
    contrastive_loss(image, text_naive, 20.0).backward()
    contrastive_loss(image, text_chunked, 20.0, chunk).backward()
    assert_close_relative(text_chunked.grad, text_naive.grad, 1e-6)
    keys = text.clone().requires_grad_()
    _one_direction(image, keys, torch.tensor(20.0), 0, chunk).backward()
    expected = text.clone().requires_grad_()
    _one_direction(image, expected, torch.tensor(20.0), 0, None).backward()
    assert_close_relative(keys.grad, expected.grad, 1e-6)


def test_empty_batch_is_rejected():
    with pytest.raises(ValueError, match="empty batch"):
        contrastive_loss(torch.zeros(0, 8), torch.zeros(0, 8), 1.0)


def test_no_grad_forward_and_no_scale_grad():
    image, text = pair_features(20, seed=6)
    with torch.no_grad():
        loss = contrastive_loss(image, text, 10.0, chunk_size=6)
    assert_close_relative(loss, contrastive_loss(image, text, 10.0), 1e-6)
    image.requires_grad_()
    contrastive_loss(image, text, torch.tensor(10.0), chunk_size=6).backward()  # scale is a constant here
    assert image.grad is not None and torch.isfinite(image.grad).all()
