"""BERT's WordPiece tokenizer, for pretrained BERT text towers (all-MiniLM-L6-v2): the ids Hugging Face's BERT
tokenizer gives, read from the tower's ``vocab.txt`` and ``tokenizer_config.json``.

The pipeline: special tokens ([CLS], [SEP], [MASK], ...) are matched verbatim in the raw text, as Hugging Face
does; every other span is cleaned (NUL, U+FFFD and control/format characters dropped, whitespace made a space),
CJK ideographs are spaced out, accents stripped (NFD, then non-spacing marks dropped), lower-cased character by
character, split on whitespace and punctuation, and each word is cut greedily into the longest vocabulary
pieces (``##`` marks a continuation). A word with a piece not in the vocabulary, or longer than 100 characters,
becomes [UNK]. Rows are ``[CLS] ids [SEP]`` then [PAD] (id 0), packed and truncated (counted) by
:class:`clipforge.bpe.Tokenizer`, whose policy and bookkeeping this class shares.

Character classes come from Python's ``unicodedata``, corrected by a small table of the code points where the
Unicode tables inside Hugging Face's Rust tokenizer differ (characters added to Unicode after those tables were
made): see :data:`UNICODE_OVERRIDES_PATH` and ``tests/wordpiece_reference.py``, which regenerates it.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clipforge.bpe import Tokenizer

UNICODE_OVERRIDES_PATH = Path(__file__).parent / "assets" / "wordpiece_unicode.json"
CONTINUATION = "##"
MAX_CHARS_PER_WORD = 100  # longer words are [UNK] (Hugging Face's max_input_chars_per_word)

# ASCII control characters other than tab, newline and carriage return: removed by BERT's cleaning.
_ASCII_CONTROLS = dict.fromkeys([*range(0, 9), 11, 12, *range(14, 32), 127])
# Whitespace (Unicode White_Space, plus tab/newline/CR) that is not a control character: becomes a space.
_WHITESPACE = frozenset("\t\n\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
                        "\u2028\u2029\u202f\u205f\u3000")  # fmt: skip
# CJK ideograph blocks that BERT surrounds with spaces (each ideograph is a word of its own).
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
_ASCII_PUNCTUATION = frozenset(
    chr(c) for c in [*range(33, 48), *range(58, 65), *range(91, 97), *range(123, 127)]
)


@dataclass(frozen=True)
class UnicodeOverrides:
    """Code points whose class differs between Python's ``unicodedata`` and the reference tokenizer's tables."""

    keep_in_clean: frozenset[int]  # Python calls them control/format characters; the reference keeps them
    drop_in_clean: frozenset[int]  # the reference drops them while cleaning
    keep_marks: frozenset[int]  # non-spacing marks for Python that the reference keeps when stripping accents
    drop_marks: frozenset[int]  # the reference drops them when stripping accents
    decompose: dict[int, str]  # NFD of a character where the reference differs
    lower: dict[int, str]  # lower-casing where the reference differs
    punctuation: frozenset[int]  # the reference splits them off as punctuation, Python's categories do not
    not_punctuation: frozenset[int]  # Python's categories say punctuation, the reference does not


@lru_cache(maxsize=1)
def unicode_overrides() -> UnicodeOverrides:
    data = json.loads(UNICODE_OVERRIDES_PATH.read_text())
    if data.get("unidata_version") != unicodedata.unidata_version:
        # The table corrects one Unicode version; under another the corrections could be wrong, so none apply
        # (tests/test_wordpiece.py then reports the code points where ids would differ).
        logging.getLogger("clipforge.tokenizer").warning(
            "%s corrects Python's Unicode %s tables, not this Python's %s: not applied, so rare characters "
            "(added to Unicode recently) may get ids other than Hugging Face's; regenerate it with "
            "python -m tests.wordpiece_reference",
            UNICODE_OVERRIDES_PATH.name,
            data.get("unidata_version"),
            unicodedata.unidata_version,
        )
        return UnicodeOverrides(*(frozenset() for _ in range(4)), {}, {}, frozenset(), frozenset())

    def ints(key: str) -> frozenset[int]:
        return frozenset(int(h, 16) for h in data[key])

    def mapping(key: str) -> dict[int, str]:
        return {int(h, 16): value for h, value in data[key].items()}

    return UnicodeOverrides(
        ints("keep_in_clean"),
        ints("drop_in_clean"),
        ints("keep_marks"),
        ints("drop_marks"),
        mapping("decompose"),
        mapping("lower"),
        ints("punctuation"),
        ints("not_punctuation"),
    )


class _CharMap(dict):
    """A ``str.translate`` table filled on demand: ``function(char)`` for each code point the first time it is
    seen, so translating is a C loop over a dict after warm-up."""

    def __init__(self, function: Callable[[str], str]) -> None:
        super().__init__()
        self.function = function

    def __missing__(self, codepoint: int) -> str:
        value = self[codepoint] = self.function(chr(codepoint))
        return value


def _is_control(char: str) -> bool:
    overrides = unicode_overrides()
    codepoint = ord(char)
    if codepoint in overrides.keep_in_clean:
        return False
    if codepoint in overrides.drop_in_clean:
        return True
    return char not in "\t\n\r" and unicodedata.category(char) in ("Cc", "Cf", "Co")


def _clean_char(char: str, split_cjk: bool) -> str:
    """BERT's cleaning of one character: '' (dropped), ' ' (whitespace), ' c ' (a spaced CJK ideograph) or c."""
    codepoint = ord(char)
    if codepoint in (0, 0xFFFD) or _is_control(char):
        return ""
    if char in _WHITESPACE:
        return " "
    if split_cjk and any(low <= codepoint <= high for low, high in _CJK_RANGES):
        return f" {char} "
    return char


