"""Preprocessing against open_clip / torchvision (the references OpenAI CLIP's preprocessing is defined by)."""

from __future__ import annotations

import pickle
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.config import get_model_config, merge
from clipforge.transforms import (
    EvalTransform,
    TrainTransform,
    center_crop,
    get_transforms,
    image_to_tensor,
    random_resized_crop_box,
    shortest_side_size,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    open_clip_transform = pytest.importorskip("open_clip.transform")
    tv_functional = pytest.importorskip("torchvision.transforms.functional")
    tv_transforms = pytest.importorskip("torchvision.transforms")

# (width, height): square, wide, tall, tiny, odd, extreme aspect ratios, already the target size
SIZES = [
    (224, 224),
    (640, 480),
    (480, 640),
    (10, 7),
    (7, 10),
    (1, 1),
    (225, 223),
    (301, 199),
    (199, 301),
    (333, 333),
    (1000, 37),
    (37, 1000),
    (226, 224),
    (224, 227),
    (512, 512),
]


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Noise plus a smooth gradient: noise exercises every filter tap, the gradient the rounding."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    noise = rng.integers(0, 256, (height, width, channels))
    ramp = np.linspace(0, 255, width)[None, :, None]
    pixels = ((noise + ramp) / 2).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def reference_eval(size: int, **kwargs):
    return open_clip_transform.image_transform(size, is_train=False, **kwargs)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_eval_matches_open_clip(width, height):
    image = random_image(width, height, seed=width * 1000 + height)
    ours = get_transforms("ViT-B-32")(image)
    ref = reference_eval(224)(image)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32 and ours.is_contiguous()
    assert (ours - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize(("width", "height"), [(97, 61), (61, 97), (48, 48), (5, 300)])
def test_eval_with_other_size_mean_std_matches_open_clip(width, height):
    mean, std = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)
    config = merge(
        get_model_config("tiny"),
        {"vision.image_size": 48, "preprocess.mean": list(mean), "preprocess.std": list(std)},
    )
    image = random_image(width, height, seed=3)
    ours = get_transforms(config)(image)
    ref = reference_eval(48, mean=mean, std=std)(image)
    assert ours.shape == (3, 48, 48)
    assert (ours - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    ("overrides", "reference_kwargs"),
    [
        ({"preprocess.interpolation": "bilinear"}, {"interpolation": "bilinear"}),
        ({"preprocess.resize_mode": "squash"}, {"resize_mode": "squash"}),
    ],
)
def test_eval_interpolation_and_squash_match_open_clip(overrides, reference_kwargs):
    config = merge(get_model_config("tiny"), overrides)
    for width, height in [(90, 50), (50, 90), (13, 8), (32, 32)]:
        image = random_image(width, height, seed=width)
        ref = reference_eval(32, **reference_kwargs)(image)
        assert (get_transforms(config)(image) - ref).abs().max().item() <= 1e-6


def test_eval_greyscale_matches_open_clip_despite_converting_first():
    # clipforge converts to RGB before resizing, OpenAI after cropping; for greyscale the order makes no difference.
    image = random_image(123, 77, mode="L")
    assert (get_transforms("ViT-B-32")(image) - reference_eval(224)(image)).abs().max().item() <= 1e-6


def test_palette_image_is_converted_before_resizing():
    # OpenAI's order would resize palette indices (nearest-neighbour); clipforge resizes the colours.
    rgb = random_image(70, 50)
    palette = rgb.quantize(64)
    transform = get_transforms("tiny")
    assert torch.equal(transform(palette), transform(palette.convert("RGB")))
    assert not torch.equal(transform(palette), reference_eval(32)(palette))


def test_transparent_pixels_become_the_fill_colour():
    config = merge(get_model_config("tiny"), {"preprocess.fill_color": [10, 200, 30]})
    transparent = Image.new("RGBA", (40, 60), (255, 0, 0, 0))
    expected = image_to_tensor(Image.new("RGB", (32, 32), (10, 200, 30)))
    assert torch.equal(get_transforms(config)(transparent), expected)
    assert torch.equal(get_transforms(config, train=True)(transparent), expected)


def test_image_to_tensor_matches_torchvision_to_tensor_and_normalize():
    image = random_image(31, 17)
    ref = tv_transforms.Normalize(clipforge.config.CLIP_MEAN, clipforge.config.CLIP_STD)(
        tv_transforms.ToTensor()(image)
    )
    ours = image_to_tensor(image)
    assert ours.shape == (3, 17, 31) and torch.equal(ours, ref)
    with pytest.raises(ValueError, match="RGB"):
        image_to_tensor(image.convert("L"))


def test_size_and_crop_rules_match_torchvision():
    for width in range(1, 60, 7):
        for height in range(1, 60, 5):
            new_w, new_h = shortest_side_size(width, height, 24)
            ref_h, ref_w = tv_functional._compute_resized_output_size((height, width), [24])
            assert (new_w, new_h) == (ref_w, ref_h)
    # smaller than the crop (padding) and odd differences (round-half-even offsets)
    for width, height in [(5, 9), (9, 5), (3, 3), (20, 11), (11, 20), (27, 29), (28, 31)]:
        image = random_image(width, height, seed=width + height)
        ours, ref = center_crop(image, 16), tv_functional.center_crop(image, [16, 16])
        assert ours.size == (16, 16) and np.array_equal(np.asarray(ours), np.asarray(ref))


# ----------------------------------------------------------------------------------------------------------------
# Training transform


def test_train_matches_open_clip_for_the_same_torch_seed():
    image = random_image(300, 200)
    for scale in [(0.9, 1.0), (0.08, 1.0)]:
        config = merge(get_model_config("tiny"), {"preprocess.train_crop_scale": list(scale)})
        reference = open_clip_transform.image_transform(32, is_train=True, aug_cfg={"scale": scale})
        ours = get_transforms(config, train=True)
        for seed in range(5):
            torch.manual_seed(seed)
            expected = reference(image)
            torch.manual_seed(seed)
            assert torch.equal(ours(image), expected)


def test_crop_boxes_match_torchvision_including_the_fallback():
    # Extreme aspect ratios with a large minimum scale make every attempt fail: the center-crop fallback.
    for width, height, scale in [(640, 480, (0.08, 1.0)), (1000, 10, (0.5, 1.0)), (10, 1000, (0.5, 1.0))]:
        image = Image.new("RGB", (width, height))
        for seed in range(20):
            torch.manual_seed(seed)
            top, left, h, w = tv_transforms.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
            torch.manual_seed(seed)
            assert random_resized_crop_box(width, height, scale) == (left, top, w, h)


def test_train_output_and_determinism():
    # 120x100 leaves room for crops of 90-100% area with aspect in (3/4, 4/3); 150x100 would always fall back
    # to the deterministic center crop.
    image = random_image(120, 100)

    def run(seed: int) -> torch.Tensor:
        return get_transforms("tiny", train=True, generator=torch.Generator().manual_seed(seed))(image)

    out = run(0)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, run(0))
    assert not torch.equal(out, run(1))


