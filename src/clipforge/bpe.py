"""CLIP's byte-level BPE tokenizer: the exact ids of OpenAI's tokenizer, fast batch encoding, counted truncation.

The pipeline is OpenAI's: ``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapse, lower-casing, a
pre-tokenization regex, then byte-level BPE per word. Exact shortcuts make batches fast: text that ftfy and
unescaping provably leave unchanged skips them (plain ASCII without '&', ``_NEEDS_FULL_CLEAN``, or any text
without a character ftfy rewrites, NFC and not mojibake, ``_ftfy_leaves_unchanged``); BPE merges over a list
of pair ranks (``_bpe``); ids are cached per pre-token and per space-separated chunk, since no pre-token spans
a space (``_WordCache``, ``_ChunkCache``); and all such texts of a batch are lower-cased, split and looked up
in one pass over a joined string.

:class:`Tokenizer` is also the base of :class:`clipforge.wordpiece.WordPieceTokenizer` (overflow policy,
packing, counters); :func:`clipforge.tokenizer.get_tokenizer` picks between them.
"""

from __future__ import annotations

import gzip
import html
import logging
import operator
import re
import unicodedata
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise, repeat
from pathlib import Path
from typing import Any, Literal

import ftfy
import numpy as np
import regex
import torch
from ftfy.badness import BADNESS_RE, MOJIBAKE_CATEGORIES, is_bad

logger = logging.getLogger("clipforge.tokenizer")  # the name users configure for every tokenizer

BPE_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 48_894  # merges used by CLIP: 49,408 - 256 bytes - 256 end-of-word bytes - 2 special tokens
SOT_TEXT = "<start_of_text>"
EOT_TEXT = "<end_of_text>"
END_OF_WORD = "</w>"

# OpenAI's pre-tokenization: special tokens, English contractions, letter runs, single digits, and runs of
# anything else that is not whitespace. Kept verbatim (including IGNORECASE) since it defines the ids.
_PRETOKENIZE = regex.compile(
    rf"""{SOT_TEXT}|{EOT_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+""",
    regex.IGNORECASE,
)

# Anything but tab, newline and printable ASCII except '&'. A text without such characters ("plain") is
# returned unchanged by ``ftfy.fix_text``: ASCII text skips its mojibake repair, and its other fixers only
# touch non-ASCII characters, ASCII controls other than tab/newline ('\r' becomes '\n', ESC sequences and
# the rest are removed) or '&' entities. ``html.unescape`` returns text without '&' as is. So cleaning plain
# text is only the whitespace collapse and lower-casing; tests check this on every plain character and pair.
_NEEDS_FULL_CLEAN = re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")


def _ftfy_triggers() -> re.Pattern[str]:
    """The characters some fixer of ``ftfy.fix_text`` (default settings) rewrites or removes on its own.

    Taken from ftfy's own tables, so they follow the locked ftfy: '&' (HTML entities), C1 controls and NEL
    (``fix_c1_controls``, ``fix_line_breaks``), ``LIGATURES``, ``WIDTH_MAP`` (``fix_character_width``), curly
    quotes (``uncurl_quotes``), CR and the Unicode line/paragraph separators, surrogates, and
    ``CONTROL_CHARS`` (``remove_control_chars``; it includes ESC, so no terminal escape sequence either).
    """
    from ftfy import chardata

    codes = {ord("&"), ord("\r"), 0x2028, 0x2029, *range(0x80, 0xA0), *range(0xD800, 0xE000)}
    codes |= set(chardata.LIGATURES) | set(chardata.WIDTH_MAP) | set(chardata.CONTROL_CHARS)
    codes |= {ord(c) for c in "\u02bc\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f"}
    if chardata.SINGLE_QUOTE_RE.pattern != "[\u02bc\u2018-\u201b]" or chardata.DOUBLE_QUOTE_RE.pattern != (
        "[\u201c-\u201f]"
    ):
        raise RuntimeError("ftfy's quote patterns changed: update clipforge.bpe._ftfy_triggers")
    return re.compile("[" + "".join(re.escape(chr(c)) for c in sorted(codes)) + "]")


_FTFY_TRIGGERS = _ftfy_triggers()