def _strip_mark(char: str) -> str:
    codepoint, overrides = ord(char), unicode_overrides()
    if codepoint in overrides.keep_marks:
        return char
    if codepoint in overrides.drop_marks or unicodedata.category(char) == "Mn":
        return ""
    return char


def _lower_char(char: str) -> str:
    """One character lower-cased on its own (no context: 'Σ' is always 'σ', as in the reference)."""
    override = unicode_overrides().lower.get(ord(char))
    return override if override is not None else char.lower()


def _space_punctuation(char: str) -> str:
    codepoint, overrides = ord(char), unicode_overrides()
    if codepoint in overrides.punctuation:
        return f" {char} "
    if codepoint in overrides.not_punctuation:
        return char
    if char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P"):
        return f" {char} "
    return char


class _Normalizer:
    """Raw text (without special tokens) -> the list of words the WordPiece model sees."""

    def __init__(self, lowercase: bool, strip_accents: bool, split_cjk: bool) -> None:
        self.lowercase, self.strip_accents = lowercase, strip_accents
        self._clean = _CharMap(lambda char: _clean_char(char, split_cjk))
        self._strip = _CharMap(_strip_mark)
        self._lower = _CharMap(_lower_char)
        self._punctuation = _CharMap(_space_punctuation)

    def words(self, text: str) -> list[str]:
        if text.isascii():  # the same steps, with ASCII's classes: nothing to decompose, strip or look up
            text = text.translate(_ASCII_CONTROLS)
            if self.lowercase:
                text = text.lower()
            return _ASCII_WORD.findall(text)
        text = text.translate(self._clean)
        if self.strip_accents:
            text = _nfd(text).translate(self._strip)
        if self.lowercase:
            text = text.translate(self._lower)
        return text.translate(self._punctuation).split()


_ASCII_WORD = re.compile(
    r"[A-Za-z0-9]+|[^\sA-Za-z0-9]"
)  # after cleaning: letters/digits runs, single punctuation


