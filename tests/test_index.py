"""The persistent image index: built over real images (handwritten digit scans) it searches like brute force over
``encode_image_files``; a build killed with SIGKILL continues with no duplicate and no gap; an update follows
added, changed and removed files; another model is refused; the approximate index reaches recall@10 >= 0.95."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from clipforge.cli import main
from clipforge.features import encode_image_files, encode_texts
from clipforge.index import (
    ApproximateUnavailableError,
    EncodeOptions,
    Index,
    IndexFormatError,
    ModelMismatchError,
    SearchOptions,
    build_index,
    recall_at_10,
    update_index,
)
from clipforge.index.approximate import build_approximate, exact_top_k
from clipforge.inference import RandomWeightsWarning, find_images, load_model
from clipforge.search import rank
from clipforge.tokenizer import get_tokenizer
from clipforge.transforms import get_transforms
from tests.conftest import locked_import
from tests.datasets import digit_images, digits_table

REPO = Path(__file__).resolve().parents[1]
QUIET = EncodeOptions(chunk_size=16, progress=False)


def _model(name: str = "tiny"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return load_model(name)


@pytest.fixture(scope="module")
def tiny():
    model = _model()
    return model, get_transforms(model), get_tokenizer(model)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    digits_table(folder, n=80)
    return folder


@pytest.fixture(scope="module")
def built(digits, tiny, tmp_path_factory) -> Path:
    model, transform, _ = tiny
    out = tmp_path_factory.mktemp("built") / "index"
    build_index([digits], model, transform, out, model_spec="tiny", encode=QUIET)
    return out


def test_search_equals_brute_force(built, digits, tiny):
    model, transform, tokenizer = tiny
    index = Index.open(built)
    paths = find_images([digits])
    reference = encode_image_files(model, transform, paths, progress=False)
    assert index.paths == [str(p.resolve()) for p in paths]  # every file once, in scan order
    np.testing.assert_allclose(index.vectors, reference.embeddings, atol=1e-5)
    for text in ("a handwritten seven", "the number zero", "a scan of a four"):
        hits = index.search_text(model, tokenizer, text, k=10)
        query = encode_texts(model, tokenizer, [text])[0]
        expected = rank(query, reference.embeddings, [str(p.resolve()) for p in paths], 10)
        assert [h.path for h in hits] == [e.key for e in expected]
        np.testing.assert_allclose([h.score for h in hits], [e.score for e in expected], atol=1e-5)
        assert [index.paths[h.id] for h in hits] == [h.path for h in hits]
    by_image = index.search_image(model, transform, paths[7], k=3)
    assert by_image[0].id == 7 and by_image[0].score == pytest.approx(1.0, abs=1e-5)
    assert index.search_row(7, k=1)[0].id == 7
    assert len(index.search_vectors(reference.embeddings[0], k=500)) == 80  # k beyond N: all rows


def test_another_model_is_refused(built, digits):
    small = _model("small")
    index = Index.open(built)
    with pytest.raises(ModelMismatchError, match=r"built with model 'tiny'.*the model given is 'small'"):
        index.search_text(small, get_tokenizer(small), "a seven")
    with pytest.raises(ModelMismatchError, match="different weights"):
        update_index(built, small, get_transforms(small), encode=QUIET)


def test_a_different_preprocessing_is_refused_for_images(built, tiny, digits):
    model, transform, tokenizer = tiny
    index = Index.open(built)
    other = get_transforms(model, train=True)  # random crops: other preprocessing
    assert repr(other) != repr(transform)
    index.search_text(model, tokenizer, "a seven")  # text queries need the same weights only
    with pytest.raises(ModelMismatchError, match="different preprocessing"):
        index.search_image(model, other, find_images([digits])[0])


def _cli(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{REPO}", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "clipforge", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


@pytest.mark.slow
def test_resume_after_sigkill_has_no_duplicate_and_no_gap(tmp_path, tiny):
    model, transform, _ = tiny
    images = tmp_path / "images"
    digits_table(images, n=600)
    out = tmp_path / "index"
    victim = _cli(["index", "build", str(images), "--model", "tiny", "--out", str(out),
                   "--chunk-size", "8", "--batch-size", "8", "--no-progress"])  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if len(list((out / "pending").glob("chunk-*.npz"))) >= 4:
            break
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    output, _ = victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, output
    assert not (out / "index.json").exists(), "the build finished before it was killed"
    committed = len(list((out / "pending").glob("chunk-*.npz")))
    assert 4 <= committed < 75

    report = build_index([images], model, transform, out, model_spec="tiny", encode=QUIET)
    assert report.reused >= 8 * committed and report.encoded == 600 - report.reused  # committed work kept
    index = Index.open(out)
    paths = find_images([images])
    assert index.paths == [str(p.resolve()) for p in paths]  # each file exactly once, none missing
    reference = encode_image_files(model, transform, paths, progress=False)
    np.testing.assert_allclose(index.vectors, reference.embeddings, atol=1e-5)
    assert not (out / "pending").exists()


def test_resume_reuses_committed_chunks_in_process(tmp_path, tiny, digits, monkeypatch):
    """An interruption between chunks (an exception in the third) leaves two committed chunks; the rerun
    encodes only the rest."""
    import clipforge.index.build as build_module

    model, transform, _ = tiny
    calls = {"n": 0}
    real = build_module.encode_image_files

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(build_module, "encode_image_files", failing)
    with pytest.raises(KeyboardInterrupt):
        build_index([digits], model, transform, tmp_path / "index", model_spec="tiny", encode=QUIET)
    monkeypatch.setattr(build_module, "encode_image_files", real)
    with pytest.raises(IndexFormatError, match="a build was interrupted"):
        Index.open(tmp_path / "index")
    report = build_index([digits], model, transform, tmp_path / "index", model_spec="tiny", encode=QUIET)
    assert (report.reused, report.encoded, report.count) == (32, 48, 80)


def test_update_follows_added_changed_and_removed_files(tmp_path, tiny):
    model, transform, _ = tiny
    images = tmp_path / "images"
    digits_table(images, n=40)
    out = tmp_path / "index"
    build_index([images], model, transform, out, model_spec="tiny", encode=QUIET)
    extra, _ = digit_images(50)
    for number in range(40, 45):  # added
        extra[number].save(images / f"new_{number}.png")
    for name in ("digit_00003.png", "digit_00010.png"):  # changed: another digit under the same name
        extra[49].rotate(90).save(images / name)
    for name in ("digit_00000.png", "digit_00020.png", "digit_00039.png"):  # removed
        (images / name).unlink()
    report = update_index(out, model, transform, encode=QUIET)
    assert (report.encoded, report.removed, report.reused, report.count) == (7, 3, 35, 42)
    index = Index.open(out)
    paths = find_images([images])
    assert index.paths == [str(p.resolve()) for p in paths]
    reference = encode_image_files(model, transform, paths, progress=False)
    np.testing.assert_allclose(index.vectors, reference.embeddings, atol=1e-5)
    assert index.manifest.generation == 1
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "items-000001.jsonl", "vectors-000001.npy"]
    again = update_index(out, model, transform, encode=QUIET)
    assert (again.encoded, again.reused) == (0, 42) and Index.open(out).manifest.generation == 1


def _clustered(n: int, dim: int, seed: int, centers: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(99).standard_normal((centers, dim)).astype(np.float32)
    vectors = means[rng.integers(0, centers, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_approximate_recall_against_exact():
    locked_import("faiss", "faiss-cpu")
    vectors = _clustered(4000, 64, seed=0)
    approximate, settings = build_approximate(vectors)
    assert settings.kind == "faiss-ivf-flat" and settings.recall_at_10 >= 0.95
    assert settings.params["nlist"] == min(int(4 * np.sqrt(4000)), 4000 // 39)  # >= 39 vectors a list
    queries = _clustered(300, 64, seed=1)  # new queries, not the sample it was tuned on
    _, truth = exact_top_k(vectors, queries, 10)
    _, found = approximate.search(queries, 10)
    assert recall_at_10(truth, found) >= 0.95
    assert recall_at_10(truth, truth) == 1.0 and recall_at_10(truth, truth[:, ::-1] * 0 - 1) == 0.0


def test_exact_top_k_blocks_and_ties(monkeypatch):
    import clipforge.index.approximate as approximate

    vectors = _clustered(1000, 16, seed=2)
    vectors[500] = vectors[100]  # a tie: the lower row first
    queries = np.stack([vectors[100], vectors[3]])
    scores, rows = exact_top_k(vectors, queries, 5)
    full = queries @ vectors.T
    assert rows[0, :2].tolist() == [100, 500]
    np.testing.assert_allclose(scores, -np.sort(-full, axis=1)[:, :5], atol=1e-6)
    monkeypatch.setattr(approximate, "_BLOCK_ROWS", 64)  # the same answer scored 64 rows at a time
    blocked_scores, blocked_rows = exact_top_k(vectors, queries, 5)
    assert np.array_equal(blocked_rows, rows) and np.allclose(blocked_scores, scores)


def test_approximate_index_end_to_end(tmp_path, tiny, digits):
    locked_import("faiss", "faiss-cpu")
    model, transform, tokenizer = tiny
    out = tmp_path / "index"
    report = build_index([digits], model, transform, out, model_spec="tiny", encode=QUIET,
                         search=SearchOptions(threshold=40))  # fmt: skip
    assert report.search.kind == "faiss-ivf-flat" and report.search.recall_at_10 >= 0.95
    stored = json.loads((out / "index.json").read_text())
    assert stored["search"]["recall_at_10"] == report.search.recall_at_10
    assert (out / "approximate-000000.faiss").is_file()
    index, exact = Index.open(out), Index.open(out, exact=True)
    assert index.approximate is not None and exact.approximate is None
    hits = index.search_text(model, tokenizer, "a handwritten two", k=5)
    assert len(hits) == 5 and all(0 <= h.id < 80 for h in hits)


def test_without_faiss_exact_works_and_approximate_says_how_to_install(tmp_path, tiny, digits, monkeypatch):
    model, transform, tokenizer = tiny
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    with pytest.raises(ApproximateUnavailableError, match=r"pip install 'clipforge\[index\]'.*--exact"):
        build_index([digits], model, transform, tmp_path / "a", model_spec="tiny", encode=QUIET,
                    search=SearchOptions(threshold=10))  # fmt: skip
    assert not (tmp_path / "a" / "pending").exists()  # refused before encoding anything
    build_index([digits], model, transform, tmp_path / "b", model_spec="tiny", encode=QUIET,
                search=SearchOptions(exact=True, threshold=10))  # fmt: skip
    assert len(Index.open(tmp_path / "b").search_text(model, tokenizer, "a one", k=3)) == 3


def test_bad_inputs_give_clear_errors(tmp_path, tiny, built):
    model, transform, _ = tiny
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        build_index([tmp_path / "empty"], model, transform, tmp_path / "i", model_spec="tiny", encode=QUIET)
    (tmp_path / "file").write_text("x")
    with pytest.raises(IndexFormatError, match="is a file, not an index folder"):
        Index.open(tmp_path / "file")
    with pytest.raises(IndexFormatError, match="no such index folder"):
        Index.open(tmp_path / "missing")
    damaged = tmp_path / "damaged"
    shutil.copytree(built, damaged)
    (damaged / "index.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match=r"index.json: not valid JSON"):
        Index.open(damaged)
    manifest = json.loads((built / "index.json").read_text())
    del manifest["model"]["fingerprint"]
    (damaged / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="'model' lacks a valid field"):
        Index.open(damaged)
    (damaged / "index.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(IndexFormatError, match="not a clipforge image index"):
        Index.open(damaged)
    with pytest.raises(ValueError, match="already holds an index; run clipforge index update"):
        build_index([tmp_path], model, transform, built, model_spec="tiny", encode=QUIET)
    with pytest.raises(ValueError, match="k must be at least 1"):
        Index.open(built).search_row(0, k=0)
    with pytest.raises(ValueError, match=r"shape \[Q, 128\]"):
        Index.open(built).search_batch(np.zeros((2, 7)), k=1)


def test_cli_build_search_info(tmp_path, digits, capsys):
    out = tmp_path / "index"
    assert main(["index", "build", str(digits), "--model", "tiny", "--out", str(out), "--no-progress"]) == 0
    assert "80 images (80 encoded, 0 reused" in capsys.readouterr().out
    assert main(["index", "search", str(out), "--text", "a seven", "-k", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["hits"]) == 4 and report["hits"][0]["path"].endswith(".png")
    assert report["hits"][0]["score"] >= report["hits"][-1]["score"]
    assert main(["index", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "images: 80" in info and "search: exact (80 vectors)" in info
    assert main(["index", "update", str(out), "--no-progress"]) == 0
    assert "(0 encoded, 80 reused, 0 removed" in capsys.readouterr().out
    assert main(["index", "search", str(out), "--text", "a seven", "--model", "small"]) == 2
    assert "built with model 'tiny'" in capsys.readouterr().err
    assert main(["index", "info", str(tmp_path / "nothing")]) == 2


def test_a_file_named_twice_is_one_row(tmp_path, tiny, digits):
    model, transform, _ = tiny
    (tmp_path / "link.png").symlink_to(digits / "digit_00004.png")
    sources = [digits, digits / "digit_00004.png", tmp_path / "link.png"]
    report = build_index(sources, model, transform, tmp_path / "index", model_spec="tiny", encode=QUIET)
    assert report.count == 80 and len(set(Index.open(tmp_path / "index").paths)) == 80
