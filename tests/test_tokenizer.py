"""Tokenizer: id-for-id parity with open_clip's SimpleTokenizer (= OpenAI's), overflow policy, API, pickling."""

from __future__ import annotations

import hashlib
import html
import importlib.util
import logging
import pickle
import random
import threading
import warnings
from pathlib import Path

import ftfy
import numpy as np
import pytest
import torch

from clipforge.config import get_model_config, merge
from clipforge.tokenizer import Tokenizer, TokenizerOverflowError, clean_text, get_tokenizer

SOT, EOT = 49406, 49407
PLAIN = "\t\n" + "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "&")  # what the ftfy shortcut covers

# fmt: off
FRAGMENTS = {
    "english": [
        "a photo of a cat", "A Red and White Anemone Flower.", "two dogs playing in the SNOW", "The quick brown fox",
        "jumps over the lazy dog", "an astronaut riding a horse", "clip art of a smiling sun", "BLACK AND WHITE",
        "a diagram", "iPhone", "McDonald", "e-mail", "state-of-the-art", "x-ray", "U.S.A.", "Dr. Smith", "vs.",
    ],
    "contractions": [
        "it's", "don't", "we're", "I've", "I'm", "you'll", "he'd", "IT'S", "Don'T", "cat's", "dogs'", "'s", "'t",
        "'re'", "o'clock", "rock'n'roll", "it’s", "can‘t", "''", "'''s",
    ],
    "accents": [
        "café", "naïve", "résumé", "Ångström", "façade", "jalapeño", "Dvořák", "Łódź", "smörgåsbord", "crème brûlée",
        "cafe\u0301", "A\u030angstro\u0308m", "Zürich", "São Paulo", "Ñandú", "ĳssel", "ﬁsh ﬂower", "Øresund",
    ],
    "scripts": [
        "猫が座っている", "一只猫坐在桌子上", "고양이", "قطة على الطاولة", "חתול", "кошка сидит", "ΓΆΤΑ ΣΟΦΟΣ", "ΟΔΟΣ",
        "แมว", "बिल्ली", "ბეჭედი", "Ընկեր", "ᠮᠣᠩᠭᠣᠯ", "ካት", "ꦏꦸꦕꦶꦁ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ｆｕｌｌｗｉｄｔｈ", "ﾊﾝｶｸ",
    ],
    "emoji": [
        "🐱", "🐱‍👤", "👩‍👩‍👧‍👦", "🇺🇸", "🇯🇵🇫🇷", "👍🏽", "👋🏿", "❤️", "❤", "1️⃣", "🏳️‍🌈", "🧑🏻‍🚀", "☺︎", "😀😃😄", "🫠",
        "\U0001f9d1\u200d\U0001f4bb",
    ],
    "html": [
        "&amp;", "&#39;", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp;", "&amp;amp;lt;", "&amp;amp;amp;lt;", "&nbsp;",
        "&eacute;", "&EACUTE;", "&#x2019;", "&#0;", "&#1;", "&#128512;", "&notit;", "&amp", "AT&T", "R&D", "&",
        "<b>bold</b>", "&quot;quoted&quot;", "&hellip;", "&#X41;", "&#65", "&ampx", "&;", "a <br/> b &amp; c",
    ],
    "numbers": [
        "1234567890", "3.14159", "1,000,000", "2024", "007", "٣٤٥", "２０２４", "½", "²³", "Ⅻ", "①", "10%",
        "$5.99", "#1", "98.6°F", "1e-9", "0x1F", "12:30pm", "3/4",
    ],
    "punctuation": [
        "!!!", "...", "?!?!", "—", "–", "«»", "¿Qué?", "¡Hola!", "***", "--", "(a)", "[x]", "{y}", "@user", "#tag",
        "~~", "`code`", '"', "\\", "/", "|", "^_^", ":-)", "<3", "<|startoftext|>", "<start_of_text>",
        "<end_of_text>", "<START_OF_TEXT>", "</w>", "<ſtart_of_text>", "a</w>b", "…", "·", "•",
    ],
    "whitespace": ["\t", "\n", "\r\n", "\r", "\xa0", "\u200b", "\u3000", "\u2028", "\u2029", "  ", "\x0b", "\x0c",
                   "\x1c", "\x85", "\u180e", "\u2009", "\u202f", "\ufeff"],
    "mojibake": [
        "cafÃ©", "â€œhelloâ€\x9d", "âœ” No problems", "sÃ³", "voilÃ le travail", "Ã¢â‚¬Å“quotedÃ¢â‚¬\x9d", "Ã¼ber",
        "ã\x83\x84", "&macr;\\_(ã\x83\x84)_/&macr;", "Ã¡rbol", "naÃ¯ve", "BUNDESSTRA&SZLIG;E", "l’Ã©tÃ©",
    ],
    "controls": [
        "\x00", "\x01", "\x07", "\x1b[31mred\x1b[0m", "\x7f", "\x80", "\x9d", "\u202e", "\u206a", "\ufffd",
        "\ufff9", "\ud800", "\udfff", "\ud83d\ude00", "\U000e0041", "\ue000",
    ],
    "casing": ["İstanbul", "ß", "ẞ", "\u212a", "ſ", "\u0345", "ǅ", "ΣΑΣ ΑΣ", "ǈ", "Ꭰ", "ꭰ", "ﬀ", "ŉ", "ΐ", "İİİ"],
}
SEPARATORS = [" ", " ", " ", "", "  ", "\t", "\n", ", ", "-", ". ", "\xa0"]
# fmt: on