def _nfd(text: str) -> str:
    """NFD of ``text``, except that characters with a ``decompose`` override become that override."""
    pattern = _decompose_pattern()
    if pattern is None or pattern.search(text) is None:
        return unicodedata.normalize("NFD", text)
    overrides, parts, start = unicode_overrides().decompose, [], 0
    for match in pattern.finditer(text):
        parts += [unicodedata.normalize("NFD", text[start : match.start()]), overrides[ord(match.group())]]
        start = match.end()
    parts.append(unicodedata.normalize("NFD", text[start:]))
    return "".join(parts)


@lru_cache(maxsize=1)
def _decompose_pattern() -> re.Pattern | None:
    overrides = unicode_overrides().decompose
    return re.compile("|".join(re.escape(chr(cp)) for cp in overrides)) if overrides else None


@dataclass(frozen=True)
class _Vocab:
    ids: dict[str, int]
    tokens: tuple[str, ...]


@lru_cache(maxsize=4)
def _load_vocab(path: str) -> _Vocab:
    tokens = tuple(Path(path).read_text(encoding="utf-8").split("\n"))
    if tokens and tokens[-1] == "":
        tokens = tokens[:-1]
    ids = {token: index for index, token in enumerate(tokens)}
    if len(ids) != len(tokens):
        raise ValueError(f"{path}: the WordPiece vocabulary repeats tokens")
    return _Vocab(ids, tokens)


class _WordCache(dict):
    """Word -> its WordPiece ids as int32 bytes; filled on a miss, cleared when full (as ``_ChunkCache``)."""

    max_size = 1 << 17

    def __init__(self, vocab: _Vocab, unk_id: int) -> None:
        super().__init__()
        self.vocab, self.unk_id = vocab, unk_id

    def __missing__(self, word: str) -> bytes:
        ids = np.array(wordpiece(word, self.vocab.ids, self.unk_id), dtype=np.int32).tobytes()
        if len(self) >= self.max_size:
            self.clear()
        self[word] = ids
        return ids


def wordpiece(word: str, vocab: dict[str, int], unk_id: int) -> list[int]:
    """Greedy longest-match-first WordPiece of one word; [UNK] alone when a piece is missing or it is too long."""
    if len(word) > MAX_CHARS_PER_WORD:
        return [unk_id]
    ids, start, length = [], 0, len(word)
    while start < length:
        end = length
        while end > start:
            piece = word[start:end] if start == 0 else CONTINUATION + word[start:end]
            piece_id = vocab.get(piece)
            if piece_id is not None:
                break
            end -= 1
        else:
            return [unk_id]
        ids.append(piece_id)
        start = end
    return ids


