"""Small text helpers the builders share: noun phrases with an article, and picking caption templates."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

_NO_ARTICLE_START = re.compile(
    r"^(a|an|the|some|two|three|four|five|six|seven|eight|nine|ten|many|several|\d+)\b", re.IGNORECASE
)
_PLURAL_START = re.compile(r"^(people|men|women|children|kids)\b", re.IGNORECASE)
_VOWEL_SOUND = re.compile(r"^([aeiou]|hour|honest|heir|8|11|18)", re.IGNORECASE)
_CONSONANT_SOUND = re.compile(r"^(uni|use|usu|one|eu|u\.s\.)", re.IGNORECASE)


def looks_plural(phrase: str) -> bool:
    """A rough guess, for choosing 'a' or nothing: the last word ends in 's' but not 'ss', 'us' or 'is'. A
    trailing parenthesis is not the noun: "clapping hands (dark skin tone)" looks plural."""
    words = re.sub(r"\s*\([^()]*\)\s*$", "", phrase).split()
    if not words:
        return False
    last = words[-1].lower().strip(".,;:!?()")
    return len(last) > 3 and last.endswith("s") and not last.endswith(("ss", "us", "is", "ys"))


def with_article(phrase: str) -> str:
    """``"red apple"`` -> ``"a red apple"``, ``"owl"`` -> ``"an owl"``; phrases that already start with an
    article or a number, and phrases that look plural (``"bananas"``), are returned unchanged."""
    phrase = phrase.strip()
    if not phrase or _NO_ARTICLE_START.match(phrase) or _PLURAL_START.match(phrase) or looks_plural(phrase):
        return phrase
    article = "an" if _VOWEL_SOUND.match(phrase) and not _CONSONANT_SOUND.match(phrase) else "a"
    return f"{article} {phrase}"


def pick_templates(templates: Sequence[str], source: str, count: int) -> list[str]:
    """``count`` consecutive templates starting at a position chosen by the hash of ``source`` (deterministic,
    so captions vary across samples but not across rebuilds)."""
    if not templates:
        return []
    start = int(hashlib.sha256(source.encode()).hexdigest()[:8], 16) % len(templates)
    return [templates[(start + i) % len(templates)] for i in range(min(count, len(templates)))]


def unique(texts: Sequence[str]) -> tuple[str, ...]:
    """Non-empty texts in order, without repeats (compared case- and space-insensitively)."""
    seen: set[str] = set()
    kept: list[str] = []
    for text in texts:
        text = " ".join(text.split())
        folded = text.casefold()
        if text and folded not in seen:
            seen.add(folded)
            kept.append(text)
    return tuple(kept)
