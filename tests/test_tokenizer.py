"""Tokenizer: id-for-id parity with open_clip's SimpleTokenizer (= OpenAI's), overflow policy, API, pickling."""

from __future__ import annotations

import hashlib
import html
import logging
import pickle
import random
import threading
import warnings

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
