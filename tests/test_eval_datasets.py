"""Evaluation datasets on real images (scikit-learn's digits): class folders, CSV/JSONL tables with labels and
captions, shards with classes.json / .cls / json class fields; bad images and damaged shards skipped and counted;
worker order restored; the feature cache."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import clipforge
from clipforge.data.raw import DataError, DataNotFoundError
from clipforge.data.shards import ShardWriter
from clipforge.eval.datasets import open_eval_dataset
from clipforge.eval.features import FeatureCache, encode_images
from tests.datasets import NUMBER_WORDS, caption, digit_images, png_bytes

N = 40
IMAGES, LABELS = digit_images(N)


def _tree(root: Path, n: int = N) -> Path:
    for index in range(n):
        folder = root / NUMBER_WORDS[LABELS[index]]
        folder.mkdir(parents=True, exist_ok=True)
        IMAGES[index].save(folder / f"{index:03d}.png")
    return root


def _transform(tensor_size: int = 8):
    def transform(image):
        return torch.from_numpy(
            np.asarray(image.resize((tensor_size, tensor_size)), dtype=np.float32)
        ).permute(2, 0, 1)

    return transform


def _counts(dataset, workers: int = 0, batch_size: int = 7) -> tuple[list[str], Counter, list[int]]:
    keys, skipped, labels, orders = [], Counter(), [], []
    for batch in dataset.batches(_transform(), batch_size, workers):
        keys += batch.keys
        labels += batch.labels.tolist()
        orders += batch.order.tolist()
        skipped.update(batch.skipped)
    order = np.argsort(orders, kind="stable")
    return [keys[i] for i in order], skipped, [labels[i] for i in order]


def test_class_folders_names_labels_and_bad_images(tmp_path):
    root = _tree(tmp_path / "digits")
    (root / "three" / "corrupt.png").write_bytes(png_bytes(IMAGES[0])[:60])  # truncated PNG
    (root / "five" / "empty.jpg").write_bytes(b"")
    (root / "five" / "notes.txt").write_text("not an image")
    IMAGES[1].save(root / "loose.png")  # outside any class folder
    dataset = open_eval_dataset(root)
    assert dataset.form == "class_folders"
    assert dataset.classnames == sorted({NUMBER_WORDS[label] for label in LABELS})
    assert len(dataset) == N + 2
    samples = list(dataset)
    assert len(samples) == N
    assert dataset.skipped == {"image_corrupt": 1, "image_empty": 1}
    for sample in samples:
        assert dataset.classnames[sample.label] == sample.key.split("/")[0]
        assert sample.image.mode == "RGB" and sample.captions == ()
    assert any("1 images outside the class folders" in note for note in dataset.notes)
    assert any("not images were not read: .txt 1" in note for note in dataset.notes)
    keys, skipped, labels = _counts(dataset)
    assert keys == [s.key for s in samples] and skipped == dataset.skipped
    assert labels == [s.label for s in samples]


def test_class_folder_names_from_a_file(tmp_path):
    root = _tree(tmp_path / "digits")
    names = tmp_path / "names.txt"
    folders = sorted(p.name for p in root.iterdir())
    names.write_text("\n".join(f"the digit {f}" for f in folders) + "\n")
    assert open_eval_dataset(root, classnames=names).classnames == [f"the digit {f}" for f in folders]
    names.write_text("only\ntwo\n")
    with pytest.raises(DataError, match=r"10 class folders but 2 class names were given"):
        open_eval_dataset(root, classnames=names)


def test_csv_labels_by_name_and_several_captions(tmp_path):
    folder = tmp_path / "table"
    folder.mkdir()
    with open(folder / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "label", "caption"])
        for index in range(12):
            IMAGES[index].save(folder / f"{index}.png")
            text = f"{caption(LABELS[index], index)}|{caption(LABELS[index], index + 1)}"
            writer.writerow([f"{index}.png", NUMBER_WORDS[LABELS[index]], text])
        writer.writerow(["missing.png", "one", "a caption"])
    dataset = open_eval_dataset(folder / "data.csv", caption_separator="|")
    assert dataset.form == "table"
    names = sorted({NUMBER_WORDS[label] for label in LABELS[:12]} | {"one"})
    assert dataset.classnames == names
    samples = list(dataset)
    assert len(samples) == 12 and dataset.skipped == {"image_missing": 1}
    for index, sample in enumerate(samples):
        assert names[sample.label] == NUMBER_WORDS[LABELS[index]]
        assert sample.captions == (caption(LABELS[index], index), caption(LABELS[index], index + 1))
    # Class names given: labels are looked up in them; an unknown one is an error naming the column.
    given = tmp_path / "classes.json"
    given.write_text(json.dumps({"label": NUMBER_WORDS}))
    labelled = open_eval_dataset(folder / "data.csv", classnames=given, caption_separator="|")
    assert [s.label for s in labelled] == LABELS[:12]
    given.write_text(json.dumps(["zero", "one"]))
    with pytest.raises(DataError, match=r"label\(s\) .* in column 'label' are not among the 2 class names"):
        open_eval_dataset(folder / "data.csv", classnames=given)


def test_jsonl_int_labels_and_caption_lists(tmp_path):
    lines = []
    for index in range(6):
        IMAGES[index].save(tmp_path / f"{index}.png")
        lines.append(
            {"image": f"{index}.png", "label": LABELS[index], "captions": [f"a {index}", f"b {index}"]}
        )
    lines.append({"image": "0.png", "captions": ["unlabelled"]})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    dataset = open_eval_dataset(tmp_path / "data.jsonl")
    assert dataset.classnames is None
    samples = list(dataset)
    assert [s.label for s in samples] == [*LABELS[:6], None]
    assert samples[2].captions == ("a 2", "b 2")
    (tmp_path / "bad.jsonl").write_text('{"image": "0.png", "label": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: a JSON list, not an object"):
        open_eval_dataset(tmp_path / "bad.jsonl")
    (tmp_path / "mixed.jsonl").write_text(
        '{"image": "0.png", "label": 1}\n{"image": "1.png", "label": "one"}\n'
    )
    with pytest.raises(DataError, match="mixes class names and integer labels"):
        open_eval_dataset(tmp_path / "mixed.jsonl")
    (tmp_path / "noimage.csv").write_text("picture,label\n0.png,1\n")
    with pytest.raises(DataError, match="no image column"):
        open_eval_dataset(tmp_path / "noimage.csv")


def _builtin_layout(root: Path) -> Path:
    """The built-in dataset's layout: DIR/{train,test}/shard-*.tar + manifest.json, DIR/classes.json."""
    for split, indices in (("train", range(0, 24)), ("test", range(24, N))):
        with ShardWriter(root / split, max_samples=5) as writer:
            for index in indices:
                extra = {"label": LABELS[index], "class": NUMBER_WORDS[LABELS[index]]}
                writer.write(
                    f"{index:06d}", png_bytes(IMAGES[index]), "png", caption(LABELS[index], index), extra
                )
    (root / "classes.json").write_text(json.dumps({"label": [w.upper() for w in NUMBER_WORDS]}))
    return root