def random_text(rng: random.Random) -> str:
    """A random mix of fragments from all categories, random code points and random separators."""
    kind = rng.random()
    if kind < 0.02:
        return ""
    if kind < 0.04:
        return "".join(rng.choice(FRAGMENTS["whitespace"] + [" "]) for _ in range(rng.randint(1, 6)))
    if kind < 0.10:  # very long: well over 77 tokens
        return " ".join(rng.choice(rng.choice(list(FRAGMENTS.values()))) for _ in range(rng.randint(40, 120)))
    if kind < 0.15:  # random code points from all planes
        return "".join(
            chr(rng.choice([rng.randrange(0x20, 0x800), rng.randrange(0x110000)])) for _ in range(12)
        )
    parts = []
    for _ in range(rng.randint(1, 8)):
        category = rng.choice(list(FRAGMENTS)) if rng.random() < 0.5 else "english"
        fragment = rng.choice(FRAGMENTS[category])
        fragment = rng.choice([fragment, fragment, fragment.upper(), fragment.title(), fragment.swapcase()])
        parts.append(fragment + rng.choice(SEPARATORS))
    return "".join(parts)


def random_ascii_text(rng: random.Random) -> str:
    """Printable ASCII, tabs and newlines only (no '&'): the texts that take the shortcut around ftfy."""
    if rng.random() < 0.2:
        return "".join(rng.choice(PLAIN) for _ in range(rng.randint(0, 120)))
    words = [w for key in ("english", "contractions", "numbers", "punctuation") for w in FRAGMENTS[key]]
    words = [w for w in words if w.isascii() and "&" not in w]
    separators = [" ", " ", " ", "", "  ", "\t", "\n", " \n ", ", ", "-", "... "]
    parts = [rng.choice(words) + rng.choice(separators) for _ in range(rng.randint(0, 30))]
    return rng.choice(["", " ", "\t"]) + "".join(parts)


def make_corpus(n: int = 10_000, n_ascii: int = 4_000, seed: int = 0) -> list[str]:
    """Every fragment alone, ``n`` random mixtures of all categories, ``n_ascii`` plain-ASCII texts, shuffled."""
    rng = random.Random(seed)
    texts = [fragment for fragments in FRAGMENTS.values() for fragment in fragments]
    texts += [random_text(rng) for _ in range(n)] + [random_ascii_text(rng) for _ in range(n_ascii)]
    rng.shuffle(texts)
    return texts


@pytest.fixture(scope="module")
def reference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture
def tokenizer() -> Tokenizer:
    return Tokenizer()


# ----------------------------------------------------------------------------------------------------------------
# Parity with the reference


@pytest.mark.slow
@pytest.mark.parametrize("context_length", [77, 32])
def test_batch_parity_with_open_clip(reference, corpus, context_length):
    ours = Tokenizer()(corpus, context_length=context_length)
    theirs = reference(corpus, context_length=context_length)
    assert ours.dtype == torch.long and ours.shape == (len(corpus), context_length)
    mismatched = (ours != theirs).any(dim=1).nonzero().flatten().tolist()
    assert not mismatched, f"{len(mismatched)} texts differ, first: {corpus[mismatched[0]]!r}"


@pytest.mark.slow
def test_encode_parity_with_open_clip(reference, corpus, tokenizer):
    """Untruncated ids, one text at a time (the single-text path, not the batch path)."""
    for text in corpus:
        assert tokenizer.encode(text) == reference.encode(text), repr(text)