class WordPieceTokenizer(Tokenizer):
    """BERT WordPiece tokenizer over a model folder with ``vocab.txt`` (and optionally ``tokenizer_config.json``
    and ``special_tokens_map.json``), id for id equal to Hugging Face's fast BERT tokenizer.

    ``tokenizer(texts)`` returns a LongTensor [N, context_length]: ``[CLS] + ids + [SEP]`` then [PAD] (0).
    Overflow is handled as :class:`~clipforge.bpe.Tokenizer` does (``'truncate'`` keeps the first
    ``context_length - 2`` pieces and counts the text in ``num_truncated``; ``'error'`` raises).
    """

    def __init__(
        self,
        folder: str | Path,
        context_length: int = 256,
        on_overflow: Literal["truncate", "error"] = "truncate",
    ) -> None:
        self.folder = str(folder)
        super().__init__(context_length, on_overflow)

    def _setup(self) -> None:
        folder = Path(self.folder)
        settings = _read_json(folder / "tokenizer_config.json")
        special = {**settings, **_read_json(folder / "special_tokens_map.json")}
        self._vocab = _load_vocab(str(folder / "vocab.txt"))
        ids = self._vocab.ids
        names = {
            key: _token_text(special.get(key, default))
            for key, default in (
                ("cls_token", "[CLS]"),
                ("sep_token", "[SEP]"),
                ("pad_token", "[PAD]"),
                ("unk_token", "[UNK]"),
                ("mask_token", "[MASK]"),
            )
        }
        missing = [name for name in names.values() if name not in ids]
        if missing:
            raise ValueError(f"{folder / 'vocab.txt'}: special token(s) {missing} are not in the vocabulary")
        self.sot_token_id, self.eot_token_id = ids[names["cls_token"]], ids[names["sep_token"]]
        self.pad_token_id, self.unk_token_id = ids[names["pad_token"]], ids[names["unk_token"]]
        if self.pad_token_id != 0:
            raise ValueError(f"{folder}: [PAD] must be id 0 (rows are zero-padded), got {self.pad_token_id}")
        self.vocab_size = len(self._vocab.tokens)
        self._special_ids = {name: ids[name] for name in names.values()}
        self._special = re.compile(
            "|".join(re.escape(name) for name in sorted(names.values(), key=len)[::-1])
        )
        lowercase = bool(settings.get("do_lower_case", True))
        strip = settings.get("strip_accents")
        self._normalizer = _Normalizer(
            lowercase=lowercase,
            strip_accents=lowercase if strip is None else bool(strip),  # BERT: unset follows lower-casing
            split_cjk=bool(settings.get("tokenize_chinese_chars", True)),
        )
        self._words = _WordCache(self._vocab, self.unk_token_id)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "folder": self.folder}

    def __repr__(self) -> str:
        return (
            f"WordPieceTokenizer({self.folder!r}, context_length={self.context_length}, "
            f"on_overflow={self.on_overflow!r})"
        )

    def _text_ids(self, text: str) -> bytes:
        """WordPiece ids of one text (no [CLS]/[SEP]) as native int32 bytes."""
        if "[" not in text:  # every special token starts with '['
            return b"".join(map(self._words.__getitem__, self._normalizer.words(text)))
        parts, start = [], 0
        for match in self._special.finditer(text):
            parts += map(self._words.__getitem__, self._normalizer.words(text[start : match.start()]))
            parts.append(np.array([self._special_ids[match.group()]], dtype=np.int32).tobytes())
            start = match.end()
        parts += map(self._words.__getitem__, self._normalizer.words(text[start:]))
        return b"".join(parts)

    def encode(self, text: str) -> list[int]:
        """WordPiece ids of one text, without [CLS]/[SEP] and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"WordPieceTokenizer.encode expects a str, got {type(text).__name__}")
        return np.frombuffer(self._text_ids(text), dtype=np.int32).tolist()

    def decode(self, ids: Any) -> str:
        """Text of ids [L]: pieces joined by spaces, ``##`` continuations glued on, [PAD] dropped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        tokens = self._vocab.tokens
        bad = [i for i in ids if not 0 <= int(i) < len(tokens)]
        if bad:
            raise ValueError(f"token id {bad[0]} is not in the vocabulary [0, {len(tokens)})")
        words: list[str] = []
        for i in ids:
            if int(i) == self.pad_token_id:
                continue
            token = tokens[int(i)]
            if token.startswith(CONTINUATION) and words:
                words[-1] += token[len(CONTINUATION) :]
            else:
                words.append(token)
        return " ".join(words)

    def _encode_batch(self, texts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            token_ids = [self._text_ids(text) for text in texts]
        except (TypeError, AttributeError):
            _check_str(texts)
            raise
        lengths = np.fromiter(map(len, token_ids), dtype=np.int64, count=len(token_ids)) // 4
        ids = np.frombuffer(b"".join(token_ids), dtype=np.int32)
        return np.arange(len(texts)), lengths, ids


def _check_str(texts) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is a {type(text).__name__}, not a str")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value: Any) -> str:
    """A special token as written in Hugging Face's files: a string or ``{"content": ...}``."""
    return value["content"] if isinstance(value, dict) else str(value)


__all__ = ["WordPieceTokenizer", "wordpiece"]
