"""Train/eval overlap analysis: the perceptual hash against a scipy reference and on planted near-duplicates of
real images (scikit-learn's sample photos and digit scans), the search against a brute-force numpy reference,
the montage, and input errors.

``python -m tests.test_eval_overlap`` prints the hash-distance distributions quoted in docs/eval-overlap.md.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from clipforge.eval.overlap import (
    OverlapError,
    OverlapMatch,
    analyze_overlap,
    find_overlap,
    hamming,
    perceptual_hash,
)
from clipforge.eval.overlap_montage import montage_size, overlap_montage

# ----------------------------------------------------------------------------------------------------------------
# Real images and planted near-duplicates


def sample_photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(array) for array in load_sample_images().images]  # china.jpg, flower.jpg: 640x427


def photo_tiles(photos: list[Image.Image], grid: int) -> list[Image.Image]:
    """Each photo cut into ``grid`` x ``grid`` non-overlapping tiles."""
    tiles = []
    for photo in photos:
        width, height = photo.size
        for i, j in itertools.product(range(grid), range(grid)):
            box = (i * width // grid, j * height // grid, (i + 1) * width // grid, (j + 1) * height // grid)
            tiles.append(photo.crop(box))
    return tiles


def digit_scans(indices: list[int], size: int = 64) -> list[Image.Image]:
    """scikit-learn's 8x8 digit scans as dark ink on white, upscaled (bicubic) to ``size`` pixels."""
    from sklearn.datasets import load_digits

    pixels = load_digits().images
    return [
        Image.fromarray((255 - pixels[i] * 255 / 16).clip(0, 255).astype(np.uint8), "L")
        .resize((size, size), Image.BICUBIC)
        .convert("RGB")
        for i in indices
    ]


def digit_indices(classes: range, count: int) -> list[int]:
    from sklearn.datasets import load_digits

    targets = load_digits().target
    return [int(i) for i in np.flatnonzero(np.isin(targets, list(classes)))[:count]]


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def scaled(image: Image.Image, factor: float) -> Image.Image:
    return image.resize((round(image.width * factor), round(image.height * factor)), Image.BICUBIC)


def brighter(image: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(factor)


EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "resize 0.5x": lambda image: scaled(image, 0.5),
    "resize 1.5x": lambda image: scaled(image, 1.5),
    "jpeg q30": lambda image: jpeg(image, 30),
    "jpeg q60": lambda image: jpeg(image, 60),
    "brighter 1.1x": lambda image: brighter(image, 1.1),
    "0.75x + brighter 1.05x + jpeg q45": lambda image: jpeg(brighter(scaled(image, 0.75), 1.05), 45),
}


def pixel_embed(images: list[Image.Image]) -> np.ndarray:
    """A deterministic stand-in for an image encoder: 16x16 grey pixels minus their mean (not normalised)."""
    rows = [
        np.asarray(image.convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float64).ravel()
        for image in images
    ]
    return np.stack([row - row.mean() for row in rows]) * 3.0


