"""The WordPiece tokenizer gives Hugging Face's ids for all-MiniLM-L6-v2: on the built-in captions, on multilingual,
accented, emoji, CJK, control-character and very long texts, and character by character over all of Unicode."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch

import clipforge
from clipforge.data.builtin import builtin_split_shards
from clipforge.data.raw import RawSample
from clipforge.data.shards import iter_shard
from clipforge.tokenizer import TokenizerOverflowError
from clipforge.wordpiece import UNICODE_OVERRIDES_PATH, WordPieceTokenizer, _Normalizer
from tests.test_towers import minilm_folder

HANDWRITTEN = [
    "A photo of a cat.",
    "Ein Hund läuft über die grüne Wiese – schön!",
    "L'été dernier, nous sommes allés à Besançon.",
    "El niño comió piña y jalapeños en la mañana.",
    "Tiếng Việt có rất nhiều dấu thanh: ả, ẫ, ặ, ờ, ữ.",
    "ΟΔΟΣ ΣΟΦΟΣ ΟΔΟΣ · η Ελλάδα",  # Greek capitals: sigma lower-cased without the final-sigma rule
    "İstanbul'da ılık bir gün; IĞDIR",  # dotted I decomposes, then is lower-cased
    "Москва — столица России. Ёжик в тумане.",
    "مرحبا بالعالم، هذا نص عربي مع تشكيل: مُحَمَّد",
    "שלום עולם! זהו טקסט בעברית.",
    "हिन्दी में लिखा गया वाक्य, मात्राओं के साथ।",
    "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    "東京タワーの夜景はとても綺麗です。",
    "北京欢迎你！我爱自然语言处理。",
    "한국어 문장입니다: 안녕하세요?",
    "emoji: 😀 🐱‍👤 👍🏽 🇫🇷 ❤️ 🏳️‍🌈 a😀b",
    "zero\u200bwidth and non\u00a0breaking and soft\u00adhyphen",
    "tabs\tnew\nlines\r\nand\x0bvertical\x0cfeeds\x1fand \x00 nul \ufffd replacement",
    "full-width ＡＢＣ１２３ and ligature ﬁ and math 𝐀𝐁𝐂 and ℌ",
    "combining: e\u0301 a\u0308 o\u0302\u0323 n\u0303",
    "literal specials: [CLS] x [SEP] y [PAD] z [MASK] [UNK] [cls] [ MASK ] a[MASK]b",
    "snake_case, kebab-case, C++, $100.00, 50%, email@example.com, http://x.y/z?q=1#f",
    "x" * 101 + " " + "y" * 100,  # over and at the 100-character word limit
    "",
    "   \t\n  ",
    "!!!...???",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "The quick brown fox jumps over the lazy dog. " * 40,  # longer than 256 tokens
    "naïve café résumé coöperate façade jalapeño Ångström",
]


def builtin_captions() -> list[str]:
    """Every caption in the built-in dataset's shards (their .txt and .json), plus the emoji, titles and
    descriptions the .json files hold."""
    texts: list[str] = []
    for split in ("train", "val", "test", "test_heldout"):
        for shard in builtin_split_shards(split):
            for sample in iter_shard(shard):
                if isinstance(sample, RawSample):
                    texts += sample.captions
                    texts += [
                        sample.extra[key]
                        for key in ("emoji", "title", "description")
                        if sample.extra.get(key)
                    ]
    return texts


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    captions = builtin_captions()
    assert len(captions) > 10_000
    return list(dict.fromkeys(captions)) + HANDWRITTEN


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(minilm_folder()))


@pytest.fixture(scope="module")
def tokenizer() -> WordPieceTokenizer:
    return clipforge.get_tokenizer("lit-small")


def reference_ids(reference, texts: list[str], length: int) -> torch.Tensor:
    return reference(texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt")[
        "input_ids"
    ]


@pytest.mark.slow
def test_ids_equal_hugging_face_on_real_and_varied_text(reference, corpus, tokenizer):
    ours = tokenizer(corpus)
    theirs = reference_ids(reference, corpus, 256)
    assert ours.shape == theirs.shape == (len(corpus), 256)
    bad = [i for i in range(len(corpus)) if not torch.equal(ours[i], theirs[i])]
    assert bad == [], [corpus[i] for i in bad[:5]]
    assert tokenizer.num_truncated >= 1  # the long text


@pytest.mark.parametrize("length", [8, 32, 77])
def test_truncated_ids_equal_hugging_face(reference, length):
    fresh = WordPieceTokenizer(minilm_folder(), context_length=length)
    assert torch.equal(fresh(HANDWRITTEN), reference_ids(reference, HANDWRITTEN, length))


@pytest.mark.slow
def test_every_code_point_normalizes_and_splits_as_hugging_face(reference):
    """BERT's normalizer and pre-tokenizer, character by character over all of Unicode (in blocks, each
    character between 'a' and a space so it meets letters, accents and word breaks)."""
    backend = reference.backend_tokenizer
    normalizer, pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    ours = _Normalizer(lowercase=True, strip_accents=True, split_cjk=True)
    points = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
    mismatched = []
    for start in range(0, len(points), 2048):
        block = points[start : start + 2048]
        text = "".join(f"a{chr(cp)} " for cp in block)
        theirs = [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]
        if ours.words(text) != theirs:
            mismatched += [
                f"{cp:x}"
                for cp in block
                if ours.words(f"a{chr(cp)} ")
                != [w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(f"a{chr(cp)} "))]
            ]
    assert mismatched == []


def test_override_table_is_for_this_python():
    import unicodedata

    table = json.loads(UNICODE_OVERRIDES_PATH.read_text())
    assert table["unidata_version"] == unicodedata.unidata_version, (
        "regenerate clipforge/assets/wordpiece_unicode.json with python -m tests.wordpiece_reference"
    )


def test_layout_truncation_counted_and_error_policy(tokenizer, caplog):
    fresh = WordPieceTokenizer(minilm_folder(), context_length=6)
    with caplog.at_level(logging.WARNING, logger="clipforge.tokenizer"):
        rows = fresh(["a cat", "one two three four five six"])
    assert rows.tolist() == [[101, 1037, 4937, 102, 0, 0], [101, 2028, 2048, 2093, 2176, 102]]
    assert fresh.num_truncated == 1 and fresh.num_tokenized == 2
    assert "truncated 1 of 2 texts" in caplog.text
    strict = WordPieceTokenizer(minilm_folder(), context_length=6, on_overflow="error")
    with pytest.raises(TokenizerOverflowError, match="text 1 has 8 tokens"):
        strict(["a cat", "one two three four five six"])


def test_few_and_batch_paths_agree(corpus, tokenizer):
    texts = corpus[:3] + HANDWRITTEN[:3]
    together = tokenizer(texts)
    one_by_one = torch.cat([tokenizer([text]) for text in texts])
    assert torch.equal(together, one_by_one)


def test_encode_decode_pickle_and_types(tokenizer):
    ids = tokenizer.encode("Unaffable naïve cats!")
    assert tokenizer.decode(ids) == "unaffable naive cats !"
    assert tokenizer.decode(tokenizer(["a dog"])[0]) == "[CLS] a dog [SEP]"
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert torch.equal(copy(HANDWRITTEN), tokenizer(HANDWRITTEN))
    with pytest.raises(TypeError, match="text 1 is a int"):
        tokenizer(["ok", 3])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.decode([10**6])
