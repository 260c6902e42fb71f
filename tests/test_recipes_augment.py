"""Recipes for small data (issue 12), the data side: flips and colour jitter that keep captions true (decided in the
SampleDecoder from the final caption), and tag-list dropout/shuffling, all deterministic per sample generator."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from clipforge.config import ConfigError, get_model_config, merge
from clipforge.data.captions import augment_tags, mentions_colour, mentions_side, split_items
from clipforge.data.raw import RawSample
from clipforge.data.stream import SampleDecoder
from clipforge.transforms import (
    TRAIN_ASPECT_RATIO,
    TrainTransform,
    color_jitter,
    get_transforms,
    image_to_tensor,
    random_resized_crop_box,
)


def _asymmetric_image(size: int = 32) -> Image.Image:
    """Left half red, right half blue, with a green dot: any flip or colour change shows."""
    image = Image.new("RGB", (size, size), (200, 30, 30))
    image.paste((30, 30, 200), (size // 2, 0, size, size))
    image.putpixel((3, 5), (20, 220, 20))
    return image


def _transform(hflip: float = 0.0, jitter=(0.0, 0.0, 0.0)) -> TrainTransform:
    config = merge(get_model_config("tiny"), {
        "preprocess.train_crop_scale": [1.0, 1.0],  # the whole (square, 32 px) image: no crop, no resize
        "preprocess.train_hflip": hflip,
        "preprocess.train_color_jitter": list(jitter),
    })  # fmt: skip
    return get_transforms(config, train=True)


def _tensor(image: Image.Image) -> torch.Tensor:
    preprocess = get_model_config("tiny").preprocess
    return image_to_tensor(image, preprocess.mean, preprocess.std)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_flip_and_jitter_in_the_train_transform():
    image = _asymmetric_image()
    flipped = _tensor(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert torch.equal(_transform(hflip=1.0)(image, _generator()), flipped)
    assert torch.equal(_transform(hflip=1.0)(image, _generator(), allow_flip=False), _tensor(image))
    assert torch.equal(_transform()(image, _generator()), _tensor(image))  # off by default
    jitter = _transform(jitter=(0.4, 0.4, 0.4))
    jittered = jitter(image, _generator(3))
    assert not torch.equal(jittered, _tensor(image))
    assert torch.equal(jittered, jitter(image, _generator(3)))  # the generator decides
    assert torch.equal(jitter(image, _generator(3), allow_color_jitter=False), _tensor(image))
    # The jitter is the PIL brightness/contrast/saturation steps, drawn after the crop from the same generator.
    generator = _generator(3)
    random_resized_crop_box(32, 32, (1.0, 1.0), TRAIN_ASPECT_RATIO, generator)  # the crop's draws
    assert torch.equal(jittered, _tensor(color_jitter(image, (0.4, 0.4, 0.4), generator)))
    assert "hflip=1.0" in repr(_transform(hflip=1.0)) and "color_jitter=(0.4, 0.4, 0.4)" in repr(jitter)


def test_augmentation_config_is_validated():
    for overrides, message in (
        ({"preprocess.train_hflip": 1.5}, "preprocess.train_hflip"),
        ({"preprocess.train_color_jitter": [0.2, -0.1, 0.0]}, "preprocess.train_color_jitter"),
    ):
        with pytest.raises(ConfigError, match=message):
            merge(get_model_config("tiny"), overrides)


@pytest.mark.parametrize(
    ("caption", "side", "colour"),
    [
        ("an icon of a right arrow", True, False),
        ("an emoji of a backhand index pointing left", True, False),
        ("a man facing Left.", True, False),
        ("an emoji of an up-left arrow", True, False),
        ("rightwards pushing hand emoji", True, False),
        ("counterclockwise arrows button emoji", True, False),
        ("a bright button, copyright, upright piano", False, False),
        ("a red apple", False, True),
        ("an icon of a Blue circle", False, True),
        ("a greyish cloud", False, True),
        ("redundant tangerine", False, False),
    ],
)
def test_caption_words(caption, side, colour):
    assert mentions_side(caption) is side
    assert mentions_colour(caption) is colour


def _raw(caption: str, image: Image.Image) -> RawSample:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return RawSample("test/0", buffer.getvalue(), (caption,), "0.png")


def test_decoder_suppresses_flip_for_a_side_and_jitter_for_a_colour():
    image = _asymmetric_image()
    plain, flipped = _tensor(image), _tensor(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    flipper = SampleDecoder(_transform(hflip=1.0), caption_guard=True)
    assert torch.equal(flipper(_raw("an arrow pointing left", image), _generator())[0], plain)
    assert torch.equal(flipper(_raw("an arrow", image), _generator())[0], flipped)
    jitterer = SampleDecoder(_transform(jitter=(0.5, 0.5, 0.5)), caption_guard=True)
    assert torch.equal(jitterer(_raw("a red and blue flag", image), _generator(1))[0], plain)
    assert not torch.equal(jitterer(_raw("a flag", image), _generator(1))[0], plain)
    # Without caption_guard (custom transforms taking (image, generator) only) the transform decides alone.
    assert torch.equal(SampleDecoder(_transform(hflip=1.0))(_raw("left", image), _generator())[0], flipped)


def test_decoder_augments_tags_before_the_guard():
    image = _asymmetric_image()
    decoder = SampleDecoder(_transform(hflip=1.0), caption_guard=True, tag_dropout=0.999)
    tensor, caption = decoder(_raw("an arrow, left, pointing", image), _generator())
    assert caption == "an arrow"  # "left" was dropped, so the flip is allowed
    assert torch.equal(tensor, _tensor(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    untouched = SampleDecoder(_transform(), caption_guard=True)
    assert untouched(_raw("an arrow, left, pointing", image), _generator())[1] == "an arrow, left, pointing"


def test_augment_tags_known_answers():
    caption = "cat, animal, pet, cute, fluffy"
    # Draws: one uniform per item after the first, then a permutation of the kept ones.
    generator = _generator(0)
    keep = torch.rand(4, generator=generator) >= 0.5
    kept = [item for item, k in zip(["animal", "pet", "cute", "fluffy"], keep.tolist()) if k]
    order = (
        torch.randperm(len(kept), generator=generator).tolist() if len(kept) > 1 else list(range(len(kept)))
    )
    expected = ", ".join(["cat", *[kept[i] for i in order]])
    assert augment_tags(caption, _generator(0), drop=0.5, shuffle=True) == expected
    assert keep.tolist() == [False, True, False, False] and expected == "cat, pet"  # pinned for this seed
    assert augment_tags(caption, _generator(0), drop=0.0, shuffle=True) == "cat, animal, pet, fluffy, cute"
    assert augment_tags(caption, _generator(1), drop=0.5) == "cat, animal, fluffy"
    assert augment_tags(caption, _generator(0), drop=0.999) == "cat"  # the first item always stays
    assert augment_tags(caption, _generator(0)) == caption  # nothing asked: unchanged
    assert augment_tags("dog,, puppy ,", _generator(0), shuffle=True) == "dog, puppy"  # empty items removed
    family = "an icon of a family (man, woman, girl), emoji, people"  # commas in brackets do not split
    assert split_items(family) == ["an icon of a family (man, woman, girl)", "emoji", "people"]
    assert augment_tags(family, _generator(0), drop=0.999) == "an icon of a family (man, woman, girl)"


def test_augment_tags_leaves_sentences_alone_and_draws_nothing():
    generator = _generator(5)
    state = generator.get_state()
    for sentence in (
        "A red and white anemone flower.",
        "an emoji of a family (man, woman, girl, girl)",
        "a,",
    ):
        assert augment_tags(sentence, generator, drop=0.5, shuffle=True) == sentence
    assert torch.equal(generator.get_state(), state)
    with pytest.raises(ValueError, match="drop"):
        augment_tags("a, b", generator, drop=1.0)