def test_shards_in_the_builtin_layout(tmp_path):
    root = _builtin_layout(tmp_path / "builtin")
    with pytest.raises(DataError, match=r"holds the splits \['test', 'train'\]; pick one with split="):
        open_eval_dataset(root)
    with pytest.raises(DataNotFoundError, match="no split folder 'val'"):
        open_eval_dataset(root, split="val")
    test = open_eval_dataset(root, split="test")
    assert test.form == "shards" and len(test) == N - 24
    assert test.classnames == [w.upper() for w in NUMBER_WORDS]  # classes.json in the parent folder wins
    samples = list(test)
    assert [s.label for s in samples] == LABELS[24:]
    assert samples[0].captions == (caption(LABELS[24], 24),)
    # Without classes.json, the json "class" field names the classes.
    (root / "classes.json").unlink()
    assert open_eval_dataset(root, split="train").classnames[:10] == NUMBER_WORDS[: max(LABELS[:24]) + 1][:10]
    # First-N subsets for shards; evenly spaced subsets (every class) for folders.
    assert [s.key for s in test.subset(7)] == [s.key for s in samples[:7]]
    tree = open_eval_dataset(_tree(tmp_path / "tree"))
    assert len({s.label for s in tree.subset(10)}) == 10


def test_cls_members_classes_txt_and_damaged_shards(tmp_path):
    folder = tmp_path / "shards"
    with ShardWriter(folder, max_samples=10) as writer:
        for index in range(20):
            image = png_bytes(IMAGES[index]) if index != 3 else b"\x89PNG garbage"
            writer.write(f"{index:06d}", image, "png", "a digit", {"cls": str(LABELS[index]).encode()})
    (folder / "classes.txt").write_text("\n".join(NUMBER_WORDS) + "\n")
    shard = folder / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # cut the second shard part-way
    dataset = open_eval_dataset(folder)
    assert dataset.classnames == NUMBER_WORDS
    samples = list(dataset)
    assert dataset.skipped == {"image_not_image": 1, "truncated_shard": 1}
    assert 9 + 3 <= len(samples) < 19  # shard 1 less the bad image, and the samples before the cut
    assert all(s.label == LABELS[int(s.key.split("/")[1])] for s in samples)
    keys, skipped, _ = _counts(dataset, workers=2)
    assert keys == [s.key for s in samples] and skipped == dataset.skipped