def _mojibake_hint() -> re.Pattern[str]:
    """The characters one of which every match of ``ftfy.badness.BADNESS_RE`` contains.

    Each alternative of that regex has a position drawn from its ``MOJIBAKE_CATEGORIES`` or a non-ASCII literal
    (the others, such as ``[a-z]`` or ``\\s``, only ever sit next to one), so a text without any of these is not
    "bad" and ``is_bad`` need not run. Checked for the locked ftfy by a test pinning the regex's source.
    """
    literals = sorted({c for c in BADNESS_RE.pattern if ord(c) > 0x7F})
    categories = "".join(MOJIBAKE_CATEGORIES.values())  # ranges such as "\x80-\x9f", composable as ftfy does
    return re.compile("[" + categories + re.escape("".join(literals)) + "]")


_MOJIBAKE_HINT = _mojibake_hint()


def _ftfy_leaves_unchanged(text: str) -> bool:
    """True only if ``ftfy.fix_text(text) == text`` and ``html.unescape(text) == text`` (exact, conservative).

    ``fix_text`` fixes each line (up to and including its '\\n') in a loop that stops when one round changes
    nothing. In one round, no character of ``_FTFY_TRIGGERS`` means HTML unescaping and every per-character
    fixer leave the line as is; its mojibake repair (``fix_encoding``) returns a line unchanged unless
    ``ftfy.badness.is_bad`` finds a suspicious sequence in that line (checked line by line, as ftfy does: the
    regex has a ``^``); and an NFC-normalized text stays as it is under NFC. Texts without '&' are left alone
    by ``html.unescape``. Tests compare with ftfy on every BMP code point and on random and real texts.
    """
    return (
        _FTFY_TRIGGERS.search(text) is None
        and unicodedata.is_normalized("NFC", text)
        and (_MOJIBAKE_HINT.search(text) is None or not _any_line_is_bad(text))
    )


def _any_line_is_bad(text: str) -> bool:
    """``is_bad`` on each of ftfy's segments of ``text`` (lines keeping their '\\n'; long texts: assume so)."""
    if len(text) > 100_000:  # ftfy also cuts lines over a million characters; not worth following it there
        return True
    lines = text.split("\n")
    return any(map(is_bad, [line + "\n" for line in lines[:-1]] + lines[-1:]))


def _cleans_simply(text: str) -> bool:
    """True only if :func:`clean_text` of ``text`` is ``" ".join(text.split()).lower()`` (no ftfy needed)."""
    return _NEEDS_FULL_CLEAN.search(text) is None or _ftfy_leaves_unchanged(text)


class TokenizerOverflowError(ValueError):
    """A text has more tokens than the context length and the overflow policy is ``'error'``."""


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable characters (the BPE's base symbols).

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, NBSP, soft hyphen) map in byte
    order to U+0100 onwards. The dict's order is the order of the first 256 vocabulary ids.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # '!'..'~', '¡'..'¬', '®'..'ÿ'
    others = [b for b in range(256) if b not in set(printable)]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


@dataclass(frozen=True)
class _Vocab:
    """The BPE tables, loaded once per process and shared by every tokenizer."""

    encoder: dict[str, int]  # vocabulary string -> id
    id_to_bytes: tuple[bytes, ...]  # id -> its UTF-8 bytes ('</w>' kept literally, as OpenAI decodes)
    byte_ids: tuple[int, ...]  # byte value -> id of its symbol inside a word
    byte_end_ids: tuple[int, ...]  # byte value -> id of its symbol ending a word ('</w>' variant)
    merges: dict[tuple[int, int], tuple[int, int]]  # (left id, right id) -> (merge rank, merged id)
    ranks: dict[tuple[int, int], int]  # (left id, right id) -> merge rank
    merged_ids: tuple[int, ...]  # merge rank -> merged id


@lru_cache(maxsize=1)
def _load_vocab() -> _Vocab:
    lines = gzip.decompress(BPE_PATH.read_bytes()).decode("utf-8").split("\n")
    merge_pairs = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    byte_symbols = bytes_to_unicode()
    vocab = list(byte_symbols.values())
    vocab += [symbol + END_OF_WORD for symbol in vocab]
    vocab += ["".join(pair) for pair in merge_pairs]
    vocab += [SOT_TEXT, EOT_TEXT]
    encoder = {token: i for i, token in enumerate(vocab)}
    if len(encoder) != len(vocab) or len(vocab) != 49_408 or any(len(p) != 2 for p in merge_pairs):
        raise RuntimeError(f"{BPE_PATH} is not CLIP's merges file (the vocabulary is not 49,408 unique)")
    merges = {
        (encoder[left], encoder[right]): (rank, encoder[left + right])
        for rank, (left, right) in enumerate(merge_pairs)
    }
    byte_values = {symbol: b for b, symbol in byte_symbols.items()}
    id_to_bytes = tuple(bytes(byte_values[ch] for ch in token) for token in vocab)
    return _Vocab(
        encoder=encoder,
        id_to_bytes=id_to_bytes,
        byte_ids=tuple(encoder[byte_symbols[b]] for b in range(256)),
        byte_end_ids=tuple(encoder[byte_symbols[b] + END_OF_WORD] for b in range(256)),
        merges=merges,
        ranks={pair: rank for pair, (rank, _) in merges.items()},
        merged_ids=tuple(merged for _, merged in sorted(merges.values())),
    )


