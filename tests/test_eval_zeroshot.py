"""Zero-shot classification: toy models whose right answers are computed by hand (accuracy, confusion, the prompt
ensemble's normalise-average-renormalise), the paper's templates and class-name overrides, parity with an
open_clip model holding the same weights, and the training hook."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipforge.eval.templates import (
    TemplateError,
    format_template,
    get_templates,
    list_template_sets,
    resolve_classnames,
)
from clipforge.eval.zeroshot import build_classifier, classify_features, zero_shot_classify
from tests.datasets import NUMBER_WORDS, digit_images


class ToyTokenizer:
    """Each distinct prompt gets an id; the toy model looks its embedding up by that id."""

    def __init__(self, embeddings: dict[str, list[float]]) -> None:
        self.prompts = list(embeddings)
        self.table = torch.tensor([embeddings[p] for p in self.prompts], dtype=torch.float32)
        self.seen: list[str] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.seen.extend(texts)
        return torch.tensor([[self.prompts.index(t)] for t in texts])


class ToyCLIP(nn.Module):
    """encode_image: the 'images' are already feature vectors; encode_text: a table lookup (unnormalised)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone(), requires_grad=False)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens[:, 0]]


def _toy(embeddings: dict[str, list[float]]) -> tuple[ToyCLIP, ToyTokenizer]:
    tokenizer = ToyTokenizer(embeddings)
    return ToyCLIP(tokenizer.table), tokenizer


def test_accuracy_confusion_and_recall_match_a_hand_count():
    # Three classes along the axes; each image is a labelled point whose nearest class is known by construction.
    embeddings = {"a {}": [1, 0, 0], "b {}": [0, 1, 0], "c {}": [0, 0, 1]}
    model, tokenizer = _toy({f"{k[0]} x": [5 * v for v in vec] for k, vec in embeddings.items()})
    classifier = build_classifier(model, tokenizer, ["a", "b", "c"], ["{} x"])
    assert torch.allclose(classifier, torch.eye(3))  # each column normalised (the embeddings had norm 5)
    images = torch.tensor(
        [[0.9, 0.1, 0], [0.8, 0.3, 0], [0.2, 0.7, 0], [0.6, 0.5, 0.0], [0, 0.1, 0.9], [0.5, 0, 0.4]]
    )
    predicted = [0, 0, 1, 0, 2, 0]
    labels = torch.tensor([0, 1, 1, 1, 2, 2])
    result = zero_shot_classify(model, classifier, [(images[:4], labels[:4]), (images[4:], labels[4:])])
    expected = np.zeros((3, 3), dtype=np.int64)
    for truth, guess in zip(labels.tolist(), predicted):
        expected[truth, guess] += 1
    np.testing.assert_array_equal(result.confusion, expected)
    assert result.top1 == pytest.approx(3 / 6)
    assert result.per_class_recall == pytest.approx((1.0, 1 / 3, 1 / 2))
    assert result.mean_per_class_recall == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert result.top_k == 3 and result.top5 == 1.0  # fewer than 5 classes: top-5 is top-3, and says so
    assert any("top-3" in note for note in result.notes)
    assert result.num_samples == 6
    # The same numbers from precomputed features.
    again = classify_features(images.numpy(), labels.numpy(), classifier)
    np.testing.assert_array_equal(again.confusion, result.confusion)


def test_top5_and_unlabelled_samples():
    classes = [f"c{i}" for i in range(7)]
    model, tokenizer = _toy({f"{c}.": np.eye(7)[i].tolist() for i, c in enumerate(classes)})
    classifier = build_classifier(model, tokenizer, classes, ["{}."])
    # Image scores fall from class 0 to 6: the true class's rank is label + 1.
    image = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1]])
    images = image.repeat(8, 1)
    labels = torch.tensor([0, 1, 4, 5, 6, -1, -1, 2])
    result = zero_shot_classify(model, classifier, [(images, labels)])
    assert result.num_samples == 6 and result.skipped == {"missing_label": 2}
    assert result.top1 == pytest.approx(1 / 6)
    assert result.top5 == pytest.approx(4 / 6)  # labels 0, 1, 4 and 2 are in the top 5; 5 and 6 are not
    assert result.per_class_recall[3] != result.per_class_recall[3]  # NaN: no samples of class 3
    with pytest.raises(ValueError, match="out of range"):
        zero_shot_classify(model, classifier, [(image, torch.tensor([9]))])