@pytest.mark.slow
def test_worker_order_cache_and_fingerprint(tmp_path, caplog, monkeypatch):
    import clipforge.eval.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "_RECORDS_PER_UNIT", 4)  # 10 units, so 2 workers interleave
    root = _tree(tmp_path / "digits")
    model = clipforge.create_model("tiny").eval()
    dataset = open_eval_dataset(root)
    plain = encode_images(model, dataset, batch_size=6, num_workers=0, progress=False)
    cache = FeatureCache(tmp_path / "cache")
    batches = list(dataset.batches(_transform(), 6, 2))
    arrival = [position for batch in batches for position in batch.order.tolist()]
    assert arrival != sorted(arrival) and sorted(arrival) == list(
        range(N)
    )  # workers interleave; order restores
    parallel = encode_images(model, dataset, batch_size=6, num_workers=2, cache=cache, progress=False)
    assert parallel.keys == plain.keys and not parallel.from_cache
    np.testing.assert_allclose(parallel.features, plain.features, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(plain.features, axis=1), 1.0, atol=1e-5)
    assert list(plain.labels) == [s.label for s in dataset]
    with caplog.at_level("INFO", logger="clipforge.eval"):
        hit = encode_images(model, dataset, batch_size=6, cache=cache, progress=False)
    assert hit.from_cache and hit.keys == plain.keys and "feature cache hit" in caplog.text
    np.testing.assert_array_equal(hit.features, parallel.features)
    # A changed file, different weights or another precision miss the cache.
    before = dataset.fingerprint()
    victim = root / dataset.classnames[0] / sorted(os.listdir(root / dataset.classnames[0]))[0]
    os.utime(victim, ns=(0, 0))
    assert open_eval_dataset(root).fingerprint() != before
    assert not encode_images(
        model, open_eval_dataset(root), cache=cache, batch_size=N, progress=False
    ).from_cache
    assert not encode_images(
        model, dataset, cache=cache, precision="bf16", batch_size=N, progress=False
    ).from_cache
    with torch.no_grad():
        model.visual.proj.weight.add_(1.0) if hasattr(model.visual, "proj") else next(
            model.parameters()
        ).add_(1.0)
    assert not encode_images(model, dataset, cache=cache, batch_size=N, progress=False).from_cache
    # A damaged entry is a miss, then rewritten.
    for entry in (tmp_path / "cache").rglob("*.npz"):
        entry.write_bytes(b"garbage")
    assert not encode_images(model, dataset, cache=cache, batch_size=N, progress=False).from_cache
    assert encode_images(model, dataset, cache=cache, batch_size=N, progress=False).from_cache