def _bpe(word: str, vocab: _Vocab) -> list[int]:
    """Byte-level BPE of one pre-token: repeatedly merge the lowest-ranked adjacent pair, leftmost first.

    OpenAI merges every occurrence of the lowest-ranked pair in one left-to-right pass, then looks again.
    Merging one occurrence at a time, leftmost first, gives the same ids: every pair a merge creates contains
    the merged symbol, and a merge using a symbol ranks after the merge that made it (tests check this on the
    merges file), so the other occurrences of the same pair are still the lowest-ranked and are taken next,
    left to right. ``ranks[k]`` is the rank of the pair at ``k`` (``NUM_MERGES``: no merge); a merge updates
    its two neighbours only, and ``min`` and ``index`` scan the list in C.
    """
    if word in (SOT_TEXT, EOT_TEXT):
        return [vocab.encoder[word]]
    data = word.encode("utf-8")
    symbols = list(map(vocab.byte_ids.__getitem__, data[:-1]))
    symbols.append(vocab.byte_end_ids[data[-1]])
    if len(symbols) > _LONG_WORD:
        return _bpe_heap(symbols, vocab.merges)
    rank_of, merged_ids = vocab.ranks.get, vocab.merged_ids
    ranks = list(map(rank_of, pairwise(symbols), repeat(NUM_MERGES)))
    while ranks:
        best = min(ranks)
        if best == NUM_MERGES:
            break
        i = ranks.index(best)
        merged = merged_ids[best]
        symbols[i : i + 2] = (merged,)
        del ranks[i]
        if i:
            ranks[i - 1] = rank_of((symbols[i - 1], merged), NUM_MERGES)
        if i < len(ranks):
            ranks[i] = rank_of((merged, symbols[i + 1]), NUM_MERGES)
    return symbols


# Above this many bytes a word is merged with a heap: the pass-per-merge loop above is quadratic in the word's
# length (a 100,000-letter "word" of random letters would take minutes); both give the same ids.
_LONG_WORD = 64


def _bpe_heap(symbols: list[int], merges: dict[tuple[int, int], tuple[int, int]]) -> list[int]:
    """The same merges as :func:`_bpe` in O(n log n): a heap of (rank, position) over a linked list.

    ``_bpe`` merges every occurrence of the lowest-ranked pair left to right, then looks again. Here all heap
    entries of the lowest rank are taken together and applied in position order, skipping those an earlier
    merge of the same batch consumed. A merge creates no pair of its own rank (the merged symbol differs from
    both parts), so each batch is exactly one pass of ``_bpe``. Entries are checked lazily: a node's symbol
    only ever changes by a merge, and its right neighbour only by being absorbed, so an entry is current iff
    both symbols still match.
    """
    import heapq

    n = len(symbols)
    right = list(range(1, n + 1))  # n marks the end
    left = list(range(-1, n - 1))
    alive = [True] * n
    heap = [(merges[pair][0], i, pair) for i, pair in enumerate(pairwise(symbols)) if pair in merges]
    heapq.heapify(heap)

    def current(i: int, pair: tuple[int, int]) -> bool:
        j = right[i]
        return alive[i] and j < n and symbols[i] == pair[0] and symbols[j] == pair[1]

    while heap:
        rank = heap[0][0]
        batch = []
        while heap and heap[0][0] == rank:
            batch.append(heapq.heappop(heap))
        for _, i, pair in sorted(batch, key=lambda entry: entry[1]):
            if not current(i, pair):
                continue
            j = right[i]
            symbols[i] = merges[pair][1]
            alive[j] = False
            right[i] = right[j]
            if right[j] < n:
                left[right[j]] = i
            for a in (left[i], i):
                if a >= 0 and right[a] < n and (new := (symbols[a], symbols[right[a]])) in merges:
                    heapq.heappush(heap, (merges[new][0], a, new))
    return [symbol for symbol, kept in zip(symbols, alive) if kept]