def test_prompt_ensemble_is_normalise_average_renormalise():
    # Unequal norms make the order of operations matter. By hand, for the image x = (0.8, 0.6):
    #   class A prompts (4, 0) and (0, 0.5) -> unit (1, 0), (0, 1) -> mean (0.5, 0.5) -> (0.7071, 0.7071); A.x = 0.9899
    #   class B prompts (0.6, 0.8) and (1.8, 2.4) -> both unit (0.6, 0.8) -> B = (0.6, 0.8); B.x = 0.96
    #   first template alone: A = (1, 0), A.x = 0.8 < 0.96 -> B. The ensemble flips the prediction to A.
    #   averaging raw embeddings instead gives A = (2, 0.25)/|.| = (0.9923, 0.1240), A.x = 0.868 -> B.
    embeddings = {"t1 A": [4, 0], "t2 A": [0, 0.5], "t1 B": [0.6, 0.8], "t2 B": [1.8, 2.4]}
    model, tokenizer = _toy(embeddings)
    ensemble = build_classifier(model, tokenizer, ["A", "B"], ["t1 {}", "t2 {c}"], batch_size=3)
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[s, 0.6], [s, 0.8]])
    assert torch.allclose(ensemble, expected, atol=1e-6)
    assert tokenizer.seen == ["t1 A", "t2 A", "t1 B", "t2 B"]
    single = build_classifier(model, tokenizer, ["A", "B"], ["t1 {}"])
    assert torch.allclose(single, torch.tensor([[1.0, 0.6], [0.0, 0.8]]), atol=1e-6)
    image, label = torch.tensor([[0.8, 0.6]]), torch.tensor([0])
    assert zero_shot_classify(model, ensemble, [(image, label)]).top1 == 1.0
    assert zero_shot_classify(model, single, [(image, label)]).top1 == 0.0
    raw_average = F.normalize(torch.tensor([[2.0, 0.25], [1.2, 1.6]]), dim=-1).T
    assert (
        zero_shot_classify(model, raw_average, [(image, label)]).top1 == 0.0
    )  # why normalising first matters