@pytest.mark.slow
def test_cleaning_matches_open_clip(corpus):
    from open_clip.tokenizer import _clean_lower

    assert [clean_text(text) for text in corpus] == [_clean_lower(text) for text in corpus]


def test_batch_order_and_single_calls_agree(corpus, tokenizer):
    texts = corpus[:300]
    batch = tokenizer(texts)
    singles = torch.cat([Tokenizer()(text) for text in texts])
    assert torch.equal(batch, singles)
    threes = torch.cat([tokenizer(texts[i : i + 3], context_length=32) for i in range(0, len(texts), 3)])
    assert torch.equal(threes, tokenizer(texts, context_length=32))
    order = list(range(len(texts)))
    random.Random(1).shuffle(order)
    assert torch.equal(tokenizer([texts[i] for i in order]), batch[order])


def test_merges_file_is_openai_s():
    from clipforge.bpe import BPE_PATH

    digest = hashlib.sha256(BPE_PATH.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert (BPE_PATH.parent / "LICENSE-openai-clip.txt").is_file()


def test_known_answers(tokenizer):
    expected = [SOT, 320, 1125, 539, 320, 2368, 269, EOT] + [0] * 69
    assert tokenizer("a photo of a cat.").tolist() == [expected]
    assert tokenizer("A  PHOTO of a\tcat .").tolist() == [expected]
    assert tokenizer("").tolist() == [[SOT, EOT] + [0] * 75]
    assert tokenizer(" \n\t\xa0").tolist() == [[SOT, EOT] + [0] * 75]
    assert tokenizer.encode("<start_of_text>") == [SOT]  # the reference maps the literal special token
    assert tokenizer([]).shape == (0, 77)
    assert tokenizer(("a", "b"), context_length=4).shape == (2, 4)
    assert tokenizer.vocab_size == 49408
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (SOT, EOT)


# ----------------------------------------------------------------------------------------------------------------
# The ftfy shortcut: plain printable ASCII without '&' skips ftfy and html.unescape


def test_plain_ascii_is_left_unchanged_by_ftfy_and_unescape():
    """The claim behind the shortcut, checked on every plain character, every pair, and random strings."""
    rng = random.Random(0)
    samples = list(PLAIN) + [a + b for a in PLAIN for b in PLAIN]
    samples += ["".join(rng.choice(PLAIN) for _ in range(rng.randint(1, 200))) for _ in range(2000)]
    samples += ["l'Hotel ;lt; #39; x;amp; <b>bold</b>", "\x1b[31m".replace("\x1b", ""), "a\n\nb\tc"]
    for text in samples:
        assert ftfy.fix_text(text) == text, repr(text)
        assert html.unescape(text) == text, repr(text)


def test_shortcut_covers_exactly_the_plain_characters():
    from clipforge.bpe import _NEEDS_FULL_CLEAN

    for code in range(0x3000):
        assert (_NEEDS_FULL_CLEAN.search(chr(code)) is None) == (chr(code) in PLAIN), hex(code)


# ----------------------------------------------------------------------------------------------------------------
# Overflow policy


FILLERS = pytest.mark.parametrize("fillers", [0, 20], ids=["few-texts-path", "batch-path"])


@FILLERS
def test_truncation_keeps_eot_counts_and_warns_once(reference, tokenizer, caplog, fillers):
    texts = ["a " * 75, "short", "a " * 76, "word " * 200] + ["fits"] * fillers  # 75 ids fit in 77; 76 don't
    with caplog.at_level(logging.WARNING, logger="clipforge.tokenizer"):
        out = tokenizer(texts)
    assert torch.equal(out, reference(texts))
    assert out[0, 76].item() == EOT and out[0, 75].item() == 320
    assert out[2, 76].item() == EOT and out[3, 76].item() == EOT and out[1, 3].item() == 0
    assert (tokenizer.num_truncated, tokenizer.num_tokenized) == (2, 4 + fillers)
    records = [r for r in caplog.records if r.name == "clipforge.tokenizer"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert f"2 of {4 + fillers} texts" in message and "context_length=77" in message and "202" in message

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clipforge.tokenizer"):
        tokenizer(["short", "texts"] * (1 + fillers))
        tokenizer(["a " * 40] + ["b"] * fillers, context_length=16)
    assert (tokenizer.num_truncated, tokenizer.num_tokenized) == (3, 4 + fillers + 3 * (1 + fillers))
    assert caplog.records == []  # counted, but the log warns again only when the total reaches 10, 100, ...
    with caplog.at_level(logging.WARNING, logger="clipforge.tokenizer"):
        tokenizer(["a " * 40] * 7 + ["b"] * fillers, context_length=16)
    assert tokenizer.num_truncated == 10
    assert len(caplog.records) == 1 and f"7 of {7 + fillers} texts" in caplog.records[0].getMessage()


@FILLERS
def test_error_policy_names_the_text_and_the_fix(fillers):
    strict = Tokenizer(on_overflow="error")
    assert strict(["a " * 75] + ["b"] * fillers).shape == (1 + fillers, 77)  # exactly fits
    with pytest.raises(TokenizerOverflowError) as info:
        strict(["fine", "also fine", "a " * 100, "a " * 200] + ["b"] * fillers)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "text 2 has 102 tokens" in message and "context_length=77" in message
    assert "Shorten the text" in message and "larger context_length" in message
    assert "on_overflow='truncate'" in message
    assert strict.num_truncated == 0
    with pytest.raises(TokenizerOverflowError, match="text 0 has 12 tokens"):
        strict(["a " * 10] + ["b"] * fillers, context_length=8)


@FILLERS
def test_bad_inputs(tokenizer, fillers):
    more = ["b"] * fillers
    with pytest.raises(TypeError, match="text 1 is a int"):
        tokenizer(["fine", 3, *more])
    with pytest.raises(TypeError, match="text 0 is a bytes"):
        tokenizer([b"bytes", *more])
    with pytest.raises(TypeError, match="text 2 is a NoneType"):
        tokenizer(["a", "é", None, *more])
    with pytest.raises(TypeError):
        tokenizer(None)
    with pytest.raises(TypeError, match="expects a str"):
        tokenizer.encode(5)
    with pytest.raises(ValueError, match="on_overflow"):
        Tokenizer(on_overflow="drop")
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer(context_length=1)
    with pytest.raises(ValueError, match="context_length"):
        tokenizer("x", context_length=0)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.decode([5, 49408])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.decode([-1])


# ----------------------------------------------------------------------------------------------------------------
# Decoding, configuration, pickling, caching


def test_decode(reference, corpus, tokenizer):
    for text in ["a photo of a cat", "two dogs playing in the snow", "a", ""]:
        assert tokenizer.decode(tokenizer.encode(text)) == (text + " " if text else "")
    assert tokenizer.decode(tokenizer.encode("It's 2024, Café!")) == "it 's 2 0 2 4 , café ! "
    row = tokenizer("a photo of a cat.")[0]
    assert (
        tokenizer.decode(row[: int((row == EOT).nonzero()) + 1])
        == "<start_of_text>a photo of a cat . <end_of_text>"
    )
    for text in corpus[:500]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == reference.decode(ids)
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(49408) for _ in range(rng.randint(0, 20))]
        assert tokenizer.decode(torch.tensor(ids, dtype=torch.long)) == reference.decode(ids)
    assert tokenizer.decode(np.array([320, 2368])) == tokenizer.decode([np.int64(320), 2368]) == "a cat "
    with pytest.raises(TypeError):
        tokenizer.decode([320.0])


def test_get_tokenizer():
    assert get_tokenizer().context_length == 77
    assert get_tokenizer("tiny").context_length == 32
    assert get_tokenizer("tiny")(["a cat"]).shape == (1, 32)
    assert get_tokenizer("ViT-B-32").context_length == 77
    config = merge(get_model_config("tiny"), {"text.context_length": 16, "tokenizer.on_overflow": "error"})
    from_config = get_tokenizer(config)
    assert (from_config.context_length, from_config.on_overflow) == (16, "error")

    class Model:
        def __init__(self, config):
            self.config = config

    assert get_tokenizer(Model(config)).context_length == 16
    assert get_tokenizer("tiny", context_length=20).context_length == 20
    with pytest.raises(TypeError, match="model name"):
        get_tokenizer(42)


def test_pickle_round_trip(corpus):
    tokenizer = Tokenizer(context_length=40, on_overflow="truncate")
    expected = tokenizer(corpus[:2000])
    data = pickle.dumps(tokenizer)
    assert len(data) < 4096  # settings and counters only: no vocabulary, no cache, no file handles
    restored = pickle.loads(data)
    assert (restored.context_length, restored.on_overflow) == (40, "truncate")
    assert (
        restored.num_tokenized == tokenizer.num_tokenized
        and restored.num_truncated == tokenizer.num_truncated
    )
    assert torch.equal(restored(corpus[:2000]), expected)


@pytest.mark.slow
def test_bounded_cache_and_threads(reference, corpus):
    """A tiny cache that is cleared constantly, shared by four threads, still gives the reference ids."""
    tokenizer = Tokenizer()
    tokenizer._chunks.max_size = 16
    texts = corpus[:2000]
    expected = reference(texts)
    results: dict[int, torch.Tensor] = {}

    def work(worker: int) -> None:
        results[worker] = tokenizer(texts[worker::4])

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker in range(4):
        assert torch.equal(results[worker], expected[worker::4])
    assert len(tokenizer._chunks) <= 17


# ----------------------------------------------------------------------------------------------------------------
# Real multilingual text, adversarial strings, and the proofs behind the fast paths


def _bench_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tokenizer.py"
    spec = importlib.util.spec_from_file_location("bench_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_corpus() -> list[str]:
    """4,000 real strings: the benchmark's sources (Tux Paint, Openclipart when installed; iso-codes names)."""
    bench = _bench_module()
    texts, _ = bench.real_texts(
        4000,
        tuxpaint_root=bench.tuxpaint.DEFAULT_ROOT,
        openclipart_root=bench.openclipart.DEFAULT_SVG_ROOT,
        catalogs=("iso_3166-1", "iso_15924", "iso_4217", "xdg-user-dirs"),
    )
    scripts = {bench.script_of(text) for text in texts}
    assert len(texts) == 4000 and len(scripts) >= 20, (
        f"found {len(texts)} real texts in {len(scripts)} scripts; install the Debian package iso-codes "
        f"(apt-get install iso-codes) for the translated names under {bench.LOCALE_ROOT}"
    )
    return texts


def test_real_multilingual_text_matches_open_clip(reference, real_corpus):
    mismatched = [
        t
        for t, a, b in zip(real_corpus, Tokenizer()(real_corpus), reference(real_corpus))
        if not torch.equal(a, b)
    ]
    assert not mismatched, f"{len(mismatched)} texts differ, first: {mismatched[0]!r}"
    tokenizer = Tokenizer()
    for text in real_corpus[:500]:  # the single-text path
        assert tokenizer.encode(text) == reference.encode(text), repr(text)


BADNESS_PATTERN_SHA256 = "9dcc0f2ac90d9ae3c85eb7b9b2c0b8a8e8126153847c2b30c91a0bb263f3b8c4"  # ftfy 6.3.1

# fmt: off
ADVERSARIAL = [
    "🐱‍👤 ninja cat", "👩🏽‍🚀🚀", "🏳️‍⚧️", "e\u0301e\u0301", "cafe\u0301 crème", "Å Å Å", "ﷺ", "\u0e01\u0e34\u0e4a",
    "مرحبا بالعالم", "שלום \u200fעולם\u200e", "\u202bRTL\u202c", "\u202eevil", "zero\u200bwidth", "zw\u200cnj\u200dj",
    "\ufeffbom", "\u2060joiner", "x" * 200, "é" * 70, "кошка" * 20, "猫" * 30, "a\u0300" * 40, "🐱" * 20,
    "&amp;&lt;&gt;", "caf&eacute;", "&#128512;", "AT&amp;T &nbsp;x", "cafÃ©", "â€œquotedâ€\x9d", "Ã¼ber naÃ¯ve",
    "Ð¿Ñ€Ð¸Ð²ÐµÑ‚", "РїСЂРёРІРµС‚", "l’été “quoted”", "ＬＯＵＤ　ＮＯＩＳＥＳ", "ﬁsh ﬂower ĳs", "a\r\nb\u2028c\u2029d\x85e",
    "\x1b[31mred\x1b[0m", "ΑΣ\tΑ", "ΑΣ\u3000Β", "ΟΔΟΣ ΟΔΟΣ.", "İstanbul ǅ ß", "Å\u030a", "\u0345\u0399", "Straße ẞ",
    "naïve café résumé", "Zürich Ångström São Paulo", "½ ² ① Ⅻ", "１２３ ｶﾀｶﾅ", "\ud83d\ude00 pair", "\ud800 lone",
    "line one\nline two Ã©", "Ã©\nplain second line", "1\nÃ x", "1\nÂ x", "x\n\nÃ y\n", "× ² ³", "√± ≈°", "Âµ Â½", "\u00a0nbsp\u00a0", "—–…·•",
]
# fmt: on


def test_adversarial_strings_match_open_clip(reference):
    texts = ADVERSARIAL + [a + " " + b for a, b in zip(ADVERSARIAL, ADVERSARIAL[7:] + ADVERSARIAL[:7])]
    assert torch.equal(Tokenizer()(texts), reference(texts))  # the batch path
    assert torch.equal(torch.cat([Tokenizer()(text) for text in texts]), reference(texts))  # one at a time
    tokenizer = Tokenizer()
    for text in texts:
        assert tokenizer.encode(text) == reference.encode(text), repr(text)


@pytest.mark.slow
def test_ftfy_shortcut_is_exact_on_every_bmp_character():
    """Every single character the shortcut lets through is left unchanged by ftfy and html.unescape."""
    from clipforge.bpe import _ftfy_leaves_unchanged

    passed = [chr(code) for code in range(0x10000) if _ftfy_leaves_unchanged(chr(code))]
    assert 60_000 < len(passed) < 0x10000 - 2000  # most of the BMP; not the triggers and surrogates
    for char in passed:
        assert ftfy.fix_text(char) == char and html.unescape(char) == char, hex(ord(char))
    for text in [*"&\r\x85\u2028ﬁ’“！\x00\x1b\ufeff\u206a\ud800", "e\u0301", "cafÃ©", "Ã¼ber", "1\nÃ x"]:
        assert not _ftfy_leaves_unchanged(text), repr(text)  # triggers, not NFC, mojibake


@pytest.mark.slow
def test_ftfy_shortcut_is_exact_on_random_mixtures(real_corpus):
    """Strings of characters ftfy's heuristics care about: when the shortcut skips ftfy, ftfy changes nothing."""
    from clipforge.bpe import _ftfy_leaves_unchanged

    rng = random.Random(0)
    pools = [(0x09, 0x0A, 0x20), range(0x20, 0x7F), range(0xA0, 0x250), range(0x370, 0x530), range(0x300, 0x370), range(0x2000, 0x2100),
             range(0x2500, 0x2600), range(0x3040, 0x3100), range(0xFB00, 0xFB07)]  # fmt: skip
    samples = [
        "".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(1, 8))) for _ in range(30_000)
    ]
    samples += real_corpus + [text.upper() for text in real_corpus] + ADVERSARIAL
    skipped = 0
    for text in samples:
        if _ftfy_leaves_unchanged(text):
            skipped += 1
            assert ftfy.fix_text(text) == text and html.unescape(text) == text, repr(text)
            assert clean_text(text) == " ".join(text.split()).lower()
    assert skipped > len(samples) // 3  # the test exercised the shortcut, not only the full path