@dataclass
class Corpus:
    eval_images: list[Image.Image]
    train_images: list[Image.Image]
    planted: dict[int, int]  # eval index -> training index of its planted near-duplicate


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    """60 distinct eval images (20 photo crops, 40 digit scans of classes 0-4); training: a near-duplicate of every
    third eval image (the six edits in turn) among 92 distinct distractors (4x4 photo tiles, digits of classes
    5-9), shuffled. Two scans of the same digit can be pHash neighbours (see docs/eval-overlap.md), so the
    distractor digits are of other classes."""
    photos = sample_photos()
    eval_images = photo_tiles(photos, 3)
    eval_images += [photo.crop((0, 0, photo.width // 2, photo.height // 2)) for photo in photos]
    eval_images += digit_scans(digit_indices(range(5), 40))
    planted_eval = list(range(0, len(eval_images), 3))
    edits = list(EDITS.values())
    copies = [edits[n % len(edits)](eval_images[i]) for n, i in enumerate(planted_eval)]
    distractors = photo_tiles(photos, 4) + digit_scans(digit_indices(range(5, 10), 60))
    pool = copies + distractors
    order = np.random.default_rng(0).permutation(len(pool))
    position = {int(source): target for target, source in enumerate(order)}
    planted = {eval_index: position[n] for n, eval_index in enumerate(planted_eval)}
    return Corpus(eval_images, [pool[i] for i in order], planted)


def keyed(images: list[Image.Image], prefix: str):
    return ((f"{prefix}/{index:03d}", image) for index, image in enumerate(images))  # a generator: streamed


# ----------------------------------------------------------------------------------------------------------------
# The perceptual hash


def reference_phash(image: Image.Image, hash_size: int = 8) -> int:
    """The documented recipe, written independently with scipy's full 2-D DCT."""
    scipy_fft = pytest.importorskip("scipy.fft")
    side = 4 * hash_size
    gray = np.asarray(image.convert("L").resize((side, side), Image.LANCZOS), dtype=np.float64)
    block = scipy_fft.dctn(gray, type=2)[:hash_size, :hash_size].ravel()
    bits = block > np.median(block[1:])
    return int("".join("1" if bit else "0" for bit in bits), 2)


def test_perceptual_hash_matches_scipy_reference() -> None:
    photos = sample_photos()
    images = [*photo_tiles(photos, 2), *digit_scans([0, 1, 2]), photos[0].convert("L"), jpeg(photos[1], 20)]
    for image in images:
        assert perceptual_hash(image) == reference_phash(image)
        assert perceptual_hash(image, hash_size=16) == reference_phash(image, 16)
    assert perceptual_hash(photos[0]).bit_length() <= 64
    assert perceptual_hash(photos[0], hash_size=16).bit_length() > 64  # 256-bit hashes are plain ints too


def test_perceptual_hash_bits_and_modes() -> None:
    photo = sample_photos()[0]
    value = perceptual_hash(photo)
    # Median of 63 AC coefficients: exactly 31 lie above it; the DC bit (the most significant) is set.
    assert value >> 63 == 1 and value.bit_count() == 32
    assert perceptual_hash(Image.new("RGB", (50, 40), (0, 0, 0))) == 0
    assert perceptual_hash(photo.convert("L")) == value  # grey input is hashed as is, RGB is made grey first
    rgba = photo.convert("RGBA")
    rgba.putalpha(255)
    assert perceptual_hash(rgba) == value  # opaque alpha changes nothing
    with pytest.raises(OverlapError, match="hash_size must be an int >= 2"):
        perceptual_hash(photo, hash_size=1)


def test_hamming() -> None:
    assert hamming(0b1011, 0b0001) == 2
    assert hamming(0, (1 << 200) - 1) == 200
    assert hamming(12345, 12345) == 0
    with pytest.raises(OverlapError, match="non-negative"):
        hamming(-1, 3)


def test_hash_finds_exactly_the_planted_near_duplicates(corpus: Corpus) -> None:
    result, _, _ = analyze_overlap(
        keyed(corpus.eval_images, "eval"), keyed(corpus.train_images, "train"), pixel_embed, batch_size=16,
        cosine_threshold=0.98, progress=False,
    )  # fmt: skip
    assert result.hash_threshold == 6  # the default under test
    assert {m.eval_index: m.train_index for m in result.hash_matches} == corpus.planted
    assert result.duplicates_by_hash == len(corpus.planted) == 20
    for match in result.hash_matches:
        assert match.hash_distance <= 4  # measured: 0, 2 or 4 for these edits; distinct pairs are >= 8 apart
        assert (
            match.eval_key == f"eval/{match.eval_index:03d}"
            and match.train_key == f"train/{match.train_index:03d}"
        )
    # The embedding path (toy pixel embedding, threshold set from its measured gap) agrees pair for pair.
    flagged_by_embedding = {m.eval_index: m.train_index for m in result.nearest if m.cosine >= 0.98}
    assert flagged_by_embedding == corpus.planted
    assert result.duplicates_by_embedding == result.duplicates_both == result.duplicates_either == 20
    assert result.fraction_either == pytest.approx(20 / 60)
    assert result.flagged() == sorted(corpus.planted)


# ----------------------------------------------------------------------------------------------------------------
# The search against a brute-force reference


def brute_force(eval_x, train_x, eval_h, train_h, cosine_threshold, hash_threshold, k):
    eval_n = eval_x / np.linalg.norm(eval_x, axis=1, keepdims=True)
    train_n = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    similarity = eval_n @ train_n.T  # float64, the whole matrix
    top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    distances = np.array([[hamming(a, b) for b in train_h] for a in eval_h])
    by_embedding = similarity.max(axis=1) >= cosine_threshold
    by_hash = distances.min(axis=1) <= hash_threshold
    return similarity, top, distances, by_embedding, by_hash


def random_case(seed: int, num_eval: int = 150, num_train: int = 230, dim: int = 24, bits: int = 64):
    """Random features and hashes with some eval rows planted as noisy copies of training rows."""
    rng = np.random.default_rng(seed)
    train_x = rng.normal(size=(num_train, dim))
    eval_x = rng.normal(size=(num_eval, dim))
    train_h = [int.from_bytes(rng.bytes(bits // 8), "big") for _ in range(num_train)]
    eval_h = [int.from_bytes(rng.bytes(bits // 8), "big") for _ in range(num_eval)]
    for row in range(0, num_eval, 4):  # feature copies, with noise of varied size
        eval_x[row] = train_x[(row * 7) % num_train] + rng.normal(size=dim) * (0.05 + 0.1 * (row % 3))
    for row in range(1, num_eval, 5):  # hash copies with 0..9 bits flipped
        flips = rng.choice(bits, size=row % 10, replace=False)
        eval_h[row] = train_h[(row * 3) % num_train] ^ sum(1 << int(b) for b in flips)
    return eval_x, train_x, eval_h, train_h


@pytest.mark.parametrize("chunk_size", [1, 7, 100_000])
@pytest.mark.parametrize("k", [1, 3])
def test_find_overlap_matches_brute_force(chunk_size: int, k: int) -> None:
    eval_x, train_x, eval_h, train_h = random_case(seed=chunk_size + k)
    keys_e, keys_t = [f"e{i}" for i in range(len(eval_x))], [f"t{i}" for i in range(len(train_x))]
    result = find_overlap(
        eval_x, train_x, eval_h, train_h, eval_keys=keys_e, train_keys=keys_t, cosine_threshold=0.97,
        hash_threshold=6, chunk_size=chunk_size, k=k,
    )  # fmt: skip
    similarity, top, distances, by_embedding, by_hash = brute_force(
        eval_x, train_x, eval_h, train_h, 0.97, 6, k
    )
    assert 10 < by_embedding.sum() < len(eval_x) and 10 < by_hash.sum() < len(eval_x)  # both paths exercised
    assert len(result.nearest) == k * len(eval_x)
    for position, match in enumerate(result.nearest):
        rank = position % k
        assert match.eval_index == position // k
        assert match.train_index == top[match.eval_index, rank]
        assert match.cosine == pytest.approx(similarity[match.eval_index, match.train_index], abs=1e-5)
        assert match.hash_distance == distances[match.eval_index, match.train_index]
        assert (match.eval_key, match.train_key) == (f"e{match.eval_index}", f"t{match.train_index}")
    assert [m.eval_index for m in result.hash_matches] == list(np.flatnonzero(by_hash))
    for match in result.hash_matches:
        assert match.hash_distance == distances[match.eval_index].min()
        assert distances[match.eval_index, match.train_index] == match.hash_distance
        assert match.cosine == pytest.approx(similarity[match.eval_index, match.train_index], abs=1e-5)
    assert result.duplicates_by_embedding == by_embedding.sum()
    assert result.duplicates_by_hash == by_hash.sum()
    assert result.duplicates_either == (by_embedding | by_hash).sum()
    assert result.duplicates_both == (by_embedding & by_hash).sum()
    assert result.flagged() == list(np.flatnonzero(by_embedding | by_hash))


def test_hash_ties_go_to_the_higher_cosine() -> None:
    eval_x = np.array([[1.0, 0.0]])
    train_x = np.array([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0]])
    result = find_overlap(
        eval_x, train_x, [0b1], [0b0, 0b11, 0b0], eval_keys=["e"], train_keys=["a", "b", "c"]
    )
    assert [(m.train_index, m.hash_distance) for m in result.hash_matches] == [(2, 1)]
    assert result.nearest[0].train_index == 2 and result.nearest[0].cosine == pytest.approx(1.0)


def test_wide_hashes_torch_features_and_byte_table_popcount(monkeypatch: pytest.MonkeyPatch) -> None:
    eval_x, train_x, eval_h, train_h = random_case(seed=5, num_eval=40, num_train=60, bits=256)
    _, _, distances, _, by_hash = brute_force(eval_x, train_x, eval_h, train_h, 0.97, 6, 1)
    keys = {"eval_keys": [str(i) for i in range(40)], "train_keys": [str(i) for i in range(60)]}
    as_numpy = find_overlap(eval_x, train_x, eval_h, train_h, **keys)
    assert [m.eval_index for m in as_numpy.hash_matches] == list(np.flatnonzero(by_hash))
    assert [m.hash_distance for m in as_numpy.nearest] == [
        distances[m.eval_index, m.train_index] for m in as_numpy.nearest
    ]
    as_torch = find_overlap(
        torch.from_numpy(eval_x).bfloat16(), torch.from_numpy(train_x), eval_h, train_h, **keys
    )
    assert as_torch.duplicates_by_hash == as_numpy.duplicates_by_hash
    assert [m.train_index for m in as_torch.nearest] == [m.train_index for m in as_numpy.nearest]
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # numpy < 2: the byte lookup table
    assert find_overlap(eval_x, train_x, eval_h, train_h, **keys) == as_numpy


# ----------------------------------------------------------------------------------------------------------------
# Streaming, report, montage


def test_analyze_overlap_streams_in_batches_and_returns_features(corpus: Corpus) -> None:
    seen: list[int] = []

    def embed(images: list[Image.Image]) -> np.ndarray:
        seen.append(len(images))
        return pixel_embed(images)

    result, eval_features, train_features = analyze_overlap(
        keyed(corpus.eval_images, "e"), keyed(corpus.train_images, "t"), embed, batch_size=16, progress=False
    )
    assert len(corpus.train_images) == 112 and seen == [16, 16, 16, 12] + [16] * 7
    np.testing.assert_allclose(eval_features, pixel_embed(corpus.eval_images), rtol=1e-6)
    assert eval_features.dtype == train_features.dtype == np.float32
    assert train_features.shape == (len(corpus.train_images), 256)
    again = find_overlap(
        eval_features, train_features, [perceptual_hash(i) for i in corpus.eval_images],
        [perceptual_hash(i) for i in corpus.train_images], eval_keys=[f"e/{i:03d}" for i in range(60)],
        train_keys=[f"t/{i:03d}" for i in range(len(corpus.train_images))],
    )  # fmt: skip
    assert again == result  # cached features give the same answer


def test_to_dict_is_json_and_lists_closest_first() -> None:
    eval_x, train_x, eval_h, train_h = random_case(seed=3)
    result = find_overlap(
        eval_x, train_x, eval_h, train_h, eval_keys=[f"e{i}" for i in range(150)],
        train_keys=[f"t{i}" for i in range(230)], cosine_threshold=0.97,
    )  # fmt: skip
    report = json.loads(json.dumps(result.to_dict(top=5)))
    assert len(report["closest_by_embedding"]) == 5
    cosines = sorted((m.cosine for m in result.nearest), reverse=True)
    assert [pair["cosine"] for pair in report["closest_by_embedding"]] == cosines[:5]
    distances = [pair["hash_distance"] for pair in report["closest_by_hash"]]
    assert distances == sorted(distances) and distances[0] == min(
        m.hash_distance for m in result.hash_matches
    )
    assert report["flagged_eval_keys"] == [f"e{i}" for i in result.flagged()]
    assert report["fraction_either"] == pytest.approx(result.duplicates_either / 150)
    assert report["fraction_by_hash"] == pytest.approx(result.duplicates_by_hash / 150)


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_montage_draws_closest_pairs_first(tmp_path: Path) -> None:
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)]
    matches = [
        OverlapMatch(i, 10 + i, cosine, distance, f"eval-{i}", f"train-{i}")
        for i, (cosine, distance) in enumerate([(0.91, 20), (0.99, 2), (0.95, 6), (0.80, 30), (0.97, 4)])
    ]
    path = overlap_montage(
        matches, lambda i: solid(colours[i]), lambda i: solid(colours[i - 10]).convert("L"), tmp_path / "m.png",
        top=4, thumb=32, columns=3, cosine_threshold=0.95,
    )  # fmt: skip
    assert path == tmp_path / "m.png" and [p.name for p in tmp_path.iterdir()] == [
        "m.png"
    ]  # no temp file left
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == montage_size(4, thumb=32, columns=3) == (3 * (64 + 18), 2 * (32 + 30 + 12))
        montage = image.convert("RGB")
    # Cells in order of cosine: pairs 1 (0.99), 4 (0.97), 2 (0.95), 0 (0.91); pair 3 (0.80) is cut by top=4.
    cell_width, cell_height = 64 + 18, 32 + 30 + 12
    for position, pair in enumerate([1, 4, 2, 0]):
        left, top = (position % 3) * cell_width, (position // 3) * cell_height
        centre_y = top + 6 + 16
        assert montage.getpixel((left + 6 + 16, centre_y)) == colours[pair]  # eval thumbnail
        grey = round(sum(c * w for c, w in zip(colours[pair], (0.299, 0.587, 0.114))))
        assert abs(montage.getpixel((left + 6 + 32 + 6 + 16, centre_y))[0] - grey) <= 1  # training thumbnail
    assert montage.getpixel((1, 1)) == (200, 30, 30)  # pair 1 is over the cosine threshold: red frame
    assert montage.getpixel((3 * cell_width - 1 - 1, cell_height + 1)) == (255, 255, 255)  # pair 0: no frame
    # Ordering by hash distance instead puts pair 1 (2 bits) then pair 4 (4 bits) first as well, then pair 2.
    overlap_montage(matches, lambda i: solid(colours[i]), lambda i: solid(colours[i - 10]), tmp_path / "h.png",
                    top=3, thumb=32, order="hash")  # fmt: skip
    with Image.open(tmp_path / "h.png") as image:
        assert image.size == montage_size(3, thumb=32, columns=4) == (3 * (64 + 18), 32 + 30 + 12)
        assert image.convert("RGB").getpixel((2 * cell_width + 6 + 16, 6 + 16)) == colours[2]


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_mismatched_inputs_raise_clear_errors() -> None:
    x, h, keys = np.ones((3, 4)), [1, 2, 3], ["a", "b", "c"]
    good = {"eval_keys": keys, "train_keys": keys}
    cases = [
        (
            (x, x, [1, 2], h),
            good,
            "eval inputs differ in length: eval_features has 3 rows, eval_hashes 2, eval_keys 3",
        ),
        ((x, x, h, h), {"eval_keys": keys, "train_keys": ["a"]}, "train inputs differ in length"),
        (
            (x, np.ones((3, 5)), h, h),
            good,
            "feature dimensions differ: eval_features has dim 4, train_features 5",
        ),
        ((np.ones(3), x, h, h), good, r"eval_features must be 2-D \(num_images, dim\), got shape \(3,\)"),
        ((np.zeros((0, 4)), x, [], h), {"eval_keys": [], "train_keys": keys}, "eval_features is empty"),
        (
            (x, np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1.0]]), h, h),
            good,
            "train_features: rows 1 are all zeros",
        ),
        (
            (np.array([[np.nan, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]), x, h, h),
            good,
            "rows 0 hold NaN or infinity",
        ),
        ((x, x, [1, -2, 3], h), good, r"eval_hashes\[1\] is -2; hashes must be non-negative ints"),
        ((x, x, h, [1, 2, "3"]), good, r"train_hashes\[2\] is '3'"),
    ]
    for args, keys_arg, message in cases:
        with pytest.raises(OverlapError, match=message):
            find_overlap(*args, **keys_arg)
    for option, message in [
        ({"k": 4}, r"k must lie in \[1, num_train=3\], got 4"),
        ({"cosine_threshold": 1.5}, r"cosine_threshold must lie in \[-1, 1\]"),
        ({"hash_threshold": -1}, "hash_threshold must be an int >= 0"),
        ({"chunk_size": 0}, "chunk_size must be >= 1"),
    ]:
        with pytest.raises(OverlapError, match=message):
            find_overlap(x, x, h, h, **good, **option)
    assert issubclass(OverlapError, ValueError)


def test_analyze_and_montage_errors(tmp_path: Path) -> None:
    images = [("a", solid((1, 2, 3))), ("b", solid((9, 9, 9)))]
    with pytest.raises(OverlapError, match=r"embed returned shape \(1, 4\) for 2 eval images \(items 0..1\)"):
        analyze_overlap(images, images, lambda batch: np.ones((1, 4)), progress=False)
    dims = iter([np.ones((1, 4)), np.ones((1, 5))])
    with pytest.raises(OverlapError, match="embed returned dim 5 for eval items 1.., but 4 before"):
        analyze_overlap(images, images, lambda batch: next(dims), batch_size=1, progress=False)
    with pytest.raises(OverlapError, match="the train set yielded no images"):
        analyze_overlap(images, [], lambda batch: np.ones((len(batch), 4)), progress=False)
    with pytest.raises(OverlapError, match="no matches to draw"):
        overlap_montage([], solid, solid, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------------------------------------------
# The measurement behind the default hash threshold (docs/eval-overlap.md)


def print_distance_distribution() -> None:
    from sklearn.datasets import load_digits

    def histogram(values) -> str:
        counts = np.bincount(values)
        return ", ".join(f"{d}: {c}" for d, c in enumerate(counts) if c) + f" (max {max(values)})"

    photos = sample_photos()
    tiles = [tile for grid in (2, 3, 4, 5) for tile in photo_tiles(photos, grid)]
    targets = load_digits().target
    digits = digit_scans(list(range(len(targets))))
    sources = tiles + digits[:300]
    hashes = [perceptual_hash(image) for image in sources]
    # Contrast of the hash's own input (32x32 grey): near-flat images (sky) have only noise in their AC terms.
    contrast = np.array(
        [np.asarray(i.convert("L").resize((32, 32), Image.LANCZOS), float).std() for i in sources]
    )
    print(f"planted pairs: {len(tiles)} photo tiles + 300 digit scans, one pair per edit")
    planted = np.array(
        [[hamming(h, perceptual_hash(edit(i))) for h, i in zip(hashes, sources)] for edit in EDITS.values()]
    )
    for name, values in zip(EDITS, planted):
        print(f"  {name}: {histogram(values)}")
    flat = contrast < 10
    print(f"  all {planted.size}: {histogram(planted.ravel())}; share <= 6: {np.mean(planted <= 6):.4f}")
    print(f"  {flat.sum()} flat sources (grey std < 10 of 255): {histogram(planted[:, flat].ravel())}")
    print(f"  {(~flat).sum()} other sources: {histogram(planted[:, ~flat].ravel())}")
    for factor in (1.15, 1.2):
        values = [hamming(h, perceptual_hash(brighter(i, factor))) for h, i in zip(hashes, sources)]
        print(f"  brighter {factor}x (beyond 'slightly'): {histogram(values)}")
    tile_pairs = [hamming(a, b) for a, b in itertools.combinations(hashes[: len(tiles)], 2)]
    close_tiles = sum(d <= 16 for d in tile_pairs)
    print(f"distinct photo-tile pairs ({len(tile_pairs)}): min {min(tile_pairs)}, <= 16: {close_tiles}")
    digit_hashes = np.array([perceptual_hash(image) for image in digits], dtype=np.uint64)
    distances = np.bitwise_count(digit_hashes[:, None] ^ digit_hashes[None, :]).astype(np.int64)
    upper = np.triu_indices(len(digits), 1)
    same = targets[upper[0]] == targets[upper[1]]
    pairs = distances[upper]
    counts = [f"<= {t}: {(pairs <= t).sum()} ({(pairs[same] <= t).sum()} same class)" for t in (2, 4, 6, 8)]
    print(f"distinct digit pairs ({len(pairs)}): " + ", ".join(counts))
    np.fill_diagonal(distances, 99)
    for threshold in (4, 6, 8):
        share = (distances.min(axis=1) <= threshold).mean()
        print(f"  digits with another scan within {threshold} bits: {share:.3f}")
    tile_hashes = np.array(hashes[: len(tiles)], dtype=np.uint64)
    closest = np.bitwise_count(tile_hashes[:, None] ^ digit_hashes[None, :]).min()
    print(f"closest photo tile vs digit scan: {closest} bits")


if __name__ == "__main__":
    print_distance_distribution()
