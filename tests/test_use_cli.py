"""`clipforge classify`, `embed` and `search` (and :mod:`clipforge.inference`) on a tiny model saved to a real
checkpoint: probabilities, embeddings and rankings against a direct computation with the model; the search cache
reused and invalidated; bad images counted; errors by type and message."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.checkpoint import CheckpointError
from clipforge.cli import main
from clipforge.cli.use import read_labels, read_texts
from clipforge.inference import (
    RandomWeightsWarning,
    build_prompts,
    checkpoint_identity,
    classify,
    embed_images,
    find_images,
    load_model,
    read_embeddings,
    write_embeddings,
)
from clipforge.model import CLIP
from clipforge.search import embed_images_cached, search

LABELS = ["a red square", "a green circle", "a blue sky", "a dog"]


def _picture(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """Smooth colour blobs (distinct per seed), so embeddings differ clearly between images."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    model = clipforge.create_model("tiny")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(37.0))  # not the initial 1/0.07: the scale must really be applied
    return clipforge.save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def model(checkpoint) -> CLIP:
    return clipforge.load_checkpoint(checkpoint)


@pytest.fixture
def folder(tmp_path) -> Path:
    """5 images: 3 at the top (png, jpg, webp), 2 in a nested folder; plus a text file that is not listed."""
    root = tmp_path / "images"
    (root / "nested" / "deeper").mkdir(parents=True)
    _picture(0).save(root / "a.png")
    _picture(1).save(root / "b.jpg", quality=95)
    _picture(2).save(root / "c.webp")
    _picture(3).save(root / "nested" / "d.PNG")
    _picture(4).save(root / "nested" / "deeper" / "e.png")
    (root / "notes.txt").write_text("not an image")
    return root


def _direct_image_features(model: CLIP, paths) -> torch.Tensor:
    transform = clipforge.get_transforms(model)
    with torch.no_grad():
        raw = model.encode_image(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]))
    return raw / raw.norm(dim=-1, keepdim=True)


def _direct_text_features(model: CLIP, texts) -> torch.Tensor:
    with torch.no_grad():
        raw = model.encode_text(clipforge.get_tokenizer(model)(texts))
    return raw / raw.norm(dim=-1, keepdim=True)


def _direct_probs(model: CLIP, paths, prompts) -> np.ndarray:
    image, text = _direct_image_features(model, paths), _direct_text_features(model, prompts)
    logits = 37.0 * (image @ text.T).double().numpy()
    logits -= logits.max(axis=1, keepdims=True)
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------------------------
# inputs