def test_train_uses_global_rng_when_no_generator_so_state_can_be_restored():
    transform = get_transforms("tiny", train=True)
    image = random_image(150, 100)
    state = torch.get_rng_state()
    first = [transform(image) for _ in range(3)]
    torch.set_rng_state(state)
    assert all(torch.equal(a, transform(image)) for a in first)


def test_full_scale_square_crop_is_a_plain_resize():
    config = merge(get_model_config("tiny"), {"preprocess.train_crop_scale": [1.0, 1.0]})
    image = random_image(90, 90)
    out = get_transforms(config, train=True, generator=torch.Generator().manual_seed(0))(image)
    assert torch.equal(out, image_to_tensor(image.resize((32, 32), Image.Resampling.BICUBIC)))


def test_crop_statistics_are_plausible():
    gen = torch.Generator().manual_seed(0)
    side, scale = 700, (0.25, 1.0)  # square, so wide and tall crops fit equally often
    boxes = np.array([random_resized_crop_box(side, side, scale, generator=gen) for _ in range(2000)])
    left, top, w, h = boxes.T
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= side).all() and (top + h <= side).all()
    area, aspect = w * h / side**2, w / h
    assert area.min() >= 0.249 and area.max() <= 1.0
    assert aspect.min() >= 0.749 and aspect.max() <= 1.336
    assert (
        0.5 < area.mean() < 0.625
    )  # uniform in [0.25, 1] is 0.625; big crops fail more often, pulling it down
    assert abs(np.log(aspect).mean()) < 0.02  # log-uniform aspect, symmetric about 1
    assert abs((left + w / 2).mean() / side - 0.5) < 0.02 and abs((top + h / 2).mean() / side - 0.5) < 0.02


