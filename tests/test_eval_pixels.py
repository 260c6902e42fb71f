"""Raw-pixel features and the pixel baseline on scikit-learn's handwritten digits."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from clipforge.eval import pixels
from clipforge.eval.linear_probe import stratified_split
from clipforge.eval.pixels import pixel_baseline, pixel_features


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """L-BFGS on these small problems is BLAS-call bound; on a busy 2-core machine threaded BLAS spins and runs
    up to ~100x slower (measured: 2 s vs 0.03 s per fit), so the tests pin BLAS/OpenMP to one thread."""
    with threadpool_limits(limits=1):
        yield


def digit_images(size: int = 32) -> tuple[list[Image.Image], np.ndarray]:
    """sklearn's 8x8 digits (values 0..16) as 8-bit grey PIL images upscaled to ``size`` px, like real photos."""
    digits = load_digits()
    images = [
        Image.fromarray(np.rint(d * 255 / 16).astype(np.uint8), mode="L").resize(
            (size, size), Image.Resampling.BICUBIC
        )
        for d in digits.images
    ]
    return images, digits.target


def test_features_equal_a_manual_pillow_pipeline():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8))
    expected = (
        np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32).reshape(-1) / 255
    )
    features = pixel_features([image, image.convert("L")], size=16)
    assert features.dtype == np.float32 and features.shape == (2, 16 * 16 * 3)
    np.testing.assert_array_equal(features[0], expected)
    grey = np.asarray(image.convert("L").resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    np.testing.assert_array_equal(features[1].reshape(16, 16, 3), np.repeat(grey[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(pixel_features([image], size=16, grayscale=True)[0], grey.reshape(-1))


def test_known_values_layout_and_alpha():
    image = Image.fromarray(
        np.array([[[255, 0, 0], [0, 0, 255]], [[0, 255, 0], [51, 51, 51]]], dtype=np.uint8)
    )
    np.testing.assert_array_equal(
        pixel_features([image], size=2)[0],
        np.array(
            [1, 0, 0, 0, 0, 1, 0, 1, 0, 0.2, 0.2, 0.2], dtype=np.float32
        ),  # (row, column, channel) order
    )
    transparent = Image.new("RGBA", (5, 7), (0, 0, 0, 0))
    np.testing.assert_array_equal(pixel_features([transparent], size=3), np.ones((1, 27), dtype=np.float32))
    flat = pixel_features([Image.new("RGB", (40, 10), (102, 0, 255))], size=4)  # squashed, not cropped
    np.testing.assert_allclose(flat.reshape(16, 3), np.tile([0.4, 0.0, 1.0], (16, 1)), atol=1e-7)


def test_iterators_and_sized_inputs_agree(monkeypatch):
    monkeypatch.setattr(pixels, "_BLOCK_ROWS", 3)  # force several blocks
    images, _ = digit_images(size=12)
    images = images[:10]
    from_list = pixel_features(images, size=8, grayscale=True)
    from_generator = pixel_features((im for im in images), size=8, grayscale=True)
    np.testing.assert_array_equal(from_list, from_generator)
    assert from_list.shape == (10, 64)
    assert pixel_features(iter([]), size=8).shape == (0, 192)


def test_feature_errors():
    with pytest.raises(TypeError, match=r"images\[1\] is a ndarray"):
        pixel_features([Image.new("L", (4, 4)), np.zeros((4, 4))])
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        pixel_features([Image.new("L", (4, 4))], size=0)


@pytest.mark.slow
def test_pixel_baseline_on_digits_beats_90_percent_and_equals_direct_fit():
    images, labels = digit_images()
    train, test = np.arange(0, len(labels), 2), np.arange(1, len(labels), 2)  # a fixed split, ~900 each
    result = pixel_baseline(
        [images[i] for i in train],
        labels[train],
        [images[i] for i in test],
        labels[test],
        size=16,
        grayscale=True,
    )
    assert result.test_accuracy > 0.9
    assert result.num_classes == 10 and result.num_test == len(test)

    train_x = pixel_features([images[i] for i in train], size=16, grayscale=True)
    test_x = pixel_features([images[i] for i in test], size=16, grayscale=True)
    fit_idx, val_idx = stratified_split(labels[train], val_fraction=0.2, seed=0)
    order = np.concatenate([fit_idx, val_idx])
    scaler = StandardScaler().fit(train_x[order])
    model = LogisticRegression(C=result.c, max_iter=1000, random_state=0).fit(
        scaler.transform(train_x[order]), labels[train][order]
    )
    assert result.test_accuracy == np.mean(model.predict(scaler.transform(test_x)) == labels[test])