def test_find_images_is_recursive_sorted_and_filtered(folder):
    (folder / "png").write_text("a file named like an extension")
    found = find_images([folder])
    assert [p.relative_to(folder).as_posix() for p in found] == [
        "a.png",
        "b.jpg",
        "c.webp",
        "nested/d.PNG",
        "nested/deeper/e.png",
    ]
    explicit = find_images([folder / "notes.txt", folder / "missing.png"])  # files are kept as given
    assert explicit == [folder / "notes.txt", folder / "missing.png"]
    (folder / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no images \(\.bmp, .*found"):
        find_images([folder / "empty"])


def test_labels_and_prompts_errors(tmp_path):
    assert read_labels(" a cat , a dog ", None) == ["a cat", "a dog"]
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("a cat, sitting\n\n  a dog \n")
    assert read_labels(None, str(labels_file)) == ["a cat, sitting", "a dog"]
    with pytest.raises(ValueError, match="label list is empty"):
        read_labels("", None)
    with pytest.raises(ValueError, match="item 2 of 3 is empty"):
        read_labels("a,,b", None)
    labels_file.write_text("\n \n")
    with pytest.raises(ValueError, match="labels.txt: the labels file holds no labels"):
        read_labels(None, str(labels_file))
    with pytest.raises(ValueError, match="label list is empty"):
        build_prompts([])
    with pytest.raises(ValueError, match="'a cat' appears twice"):
        build_prompts(["a cat", "a cat"])
    with pytest.raises(ValueError, match="has no '\\{\\}'"):
        build_prompts(["a cat"], "a photo")
    assert build_prompts(["cat"], "a photo of a {}.") == ["a photo of a cat."]


def test_read_texts_files_and_literals(tmp_path):
    texts_file = tmp_path / "t.txt"
    texts_file.write_text("first text\n\nsecond text\n")
    assert read_texts([str(texts_file), "a literal"]) == ["first text", "second text", "a literal"]


def test_missing_checkpoint_and_random_weights(checkpoint, capsys):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such checkpoint file or folder"):
        load_model(checkpoint.parent / "nope.safetensors")
    with pytest.warns(RandomWeightsWarning, match="RANDOM weights"):
        first = load_model("tiny")
    with pytest.warns(RandomWeightsWarning):
        second = load_model("tiny")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    code = main(
        ["embed", "--model", str(checkpoint.parent / "nope.safetensors"), "--texts", "x", "--out", "o.npy"]
    )
    assert code == 2
    assert "no such checkpoint file or folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# classify


@pytest.mark.slow
def test_classify_equals_direct_computation(model, folder):
    paths = find_images([folder])
    template = "a photo of {}."
    probs = classify(
        model,
        clipforge.get_tokenizer(model),
        clipforge.get_transforms(model),
        [Image.open(p) for p in paths],
        LABELS,
        template,
    )
    expected = _direct_probs(model, paths, [template.format(label) for label in LABELS])
    assert probs.shape == (5, 4)
    np.testing.assert_allclose(probs.double().numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probs.sum(dim=1).numpy(), 1.0, atol=1e-6)
    assert probs.max() - probs.min() > 0.01  # the test would not notice a wrong scale on uniform outputs


def test_classify_cli_json_counts_bad_images(checkpoint, model, folder, capsys):
    (folder / "broken.png").write_bytes(b"<html>not found</html>")
    (folder / "nested" / "empty.jpg").write_bytes(b"")
    model_args = ["--model", str(checkpoint), "--labels", ",".join(LABELS), "--top-k", "3"]
    code = main(
        ["classify", str(folder), *model_args, "--template", "a photo of {}.", "--json", "--batch-size", "2"]
    )
    assert code == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["counts"] == {"images": 7, "classified": 5, "failed": 2}
    assert sorted((Path(f["image"]).name, f["reason"]) for f in report["failed"]) == [
        ("broken.png", "not_image"),
        ("empty.jpg", "empty"),
    ]
    assert "classified 5 of 7 images; 2 failed (empty 1, not_image 1)" in captured.err
    assert "broken.png" in captured.err
    good = [Path(r["image"]) for r in report["results"]]
    expected = _direct_probs(model, good, [f"a photo of {label}." for label in LABELS])
    for result, row in zip(report["results"], expected):
        order = np.argsort(-row)[:3]
        assert [entry["label"] for entry in result["top"]] == [LABELS[i] for i in order]
        np.testing.assert_allclose([entry["prob"] for entry in result["top"]], row[order], rtol=1e-4)


def test_classify_cli_text_output_and_all_bad(checkpoint, folder, tmp_path, capsys):
    code = main(
        ["classify", str(folder / "a.png"), "--model", str(checkpoint), "--labels", "x,y,z", "--top-k", "9"]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(folder / "a.png")
    probs = [float(line.split()[0]) for line in lines[1:]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True)  # top-k capped at the number of labels
    assert sum(probs) == pytest.approx(1.0, abs=1e-3)

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code = main(
        ["classify", str(bad), str(tmp_path / "gone.jpg"), "--model", str(checkpoint), "--labels", "x,y"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "all 2 images failed to load; nothing was classified" in err
    assert "gone.jpg: file not found" in err
    code = main(["classify", str(folder), "--model", str(checkpoint), "--labels", "x,y", "--top-k", "0"])
    assert code == 2
    assert "--top-k must be at least 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# embed


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".parquet"])
def test_embed_images_round_trip(checkpoint, model, folder, tmp_path, suffix):
    out = tmp_path / f"emb{suffix}"
    assert main(["embed", "--model", str(checkpoint), "--images", str(folder), "--out", str(out)]) == 0
    keys, array = read_embeddings(out)
    paths = find_images([folder])
    assert keys == [str(p) for p in paths]
    assert array.dtype == np.float32 and array.shape == (5, model.config.embed_dim)
    np.testing.assert_allclose(array, _direct_image_features(model, paths).numpy(), atol=1e-5)
    if suffix == ".npy":
        assert (tmp_path / "emb.keys.txt").read_text().splitlines() == keys
        np.testing.assert_array_equal(np.load(out), array)
    if suffix == ".parquet":
        table = pq.read_table(out)
        assert table.column_names == ["key", "embedding"]
        assert table.column("embedding").to_pylist()[1] == pytest.approx(array[1].tolist())


@pytest.mark.slow
def test_embed_texts_unnormalised_with_workers_for_images(checkpoint, model, folder, tmp_path):
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("a red square\na dog on grass\n")
    out = tmp_path / "t.npz"
    inputs = ["--texts", str(texts_file), "an extra text"]
    code = main(
        [
            "embed",
            "--model",
            str(checkpoint),
            *inputs,
            "--out",
            str(out),
            "--no-normalize",
            "--batch-size",
            "2",
        ]
    )
    assert code == 0
    keys, array = read_embeddings(out)
    assert keys == ["a red square", "a dog on grass", "an extra text"]
    with torch.no_grad():
        raw = model.encode_text(clipforge.get_tokenizer(model)(keys))
    np.testing.assert_allclose(array, raw.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.linalg.norm(array, axis=1), 1.0)

    paths = find_images([folder])
    in_workers = embed_images(
        model, clipforge.get_transforms(model), paths, batch_size=2, workers=2, progress=False
    )
    in_process = embed_images(model, clipforge.get_transforms(model), paths, batch_size=3, progress=False)
    assert in_workers.keys == in_process.keys == [str(p) for p in paths]
    np.testing.assert_allclose(in_workers.embeddings, in_process.embeddings, atol=1e-5)


def test_embed_output_errors(checkpoint, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"out\.csv: unknown output suffix '\.csv'; use one of \.npy, \.npz"):
        write_embeddings(tmp_path / "out.csv", ["a"], np.zeros((1, 4)))
    with pytest.raises(ValueError, match="need an array"):
        write_embeddings(tmp_path / "out.npz", ["a", "b"], np.zeros((1, 4)))
    with pytest.raises(ValueError, match="contains a line break"):
        write_embeddings(tmp_path / "out.npy", ["two\nlines"], np.zeros((1, 4)))
    # The suffix is checked before anything is loaded: a missing checkpoint is not even looked at.
    code = main(["embed", "--model", "missing.safetensors", "--texts", "x", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "unknown output suffix '(none)'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# search


class _EncodeCounter:
    """Counts the images passed through ``CLIP.encode_image``."""

    def __init__(self, monkeypatch) -> None:
        self.images = 0
        original = CLIP.encode_image

        def counting(model, images, normalize=False):
            self.images += images.shape[0]
            return original(model, images, normalize)

        monkeypatch.setattr(CLIP, "encode_image", counting)


def _direct_scores(model: CLIP, paths, query: str) -> np.ndarray:
    return (_direct_image_features(model, paths) @ _direct_text_features(model, [query])[0]).numpy()


def _hits(output: str) -> list[tuple[str, float]]:
    """(path, score) of each ranked line of `clipforge search`'s output."""
    lines = output.splitlines()[1:]
    return [(line.split()[-1], float(line.split()[1])) for line in lines if not line.startswith("montage:")]


@pytest.mark.slow
def test_search_finds_the_direct_argmax_and_reuses_the_cache(
    checkpoint, model, folder, tmp_path, monkeypatch, capsys
):
    query = "a red square"
    paths = find_images([folder])
    scores = _direct_scores(model, paths, query)
    order = np.argsort(-scores)
    counter = _EncodeCounter(monkeypatch)
    cache, montage = tmp_path / "cache.npz", tmp_path / "hits.png"
    args = ["search", query, "--images", str(folder), "--model", str(checkpoint), "--cache", str(cache)]

    assert main([*args, "--top-k", "3", "--montage", str(montage)]) == 0
    assert counter.images == 5
    first = capsys.readouterr().out
    assert "0 from cache, 5 encoded" in first.splitlines()[0]
    assert [key for key, _ in _hits(first)] == [str(paths[i]) for i in order[:3]]
    assert [score for _, score in _hits(first)] == pytest.approx(scores[order[:3]].tolist(), abs=1e-4)
    with Image.open(montage) as png:
        assert png.format == "PNG" and png.width > 200

    assert main(args) == 0  # unchanged folder: nothing is encoded again
    assert counter.images == 5
    second = capsys.readouterr().out
    assert "5 from cache, 0 encoded" in second.splitlines()[0]
    assert _hits(second)[:3] == _hits(first)

    changed = paths[int(order[-1])]
    with Image.open(changed) as old:
        image_format = old.format
    _picture(99, size=(30, 30)).save(changed, format=image_format)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    assert main([*args, "--top-k", "5"]) == 0
    assert counter.images == 6  # only the changed file was encoded again
    third = capsys.readouterr().out
    assert "4 from cache, 1 encoded" in third.splitlines()[0]
    new_scores = _direct_scores(model, paths, query)
    assert abs(new_scores[order[-1]] - scores[order[-1]]) > 1e-3  # a stale cache entry would show
    assert [key for key, _ in _hits(third)] == [str(paths[i]) for i in np.argsort(-new_scores)]
    assert dict(_hits(third))[str(changed)] == pytest.approx(float(new_scores[order[-1]]), abs=1e-4)


@pytest.mark.slow
def test_search_cache_invalidated_by_other_weights_and_reports_failures(checkpoint, model, folder, tmp_path):
    transform = clipforge.get_transforms(model)
    (folder / "broken.jpg").write_bytes(b"GIF89a")
    paths, cache = find_images([folder]), tmp_path / "c.npz"
    identity = checkpoint_identity(checkpoint)
    first, stats = embed_images_cached(model, transform, paths, cache, identity, progress=False)
    assert (stats.reused, stats.encoded) == (0, 5)
    assert [(Path(f.key).name, f.reason) for f in first.failures] == [("broken.jpg", "not_image")]
    again, stats = embed_images_cached(model, transform, paths, cache, identity, progress=False)
    assert (stats.reused, stats.encoded) == (5, 0) and len(
        again.failures
    ) == 1  # failures are retried, reported
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    assert again.keys == first.keys

    other = tmp_path / "other.safetensors"
    clipforge.save_checkpoint(clipforge.create_model("tiny"), other)
    assert checkpoint_identity(other) != identity
    _, stats = embed_images_cached(model, transform, paths, cache, checkpoint_identity(other), progress=False)
    assert (stats.reused, stats.encoded) == (0, 5)
    assert "other weights" in stats.note

    cache.write_bytes(b"PK\x03\x04 a broken zip")  # an unreadable cache is rebuilt, not fatal
    _, stats = embed_images_cached(model, transform, paths, cache, identity, progress=False)
    assert (stats.reused, stats.encoded) == (0, 5) and stats.note.startswith("unreadable")
    assert embed_images_cached(model, transform, paths, cache, identity, progress=False)[1].reused == 5

    hits = search(model, clipforge.get_tokenizer(model), "a dog", again.embeddings, again.keys, top_k=2)
    assert len(hits) == 2 and hits[0].score >= hits[1].score
    with pytest.raises(ValueError, match="query is empty"):
        search(model, clipforge.get_tokenizer(model), "  ", again.embeddings, again.keys)