def test_crop_avoids_pillows_global_bomb_guard(monkeypatch):
    # Image.crop applies Pillow's process-wide limit to the crop; an image load_image admitted must still crop.
    image = random_image(100, 80)
    expected = get_transforms("tiny", train=True, generator=torch.Generator().manual_seed(0))(image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert torch.equal(
        get_transforms("tiny", train=True, generator=torch.Generator().manual_seed(0))(image), expected
    )


def test_transforms_pickle_for_dataloader_workers():
    image = random_image(64, 48)
    for transform in [get_transforms("tiny"), get_transforms("tiny", train=True)]:
        clone = pickle.loads(pickle.dumps(transform))
        torch.manual_seed(0)
        a = transform(image)
        torch.manual_seed(0)
        assert torch.equal(clone(image), a)
    seeded = get_transforms("tiny", train=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(pickle.loads(pickle.dumps(seeded))(image), seeded(image))


def test_generator_in_another_process_raises(monkeypatch):
    transform = get_transforms("tiny", train=True, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr("clipforge.transforms.os.getpid", lambda: -1)
    with pytest.raises(RuntimeError, match="generator=None"):
        transform(random_image(40, 40))


# ----------------------------------------------------------------------------------------------------------------
# get_transforms


def test_get_transforms_accepts_name_config_and_model():
    config = get_model_config("tiny")
    for source in ["tiny", config, types.SimpleNamespace(config=config)]:
        transform = get_transforms(source)
        assert isinstance(transform, EvalTransform)
        assert transform.image_size == 32 and transform.preprocess == config.preprocess
        assert transform(random_image(50, 40)).shape == (3, 32, 32)
    train = get_transforms(config, train=True)
    assert isinstance(train, TrainTransform) and train.scale == config.preprocess.train_crop_scale
    assert get_transforms("ViT-L-14-336").image_size == 336
    assert clipforge.get_transforms is get_transforms


def test_get_transforms_errors():
    with pytest.raises(TypeError, match="ModelConfig"):
        get_transforms(42)
    with pytest.raises(ValueError, match="train=True"):
        get_transforms("tiny", generator=torch.Generator())
    with pytest.raises(TypeError, match="load_image"):
        get_transforms("tiny")(np.zeros((8, 8, 3), np.uint8))
    bad = merge(get_model_config("tiny"), {"preprocess.train_crop_scale": [0.9, 0.5]})
    with pytest.raises(ValueError, match="train_crop_scale"):
        get_transforms(bad, train=True)


def test_repr_names_the_settings():
    assert "image_size=32" in repr(get_transforms("tiny"))
    assert "resize_mode='shortest'" in repr(get_transforms("tiny"))
    text = repr(get_transforms("tiny", train=True))
    assert text.startswith("TrainTransform(") and "scale=(0.9, 1.0)" in text


def test_train_transform_per_call_generator_overrides_global_rng():
    image = Image.new("RGB", (97, 61), (10, 200, 30))
    image.putpixel((5, 5), (255, 0, 0))
    transform = clipforge.get_transforms("tiny", train=True)
    first = transform(image, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG must not matter when a generator is passed
    again = transform(image, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
