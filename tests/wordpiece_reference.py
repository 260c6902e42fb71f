"""Where Python's Unicode tables and Hugging Face's Rust tokenizer disagree, probed one step of BERT's normalizer at
a time over every code point: the data behind ``clipforge/assets/wordpiece_unicode.json``.

Regenerate it (needs the ``tokenizers`` package and the MiniLM tower package)::

    python -m tests.wordpiece_reference > src/clipforge/assets/wordpiece_unicode.json
"""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

from clipforge import wordpiece


def code_points():
    return (cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF)


def reference_overrides(tokenizer_json: Path) -> dict:
    """The correction table for this Python's ``unicodedata`` against the tokenizer in ``tokenizer_json``."""
    from tokenizers import Tokenizer, normalizers

    def bert(**flags):
        options = {
            "clean_text": False,
            "handle_chinese_chars": False,
            "strip_accents": False,
            "lowercase": False,
        }
        return normalizers.BertNormalizer(**{**options, **flags}).normalize_str

    clean, cjk, strip = bert(clean_text=True), bert(handle_chinese_chars=True), bert(strip_accents=True)
    nfd, lower = normalizers.NFD().normalize_str, normalizers.Lowercase().normalize_str
    pre_tokenize = Tokenizer.from_file(str(tokenizer_json)).pre_tokenizer.pre_tokenize_str
    table: dict = {
        "unidata_version": unicodedata.unidata_version,
        "reference": "tokenizers BertNormalizer / BertPreTokenizer, probed per code point (tests/wordpiece_reference.py)",
        **{key: [] for key in ("keep_in_clean", "drop_in_clean", "keep_marks", "drop_marks")},
        "decompose": {},
        "lower": {},
        "punctuation": [],
        "not_punctuation": [],
    }
    unexplained = []
    for cp in code_points():
        char, key = chr(cp), f"{cp:x}"
        ours_drop = cp in (0, 0xFFFD) or (
            char not in "\t\n\r" and unicodedata.category(char) in ("Cc", "Cf", "Co")
        )
        theirs = clean(char)
        if theirs == "" and not ours_drop:
            table["drop_in_clean"].append(key)
        elif theirs == char and ours_drop:
            table["keep_in_clean"].append(key)
        elif theirs not in ("", char) and not (theirs == " " and char in wordpiece._WHITESPACE):
            unexplained.append(("clean", key, theirs))
        spaced = any(low <= cp <= high for low, high in wordpiece._CJK_RANGES)
        if cjk(char) != (f" {char} " if spaced else char):
            unexplained.append(("cjk", key, cjk(char)))
        decomposed = nfd(char)
        if decomposed != unicodedata.normalize("NFD", char):
            table["decompose"][key] = decomposed
        if decomposed == char:  # a base character: is it a mark the accent stripping drops?
            theirs_mark, ours_mark = strip(char) == "", unicodedata.category(char) == "Mn"
            if theirs_mark and not ours_mark:
                table["drop_marks"].append(key)
            elif ours_mark and not theirs_mark:
                table["keep_marks"].append(key)
        if lower(char) != char.lower():
            table["lower"][key] = lower(char)
        if not char.isspace() and char not in wordpiece._WHITESPACE and clean(char) == char:
            theirs_punct = len(pre_tokenize(f"a{char}b")) == 3
            ours_punct = char in wordpiece._ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")
            if theirs_punct and not ours_punct:
                table["punctuation"].append(key)
            elif ours_punct and not theirs_punct:
                table["not_punctuation"].append(key)
    if unexplained:
        raise AssertionError(f"differences the table cannot express: {unexplained[:10]}")
    return table


def main() -> None:
    from tests.test_towers import minilm_folder

    json.dump(reference_overrides(minilm_folder() / "tokenizer.json"), sys.stdout, indent=0, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
