"""The encode layer (clipforge.features): every caller that used to have its own loop gives the numbers of a
straightforward reference loop of ``model.encode_image`` / ``model.encode_text`` over the same tensors, the
zero-shot classifier of free-text labels is ``build_classifier`` with one template, and both feature caches
store under one identity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipforge
from clipforge.eval.zeroshot import build_classifier, zero_shot_probabilities
from clipforge.eval.zeroshot_set import ZeroShotSet
from clipforge.features import (
    encode_image_batches,
    encode_image_files,
    encode_image_tensor,
    encode_texts,
    feature_identity,
    model_fingerprint,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(5)
    model = clipforge.create_model("tiny").eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(23.0))
    return model


def _pictures(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [
        Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((40, 36)) for _ in range(n)
    ]


def _reference_images(model, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The loop every caller had: encode_image per batch, float32, L2-normalised."""
    with torch.no_grad():
        parts = [F.normalize(model.encode_image(b).float(), dim=-1) for b in pixels.split(batch_size)]
    return torch.cat(parts)


@pytest.mark.slow
def test_image_tensor_and_batches_match_the_reference_loop(model):
    transform = clipforge.get_transforms(model)
    pixels = torch.stack([transform(image) for image in _pictures(7)])
    expected = _reference_images(model, pixels, 3)
    torch.testing.assert_close(encode_image_tensor(model, pixels, batch_size=3), expected, rtol=0, atol=0)
    batches = [pixels[:3], torch.zeros(0, *pixels.shape[1:]), pixels[3:]]
    out = list(encode_image_batches(model, batches))
    assert out[1][1] is None  # an empty batch is passed through, not encoded
    torch.testing.assert_close(torch.cat([out[0][1], out[2][1]]), _reference_images(model, pixels, 4))
    raw = next(encode_image_batches(model, [pixels], normalize=False))[1]
    with torch.no_grad():
        torch.testing.assert_close(raw, model.encode_image(pixels), rtol=0, atol=0)
    model.train()  # the layer evaluates in eval mode and gives the caller's mode back
    encode_image_tensor(model, pixels[:2])
    assert model.training
    model.eval()


@pytest.mark.slow
def test_image_files_match_the_reference_and_report_failures(model, tmp_path):
    paths = []
    for i, image in enumerate(_pictures(5)):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.insert(2, tmp_path / "bad.png")
    result = encode_image_files(model, clipforge.get_transforms(model), paths, batch_size=2, progress=False)
    assert [f.reason for f in result.failures] == ["not_image"]
    assert result.keys == [str(p) for p in paths if p.name != "bad.png"]
    transform = clipforge.get_transforms(model)
    good = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths if p.name != "bad.png"])
    np.testing.assert_allclose(result.embeddings, _reference_images(model, good, 1).numpy(), atol=1e-6)


@pytest.mark.slow
def test_texts_and_the_classifier_of_free_text_labels(model):
    tokenizer = clipforge.get_tokenizer(model)
    texts = ["a cat", "a dog", "a red square", "a blue sky", "a tree"]
    with torch.no_grad():
        reference = F.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1)
    np.testing.assert_allclose(
        encode_texts(model, tokenizer, texts, batch_size=2), reference.numpy(), atol=1e-6
    )
    # classify's classifier: build_classifier with one template is the prompts' normalised embeddings [D, L]
    from clipforge.inference import classify, label_classifier

    labels = texts[:3]
    classifier = label_classifier(model, tokenizer, labels, "a photo of {}.")
    with torch.no_grad():
        prompts = F.normalize(
            model.encode_text(tokenizer([f"a photo of {x}." for x in labels])).float(), dim=-1
        )
    torch.testing.assert_close(classifier, prompts.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(classifier, build_classifier(model, tokenizer, labels, ["a photo of {}."]))
    # probabilities at the model's own scale: softmax(exp(logit_scale) * cosine)
    transform = clipforge.get_transforms(model)
    images = _pictures(4)
    pixels = torch.stack([transform(image) for image in images])
    cosine = _reference_images(model, pixels, 4) @ prompts.T
    expected = (23.0 * cosine.double()).softmax(dim=-1)
    probs = classify(model, tokenizer, transform, images, labels, "a photo of {}.")
    torch.testing.assert_close(probs.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        zero_shot_probabilities(_reference_images(model, pixels, 4), prompts.T, 23.0).double(),
        expected,
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.slow
def test_zero_shot_set_features_and_objective_accuracy(model):
    transform = clipforge.get_transforms(model)
    images = _pictures(6)
    data = ZeroShotSet("toy", images, np.array([0, 1, 0, 1, 0, 1]), ("cat", "dog"), ("a {}",))
    pixels = torch.stack([transform(image) for image in images])
    expected = _reference_images(model, pixels, 4)
    torch.testing.assert_close(data.image_features(model, batch_size=4), expected, atol=1e-6, rtol=0)
    # the contrastive rule through the set equals argmax of features @ classifier
    from clipforge.objectives import get_objective

    tokenizer = clipforge.get_tokenizer(model)
    classifier = build_classifier(model, tokenizer, ["cat", "dog"], ["a {}"])
    right = ((expected @ classifier).argmax(dim=1).numpy() == data.labels).mean()
    scorer = get_objective("contrastive").zero_shot_scorer
    assert data.accuracy(model, scorer, tokenizer=tokenizer, batch_size=4) == pytest.approx(right)
    same = ZeroShotSet.from_tensors("toy", pixels, data.labels, ("cat", "dog"), ("a {}",))
    assert same.accuracy(model, scorer, tokenizer=tokenizer, batch_size=5) == pytest.approx(right)


def test_one_identity_for_cached_features(model):
    fingerprint = model_fingerprint(model)
    transform = repr(clipforge.get_transforms(model))
    key = feature_identity(model=fingerprint, transform=transform, precision="fp32")
    assert key == feature_identity(precision="fp32", transform=transform, model=fingerprint)  # order-free
    assert key != feature_identity(model=fingerprint, transform=transform, precision="bf16")
    from clipforge.eval.features import FeatureCache

    assert FeatureCache("/nonexistent").key(model=fingerprint, transform=transform, precision="fp32") == key