# Separates texts in the joined batch string; a plain-ASCII text cannot contain it, so it is its own chunk.
_TEXT_BREAK = "\x00"
_TEXT_BREAK_IDS = np.array([-1], dtype=np.int32).tobytes()


class _WordCache(dict):
    """Pre-token (e.g. ``"cat"``) -> its BPE ids as native int32 bytes; filled on a miss, cleared when full.

    Chunks that differ only around a word (``"cat."``, ``"cat,"``) share its BPE run.
    """

    max_size = 1 << 17

    def __init__(self, vocab: _Vocab) -> None:
        super().__init__()
        self.vocab = vocab

    def __missing__(self, word: str) -> bytes:
        ids = array("i", _bpe(word, self.vocab)).tobytes()
        if len(self) >= self.max_size:
            self.clear()  # a bound, not an LRU
        self[word] = ids
        return ids

    def chunk_ids(self, chunk: str) -> bytes:
        """Token ids (native int32 bytes) of one space-free chunk of cleaned text: pre-tokenize, then BPE."""
        return b"".join(map(self.__getitem__, _PRETOKENIZE.findall(chunk)))


if array("i").itemsize != np.dtype(np.int32).itemsize:  # ids travel as C ints and are read back as int32
    raise ImportError("clipforge.bpe needs a 4-byte C int")


class _ChunkCache(dict):
    """Cleaned space-free chunk (e.g. ``"cat."``) -> its ids as int32 bytes; filled on a miss, cleared when full.

    Exact because no pre-token contains a space and the regex has no anchors or look-behind, so the
    pre-tokens of a cleaned text are the concatenation of those of its space-separated chunks. The key
    ``_TEXT_BREAK`` is reserved: it maps to -1, which marks text boundaries in a batch.
    """

    max_size = 1 << 17

    def __init__(self, vocab: _Vocab) -> None:
        super().__init__({_TEXT_BREAK: _TEXT_BREAK_IDS})
        self.words = _WordCache(vocab)

    def __missing__(self, chunk: str) -> bytes:
        if chunk == _TEXT_BREAK:  # only after clear(), e.g. by another thread
            return _TEXT_BREAK_IDS
        ids = self.words.chunk_ids(chunk)
        if len(self) >= self.max_size:
            self.clear()  # a bound, not an LRU: refilling costs one BPE run per distinct chunk
            self[_TEXT_BREAK] = _TEXT_BREAK_IDS
        self[chunk] = ids
        return ids

    def ids_of(self, chunks: list[str]) -> bytes:
        """Concatenated ids of the chunks of one cleaned text (the reserved key is never looked up)."""
        if _TEXT_BREAK in chunks:
            return b"".join(map(self.words.chunk_ids, chunks))
        return b"".join(map(self.__getitem__, chunks))


def clean_text(text: str) -> str:
    """OpenAI's cleaning: ``ftfy.fix_text``, HTML-unescape twice, collapse whitespace, lower-case."""
    if _cleans_simply(text):  # exact shortcut, see _NEEDS_FULL_CLEAN and _ftfy_leaves_unchanged
        return " ".join(text.split()).lower()
    return _full_clean(text)