def test_synonyms_are_averaged_with_the_templates():
    model, tokenizer = _toy({"happy.": [1, 0], "smiling.": [0, 2], "sad.": [-1, 0]})
    classifier = build_classifier(model, tokenizer, [("happy", "smiling"), "sad"], ["{}."])
    s = 1 / math.sqrt(2)
    assert torch.allclose(classifier, torch.tensor([[s, -1.0], [s, 0.0]]), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Templates and class names


def _open_clip_metadata():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from open_clip import zero_shot_metadata
    return zero_shot_metadata


def test_imagenet_templates_are_the_papers():
    metadata = _open_clip_metadata()
    imagenet = get_templates("imagenet")
    assert len(imagenet.templates) == 80
    assert list(imagenet.templates) == [t("{}") for t in metadata.OPENAI_IMAGENET_TEMPLATES]
    assert list(get_templates("imagenet-7").templates) == [
        t("{}") for t in metadata.SIMPLE_IMAGENET_TEMPLATES
    ]
    assert list(imagenet.classnames) == list(metadata.IMAGENET_CLASSNAMES)
    assert imagenet.class_ids[0] == "n01440764" and len(set(imagenet.class_ids)) == 1000


def test_template_sets_load_and_name_lookup_is_forgiving():
    names = list_template_sets()
    for expected in (
        "imagenet",
        "cifar10",
        "cifar100",
        "mnist",
        "food101",
        "oxford-pets",
        "flowers102",
        "stl10",
    ):
        assert expected in names
    for name in names:
        template_set = get_templates(name)
        assert all("{}" in t or "{c}" in t for t in template_set.templates)
    assert get_templates("Oxford_Pets").name == "oxford-pets"
    assert len(get_templates("cifar10").templates) == 18 and len(get_templates("cifar100").classnames) == 100
    assert get_templates("mnist").templates == ('a photo of the number: "{}".',)
    assert (
        len(get_templates("flowers102").classnames) == 102 and len(get_templates("food101").classnames) == 101
    )
    assert get_templates("generic").templates[0] == "a photo of a {}."
    assert format_template('a photo of the number: "{}".', "7") == 'a photo of the number: "7".'


def test_user_template_files(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("# my prompts\na sketch of a {}.\n\nart of the {c}.\n")
    assert get_templates(text).templates == ("a sketch of a {}.", "art of the {c}.")
    as_json = tmp_path / "mine.json"
    as_json.write_text(json.dumps({"templates": ["a {}"], "classnames": ["cat", ["dog", "puppy"]]}))
    loaded = get_templates(as_json)
    assert loaded.classnames == ("cat", ("dog", "puppy"))
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo.\n")
    with pytest.raises(TemplateError, match=r"bad.txt: template 1 \('a photo.'\) has no"):
        get_templates(bad)
    with pytest.raises(TemplateError, match="neither a built-in template set nor a file"):
        get_templates("no-such-set")


def test_overrides_resolve_polysemy_and_are_recorded():
    raw = [
        "n02012849",
        "n03126707",
        "n02963159",
        "n02113186",
        "n03710637",
        "n03710721",
        "n04355933",
        "n01440764",
    ]
    resolved = resolve_classnames("imagenet", raw)
    assert resolved.names == (
        "crane bird", "construction crane", "cardigan", "Cardigan Welsh Corgi", "tights", "one-piece bathing suit",
        "sunglasses", "tench",
    )  # fmt: skip
    reasons = {c.raw: c.reason for c in resolved.changes}
    assert reasons["n02012849"].startswith("override by id: WordNet 'crane' (the wading bird)")
    assert reasons["n01440764"] == "class id looked up in the imagenet class table"
    assert not resolved.duplicates
    # Every ImageNet override agrees with the paper's name for that id, so applying them reproduces the paper.
    imagenet = get_templates("imagenet")
    table = dict(zip(imagenet.class_ids, imagenet.classnames))
    resolved_all = resolve_classnames("imagenet", list(imagenet.class_ids))
    assert resolved_all.names == imagenet.classnames
    assert set(resolved_all.duplicates) == {"sunglasses", "missile"}  # duplicated in the paper too; reported
    from clipforge.eval.templates import classname_overrides

    for wnid, entry in classname_overrides("imagenet")["by_id"].items():
        assert table[wnid] == entry["name"], wnid
    # By raw name, and plain folder names.
    caltech = resolve_classnames("caltech101", ["Faces", "Faces_easy", "car_side", "water_lilly", "ant"])
    assert caltech.names == ("off-center face", "centered face", "side of a car", "water lilly", "ant")
    assert [c.index for c in caltech.changes] == [0, 1, 2, 3]
    assert caltech.changes[3].reason == "underscores read as spaces"
    untouched = resolve_classnames(None, ["golden_retriever", "tabby cat"])
    assert untouched.names == ("golden retriever", "tabby cat") and len(untouched.changes) == 1


# ----------------------------------------------------------------------------------------------------------------
# Any CLIP-like model: open_clip with the same weights gives the same results


def _open_clip_pair():
    import clipforge
    from clipforge.model.convert import from_openai

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from open_clip.model import CLIP as OpenClipCLIP
        from open_clip.tokenizer import SimpleTokenizer

    ours = clipforge.create_model("tiny").eval()
    v, t = ours.config.vision, ours.config.text
    torch.manual_seed(1)
    reference = OpenClipCLIP(
        ours.config.embed_dim,
        {"image_size": v.image_size, "layers": v.layers, "width": v.width, "patch_size": v.patch_size,
         "head_width": v.head_width},
        {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
         "layers": t.layers},
        quick_gelu=ours.config.activation == "quick_gelu",
    ).eval()  # fmt: skip
    converted, dropped = from_openai(reference.state_dict(), ours.config)
    assert dropped == []
    ours.load_state_dict(converted, strict=True)
    return ours, clipforge.get_tokenizer(ours), reference, SimpleTokenizer(context_length=t.context_length)


@pytest.mark.slow
def test_open_clip_model_gives_identical_zero_shot_and_retrieval(tmp_path):
    import clipforge
    from clipforge.eval.datasets import open_eval_dataset
    from clipforge.eval.features import encode_images, encode_texts
    from clipforge.eval.retrieval import retrieval_metrics

    ours, our_tokenizer, reference, reference_tokenizer = _open_clip_pair()
    images, labels = digit_images(60)
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = tmp_path / "digits" / NUMBER_WORDS[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:03d}.png")
    dataset = open_eval_dataset(tmp_path / "digits")
    transform = clipforge.get_transforms(
        ours
    )  # open_clip's eval transform is the same (tests/test_transforms.py)
    templates = get_templates("cifar10").templates[:4]
    results, features = [], []
    for model, tokenizer in ((ours, our_tokenizer), (reference, reference_tokenizer)):
        encoded = encode_images(model, dataset, transform=transform, batch_size=16, progress=False)
        classifier = build_classifier(model, tokenizer, dataset.classnames, templates)
        results.append(classify_features(encoded.features, encoded.labels, classifier))
        logits = 100 * torch.from_numpy(encoded.features) @ classifier
        features.append((encoded, logits))
        captions = [f"a handwritten {NUMBER_WORDS[label]}." for label in encoded.labels]
        text = encode_texts(model, tokenizer, captions)
        features[-1] += (retrieval_metrics(encoded.features, text, np.arange(len(captions))),)
    (ours_encoded, ours_logits, ours_retrieval), (ref_encoded, ref_logits, ref_retrieval) = features
    assert ours_encoded.keys == ref_encoded.keys
    assert np.abs(ours_encoded.features - ref_encoded.features).max() < 1e-5
    # Random weights predict few distinct classes, so compare every sample's whole ranking of the 10 classes
    # (adjacent logits differ by >= 7e-4 here, the two models' logits by <= 1e-5): the rankings must be equal.
    assert (ours_logits - ref_logits).abs().max() < 1e-4
    ours_ranking, ref_ranking = ours_logits.argsort(dim=1), ref_logits.argsort(dim=1)
    assert torch.equal(ours_ranking, ref_ranking)
    assert len({tuple(r) for r in ours_ranking.tolist()}) > 1
    np.testing.assert_array_equal(results[0].confusion, results[1].confusion)
    assert results[0].top1 == results[1].top1 and results[0].top5 == results[1].top5
    assert ours_retrieval == ref_retrieval


# ----------------------------------------------------------------------------------------------------------------
# The training hook


def _digit_tree(root: Path, n: int = 40) -> Path:
    images, labels = digit_images(n)
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / NUMBER_WORDS[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:03d}.png")
    return root


@pytest.mark.slow
def test_zero_shot_hook_called_directly_matches_the_library(tmp_path):
    import clipforge
    from clipforge.eval.datasets import open_eval_dataset
    from clipforge.eval.hook import zero_shot_hook
    from clipforge.train import HookContext

    tree = _digit_tree(tmp_path / "digits")
    model = clipforge.create_model("tiny").eval()
    hook = zero_shot_hook(tree, templates="generic", batch_size=16)
    record = hook(HookContext(model, step=2, samples_seen=32, run_dir=tmp_path))
    assert set(record) == {"zeroshot_top1", "zeroshot_top5", "zeroshot_samples", "zeroshot_seconds"}
    assert record["zeroshot_samples"] == 40.0
    dataset = open_eval_dataset(tree)
    classifier = build_classifier(model, clipforge.get_tokenizer(model), dataset.classnames,
                                  get_templates("generic").templates)  # fmt: skip
    expected = zero_shot_classify(model, classifier, dataset.batches(clipforge.get_transforms(model), 16))
    assert record["zeroshot_top1"] == expected.top1 and record["zeroshot_top5"] == expected.top5
    # Each call builds the classifier from the current weights: change the text tower, and the next call
    # reports what the new classifier gives.
    with torch.no_grad():
        for p in model.text.parameters():
            p.add_(torch.randn_like(p))
    changed = build_classifier(model, clipforge.get_tokenizer(model), dataset.classnames,
                               get_templates("generic").templates)  # fmt: skip
    assert not torch.allclose(changed, classifier, atol=1e-3)
    record = hook(HookContext(model, step=4, samples_seen=64, run_dir=tmp_path))
    expected = zero_shot_classify(model, changed, dataset.batches(clipforge.get_transforms(model), 16))
    assert record["zeroshot_top1"] == expected.top1 and record["zeroshot_top5"] == expected.top5
    subset = zero_shot_hook(tree, max_samples=10)(HookContext(model, 4, 64, tmp_path))
    assert subset["zeroshot_samples"] == 10.0


@pytest.mark.slow
def test_zero_shot_hook_inside_a_training_run(tmp_path):
    from clipforge.eval.hook import zero_shot_hook
    from clipforge.train import resolve_train_config, train
    from clipforge.train.report import read_metrics
    from tests.datasets import digits_shards

    shards = digits_shards(tmp_path / "shards", n=64, per_shard=32)
    tree = _digit_tree(tmp_path / "digits", n=20)
    config = resolve_train_config(None, {
        "model": "tiny", "data.train": [str(shards)], "data.batch_size": 16, "data.num_workers": 0, "steps": 4,
        "run.output_dir": str(tmp_path / "runs"), "run.name": "hooked", "run.eval_every": 2, "run.log_every": 2,
        "run.progress": False,
    })  # fmt: skip
    summary = train(config, hooks=[zero_shot_hook(tree, batch_size=8)])
    evals = read_metrics(Path(summary.run_dir), kind="eval")
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        assert 0.0 <= record["zeroshot_top1"] <= record["zeroshot_top5"] <= 1.0
        assert record["zeroshot_samples"] == 20.0