def test_mojibake_hint_covers_ftfy_badness_regex():
    """``is_bad`` is only skipped for texts without a hint character; pinned to the regex it was checked on."""
    from ftfy.badness import BADNESS_RE, is_bad

    from clipforge.bpe import _MOJIBAKE_HINT

    digest = hashlib.sha256(BADNESS_RE.pattern.encode("utf-8", "surrogatepass")).hexdigest()
    assert digest == BADNESS_PATTERN_SHA256, (
        "ftfy's BADNESS_RE changed: check that every alternative still contains a position drawn from "
        "MOJIBAKE_CATEGORIES or a non-ASCII literal (clipforge.bpe._mojibake_hint), then update the digest"
    )
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randint(2, 5)))
        if _MOJIBAKE_HINT.search(text) is None:
            assert not is_bad(text), repr(text)


@pytest.mark.slow
def test_lower_commutes_with_whitespace_and_joins():
    """The batch path lower-cases many texts joined by spaces: lower() must not create or remove whitespace,
    and whitespace must not be case-ignorable (Greek final sigma would see across it)."""
    for code in range(0x110000):
        char = chr(code)
        lowered = char.lower()
        if char.isspace():
            assert lowered == char and ("aΣ" + char + "b").lower() == "aς" + char + "b", hex(code)
            assert ("b" + char + "Σ").lower() == "b" + char + "σ", hex(code)
        else:
            assert not any(c.isspace() for c in lowered), hex(code)


def test_merges_use_only_earlier_merges():
    """Why one-at-a-time merging equals OpenAI's pass per rank: a merge's parts are made by earlier merges."""
    from clipforge.bpe import _load_vocab

    vocab = _load_vocab()
    made_at = {merged: rank for (rank, merged) in vocab.merges.values()}
    for (left, right), (rank, _) in vocab.merges.items():
        assert made_at.get(left, -1) < rank and made_at.get(right, -1) < rank
    assert len(vocab.merged_ids) == len(vocab.ranks) == 48_894