def _full_clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class Tokenizer:
    """CLIP byte-level BPE tokenizer, id-for-id equal to OpenAI's (and open_clip's ``SimpleTokenizer``).

    ``tokenizer(texts)`` returns a LongTensor [N, context_length]: each row ``[sot] + ids + [eot]`` then zeros.
    Texts longer than ``context_length`` are handled by ``on_overflow``: ``'truncate'`` keeps the first
    ``context_length - 1`` tokens, puts the end token last, counts it in ``num_truncated`` and logs a warning;
    ``'error'`` raises :class:`TokenizerOverflowError`.
    """

    def __init__(
        self, context_length: int = 77, on_overflow: Literal["truncate", "error"] = "truncate"
    ) -> None:
        self.context_length = _check_context_length(context_length)
        if on_overflow not in ("truncate", "error"):
            raise ValueError(f"on_overflow must be 'truncate' or 'error', got {on_overflow!r}")
        self.on_overflow = on_overflow
        self.num_tokenized = 0  # texts passed through __call__
        self.num_truncated = 0  # of those, texts cut to fit the context length
        self._setup()

    def _setup(self) -> None:
        self._vocab = _load_vocab()
        self._chunks = _ChunkCache(self._vocab)
        self.vocab_size = len(self._vocab.encoder)
        self.sot_token_id = self._vocab.encoder[SOT_TEXT]
        self.eot_token_id = self._vocab.encoder[EOT_TEXT]

    # Pickle only the settings and counters: the tables are reloaded (once per process), the cache starts empty.
    def __getstate__(self) -> dict[str, Any]:
        keep = ("context_length", "on_overflow", "num_tokenized", "num_truncated")
        return {key: self.__dict__[key] for key in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    def __repr__(self) -> str:
        return f"Tokenizer(context_length={self.context_length}, on_overflow={self.on_overflow!r})"

    def _text_ids(self, text: str) -> bytes:
        """Token ids of one text (no start/end tokens) as native int32 bytes."""
        return self._chunks.ids_of(clean_text(text).split())

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return np.frombuffer(self._chunks.ids_of(clean_text(text).split()), dtype=np.int32).tolist()

    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray) -> str:
        """Text of token ids [L], as OpenAI decodes it: '</w>' becomes a space, special tokens appear verbatim.

        Padding zeros are id 0 ('!'), so slice a row of ``__call__``'s output at its end token first.
        """
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            ids = ids.tolist()
        ids = [operator.index(i) for i in ids]  # ints of any kind (numpy too); floats are a TypeError
        id_to_bytes = self._vocab.id_to_bytes
        bad = [i for i in ids if not 0 <= i < len(id_to_bytes)]
        if bad:
            raise ValueError(f"token id {bad[0]} is not in the vocabulary [0, {len(id_to_bytes)})")
        data = b"".join([id_to_bytes[i] for i in ids])
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenize a text or a batch of N texts into a LongTensor [N, context_length], zero-padded."""
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, Sequence):
            if not isinstance(texts, Iterable):
                raise TypeError(f"Tokenizer expects a str or a sequence of str, got {type(texts).__name__}")
            texts = list(texts)
        if context_length is None:
            context_length = self.context_length
        _check_context_length(context_length)
        if len(texts) <= 4:  # a few texts (e.g. one per DataLoader sample): plain loops beat numpy set-up
            return self._tokenize_few(texts, context_length)
        rows, lengths, ids = self._encode_batch(texts)
        return self._pack(rows, lengths, ids, context_length)

    def _tokenize_few(self, texts: Sequence[str], context_length: int) -> torch.Tensor:
        """Same result as ``_encode_batch`` + ``_pack``, one text at a time."""
        try:
            token_ids = [self._text_ids(text) for text in texts]
        except TypeError:
            _check_types(texts)
            raise
        lengths = np.array([len(ids) // 4 for ids in token_ids], dtype=np.int64)
        self._apply_overflow_policy(lengths, context_length)
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, (ids, length) in enumerate(zip(token_ids, lengths.tolist())):
            length = min(length, context_length - 2)
            out[row, 1 : length + 1] = np.frombuffer(ids, dtype=np.int32)[:length]
            out[row, length + 1] = self.eot_token_id
        out[:, 0] = self.sot_token_id
        return torch.from_numpy(out)

    def _apply_overflow_policy(self, lengths: np.ndarray, context_length: int) -> None:
        """Count texts of ``lengths`` [N] ids that do not fit, then raise (``'error'``) or warn once."""
        overflow = np.flatnonzero(lengths > context_length - 2)
        if overflow.size:
            first = int(overflow[0])
            if self.on_overflow == "error":
                raise TokenizerOverflowError(
                    f"text {first} has {lengths[first] + 2} tokens (including start and end tokens), more "
                    f"than context_length={context_length}. Shorten the text, pass a larger context_length, or "
                    f"use on_overflow='truncate' to keep the first {context_length - 1} tokens and end with the "
                    f"end token."
                )
            before = self.num_truncated
            self.num_truncated += int(overflow.size)
            # Every truncation is counted (num_truncated; the trainer reports it per run). The log warns when the
            # running total first reaches 1, 10, 100, ... so a long run is not drowned in identical lines.
            milestone = 10 ** len(str(max(before, 1))) if before else 1
            level = logging.WARNING if self.num_truncated >= milestone else logging.DEBUG
            logger.log(
                level,
                "truncated %d of %d texts to context_length=%d tokens (the longest had %d; the first was text "
                "%d); %d truncated by this tokenizer so far",
                overflow.size,
                len(lengths),
                context_length,
                int(lengths[overflow].max()) + 2,
                first,
                self.num_truncated,
            )
        self.num_tokenized += len(lengths)

    def _encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids of all texts, each text's ids contiguous but texts in any order.

        Returns the text index of each run [N], its length [N], and the ids [total] (int32).
        """
        search = _NEEDS_FULL_CLEAN.search
        try:
            all_plain = search("\n".join(texts)) is None
        except TypeError:
            _check_types(texts)
            raise
        if all_plain:
            plain_rows, plain, other_rows, other = np.arange(len(texts)), texts, np.arange(0), []
        else:
            is_plain = np.fromiter(map(_cleans_simply, texts), dtype=bool, count=len(texts))
            plain_rows, other_rows = np.flatnonzero(is_plain), np.flatnonzero(~is_plain)
            plain = [texts[i] for i in plain_rows.tolist()]
            other = [texts[i] for i in other_rows.tolist()]
        plain_lengths, plain_ids = self._encode_plain(plain)
        # Everything else through OpenAI's full cleaning (ftfy), one text at a time.
        other_ids = [self._chunks.ids_of(_full_clean(text).split()) for text in other]
        other_lengths = np.fromiter(map(len, other_ids), dtype=np.int64, count=len(other_ids)) // 4
        rows = np.concatenate([plain_rows, other_rows])
        ids = np.concatenate([plain_ids, np.frombuffer(b"".join(other_ids), dtype=np.int32)])
        return rows, np.concatenate([plain_lengths, other_lengths]), ids

    def _encode_plain(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Lengths [N] and concatenated ids [total] of texts that clean simply, in one pass over a joined string.

        Cleaning them is ``" ".join(text.split()).lower()`` (:func:`_cleans_simply`). lower() commutes with the
        join and the whitespace collapse: it maps no character to or from whitespace, and no whitespace is
        case-ignorable, so Greek final sigma sees the same context (tests check both on every code point).
        split() yields the chunks. A text break is a chunk of its own (ftfy removes NUL, so no such text
        contains it) whose id -1 marks where each text ends.
        """
        if not texts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
        chunks = f" {_TEXT_BREAK} ".join(texts).lower().split()
        ids = np.frombuffer(b"".join(map(self._chunks.__getitem__, chunks)), dtype=np.int32)
        breaks = np.flatnonzero(ids < 0)
        lengths = np.diff(np.concatenate([[-1], breaks, [len(ids)]])) - 1
        return lengths, (np.delete(ids, breaks) if len(breaks) else ids)

    def _pack(
        self, rows: np.ndarray, lengths: np.ndarray, ids: np.ndarray, context_length: int
    ) -> torch.Tensor:
        """Rows ``[sot] + ids + [eot]`` zero-padded into a LongTensor [N, context_length], applying the policy.

        ``rows`` [N] is the text index of each run of ``lengths`` [N] ids in ``ids`` [total] (vectorized).
        """
        n = len(rows)
        room = context_length - 2  # ids that fit between the start and end tokens
        text_lengths = np.zeros(n, dtype=np.int64)
        text_lengths[rows] = lengths
        self._apply_overflow_policy(text_lengths, context_length)
        starts = np.cumsum(lengths) - lengths  # where each run begins in ids
        # index in out.ravel() of every id: its row's offset, plus 1 for the start token, plus its place in the run
        target = np.repeat(rows * context_length + 1 - starts, lengths) + np.arange(len(ids))
        if text_lengths.max(initial=0) > room:
            keep = np.arange(len(ids)) - np.repeat(starts, lengths) < room
            target, ids = target[keep], ids[keep]
            np.minimum(text_lengths, room, out=text_lengths)
        out = np.zeros((n, context_length), dtype=np.int64)
        out.ravel()[target] = ids
        out[:, 0] = self.sot_token_id
        out[np.arange(n), text_lengths + 1] = self.eot_token_id
        return torch.from_numpy(out)


def _check_types(texts: Sequence[Any]) -> None:
    """Raise a TypeError naming the first text that is not a str (called once cleaning has failed)."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is a {type(text).__name__}, not a str")


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(
            f"context_length must be an int >= 2 (room for the start and end tokens), got {context_length!r}"
        )
    return context_length
