"""Icon names (slugs such as ``account-arrow-down-outline``) read as English by rules kept as data
(``rules.json``, section ``icon_names``): the head noun (the concept class), its modifiers, and captions.

Icon sets name an icon family-first: the object, then what is added to it (``account`` + ``arrow-down`` badge +
``outline`` style). :meth:`IconNamer.describe` splits the words of a name into

- **style** words (``outline``, ``variant``): how the icon is drawn, said of the icon ("an outline icon of ...");
- **state** words (``off``, ``slash``): adjectives of the object ("a crossed-out bell");
- **containers** (``box``, ``circle``): "... in a circle"; in Font Awesome also before the object
  (``circle-check``);
- **badges** (``plus``, ``check``, ``arrow-down``, ...): "... with a check mark";
- **multiple**: the object in the plural ("several accounts");
- **directions** after a pointing head (``arrow``, ``chevron``): "an arrow pointing down";
- the **head**: the first remaining word, or a listed two-word compound (``credit-card``), named by
  ``head_names`` (``alpha`` -> "letter") -- the concept class;
- the **rest**: other words, said before the head ("pdf file", "open folder"), except numbers and single
  letters, and phrases with a relation word (``hand-holding-heart`` -> "a hand holding a heart"), which keep
  the name's order.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clipforge.data.builders.captions import looks_plural, pick_templates, unique, with_article

RULE_FIELDS = (
    "style_words",
    "state_words",
    "containers",
    "badges",
    "multiple_words",
    "directions",
    "pointing_heads",
    "relation_words",
    "family_words",
    "suffix_heads",
    "compounds",
    "head_names",
    "head_templates",
    "number_phrases",
    "plurals",
    "caption_templates",
    "min_class_count",
    "other_class",
)
_NUMBER = re.compile(r"^\d+(\.\d+)?$")


@dataclass(frozen=True)
class IconName:
    """An icon name read as English."""

    words: tuple[str, ...]  # the name's words, lower case
    head: str  # the concept class before rare heads are merged: "account", "letter", "check mark"
    concept: str  # the object without style, state, badges or containers: "pdf file", "open folder"
    noun_phrase: str  # the whole object with article: "a crossed-out bell with a plus sign in a circle"
    style: str = ""  # "outline", "bold", ... ("" for none)
    parts: Mapping[str, Any] = field(default_factory=dict)  # what each word was read as (for the json)


def _plural(noun: str, plurals: Mapping[str, str]) -> str:
    *front, last = noun.split(" ")
    if last in plurals:
        last = plurals[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join([*front, last])


@dataclass
class _Reading:
    """What :meth:`IconNamer.describe` has read of a name so far, besides the head."""

    style: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    badges: list[str] = field(default_factory=list)
    direction: list[str] = field(default_factory=list)
    rest: list[str] = field(default_factory=list)
    multiple: bool = False


class IconNamer:
    """The ``icon_names`` rules compiled; ``leading_containers`` reads ``circle-check`` as a check in a circle
    (Font Awesome) rather than as a kind of circle (Material Design Icons). ``known_names``: every name of the
    icon set; a name's first two words are a compound head when they are a name and the first word alone is
    not, nor a ``family_words`` word (``gas-station``; not ``arrow-up``)."""

    def __init__(
        self,
        rules: Mapping[str, Any],
        *,
        leading_containers: bool = False,
        known_names: Sequence[str] = (),
        min_class_count: int | None = None,
    ) -> None:
        self.rules = dict(rules)
        self.leading_containers = leading_containers
        self.known_names = set(known_names)
        self.family_words = set(rules["family_words"])
        self.suffix_heads = set(rules["suffix_heads"])
        self.style_words: dict[str, str] = dict(rules["style_words"])
        self.state_words: dict[str, str] = dict(rules["state_words"])
        self.containers: dict[str, str] = dict(rules["containers"])
        self.badges: dict[str, str] = dict(rules["badges"])
        self.multiple_words = set(rules["multiple_words"])
        self.directions: dict[str, str] = dict(rules["directions"])
        self.pointing_heads = set(rules["pointing_heads"])
        self.relation_words = set(rules["relation_words"])
        self.head_names: dict[str, str] = dict(rules["head_names"])
        self.head_templates: dict[str, str] = dict(rules["head_templates"])
        self.number_phrases: dict[str, str] = dict(rules["number_phrases"])
        self.compounds = {tuple(c.split("-")) for c in rules["compounds"]}
        self.plurals: dict[str, str] = dict(rules["plurals"])
        self.templates: list[str] = list(rules["caption_templates"])
        self.min_class_count = int(
            min_class_count if min_class_count is not None else rules["min_class_count"]
        )
        self.other_class = str(rules["other_class"])
        self._longest = max((len(k.split("-")) for k in [*self.badges, *self.directions]), default=1)

    def _match(self, words: Sequence[str], start: int, table: Mapping[str, str]) -> tuple[str, int] | None:
        """The longest key of ``table`` (words joined by '-') starting at ``start``: (key, its length)."""
        for length in range(min(self._longest, len(words) - start), 0, -1):
            key = "-".join(words[start : start + length])
            if key in table:
                return key, length
        return None

    def _auto_compound(self, words: Sequence[str]) -> bool:
        if len(words) < 2 or words[0] in self.family_words or words[0] in self.known_names:
            return False
        second = words[1]
        modifiers = (self.badges, self.directions, self.style_words, self.state_words, self.containers)
        if second in self.multiple_words or any(second in table for table in modifiers):
            return False  # "playlist-check" is a playlist with a check mark, not a compound
        return "-".join(words[:2]) in self.known_names

    def describe(self, words: Sequence[str]) -> IconName:
        """Read ``words`` (the name split on '-', lower case)."""
        words = [w for w in (w.lower() for w in words) if w]
        reading = _Reading()
        self._read_ends(words, reading)
        head_length = self._head_length(words)
        self._read_after_head(words, head_length, reading)
        return self._compose(words, words[:head_length], reading)

    def _read_ends(self, words: list[str], reading: _Reading) -> None:
        """Pop style and state words and containers off the end ("bell-off-outline", "check-circle"), and
        leading containers where the icon set puts them first; ``words`` keeps what is left."""
        while len(words) > 1:
            last = words[-1]
            if last in self.style_words:
                reading.style.insert(0, last)
            elif last in self.state_words:
                reading.states.insert(0, last)
            elif last in self.containers:
                reading.containers.insert(0, last)
            elif last in self.multiple_words:
                reading.multiple = True
            else:
                break
            words.pop()
        if self.leading_containers:
            while len(words) > 1 and words[0] in self.containers:
                reading.containers.append(words.pop(0))

    def _head_length(self, words: Sequence[str]) -> int:
        """How many words the head takes: a listed compound, or the first word; a name ending in a suffix head
        is said whole ("indian-rupee-sign": a sign)."""
        head_length = next((n for n in (3, 2) if tuple(words[:n]) in self.compounds), 1)
        if head_length == 1 and self._auto_compound(words):
            head_length = 2
        if len(words) > 1 and words[-1] in self.suffix_heads:
            head_length = len(words)
        return head_length

    def _read_after_head(self, words: Sequence[str], position: int, reading: _Reading) -> None:
        """Sort the words after the head into directions, badges, style, state, containers and the rest."""
        while position < len(words):
            word = words[position]
            direction_match = self._match(words, position, self.directions)
            if (
                direction_match
                and words[0] in self.pointing_heads
                and not reading.rest
                and not reading.badges
            ):
                reading.direction.append(self.directions[direction_match[0]])
                position += direction_match[1]
                continue
            badge_match = self._match(words, position, self.badges)
            if badge_match and not (reading.rest and reading.rest[-1] in self.relation_words):
                reading.badges.append(self.badges[badge_match[0]])
                position += badge_match[1]
                continue
            contained = self._match(words, position + 1, self.badges) if word in self.containers else None
            if contained:  # "building-circle-xmark": a building with a cross in a circle
                reading.badges.append(f"{self.badges[contained[0]]} {self.containers[word]}")
                position += 1 + contained[1]
                continue
            if word in self.style_words:
                reading.style.append(word)
            elif word in self.state_words:
                reading.states.append(word)
            elif word in self.containers and position == len(words) - 1:
                reading.containers.append(word)
            elif word in self.multiple_words:
                reading.multiple = True
            else:
                reading.rest.append(word)
            position += 1

    def _compose(self, words: Sequence[str], head_words: Sequence[str], reading: _Reading) -> IconName:
        """The English of a read name: concept, noun phrase with its badges and containers, style text."""
        rest_words = reading.rest
        head_key = "-".join(head_words)
        head = self.head_names.get(head_key, " ".join(head_words))
        if len(head_words) > 1 and head_words[-1] in self.suffix_heads:
            head_key, head, rest_words = head_words[-1], head_words[-1], []
            concept_words = " ".join(head_words)
        else:
            concept_words = ""
        concept = concept_words or self._concept(head_key, head, rest_words)
        starts_with_article = concept.startswith(("the ", "a ", "an "))
        multiple = reading.multiple
        noun = _plural(concept, self.plurals) if multiple and not starts_with_article else concept
        adjectives = [self.state_words[s] for s in reading.states if self.state_words[s]]
        if reading.direction:
            noun = f"{noun} pointing {' and '.join(reading.direction)}"
        phrase = " ".join([*adjectives, noun])
        if multiple:  # "several accounts"; "several copies of the number 7"
            noun_phrase = f"several copies of {phrase}" if starts_with_article else f"several {phrase}"
        else:
            # the article agrees with the head ("angles pointing left", "arrows to a dot": no article)
            noun_phrase = phrase if starts_with_article or looks_plural(head) else with_article(phrase)
        extras = [f"with {b}" for b in reading.badges if b]
        extras += [self.containers[c] for c in reading.containers]
        noun_phrase = " ".join([noun_phrase, *extras])
        style_text = " ".join(self.style_words[s] for s in reading.style if self.style_words[s])
        parts = {
            "head": head_key,
            "rest": rest_words,
            "style": reading.style,
            "state": reading.states,
            "containers": reading.containers,
            "badges": reading.badges,
            "multiple": multiple,
            "direction": reading.direction,
        }
        return IconName(tuple(words), head, concept, noun_phrase, style_text, parts)

    def _concept(self, head_key: str, head: str, rest: list[str]) -> str:
        """The object named by the head and the other words ("pdf file", "the letter A", "hand holding heart")."""
        if head_key in self.head_templates and rest:
            rest_text = " ".join(rest)
            return self.head_templates[head_key].format(rest=rest_text, REST=rest_text.upper())
        if not rest:
            return head
        numbers = [w for w in rest if _NUMBER.match(w)]
        if numbers and len(numbers) < len(
            rest
        ):  # "battery-charging-40" -> "charging battery" + "at 40 percent"
            words = [w for w in rest if not _NUMBER.match(w)]
            return f"{self._concept(head_key, head, words)} {self._number_phrase(head_key, numbers)}"
        if numbers and head_key in self.number_phrases:
            return f"{head} {self._number_phrase(head_key, numbers)}"
        if any(w in self.relation_words for w in rest):
            text = " ".join([head, *rest])
            # "hand holding heart" -> "hand holding a heart"
            relations = "|".join(sorted(self.relation_words))
            return re.sub(
                rf"\b({relations}) (?!a |an |the )(\w+)$",
                lambda m: f"{m.group(1)} {with_article(m.group(2))}",
                text,
            )
        if all(_NUMBER.match(w) or len(w) == 1 for w in rest):
            return f"{head} {' '.join(rest)}"
        return f"{' '.join(rest)} {head}"

    def _number_phrase(self, head_key: str, numbers: list[str]) -> str:
        return self.number_phrases.get(head_key, "{n}").format(n=" ".join(numbers))

    def captions(
        self, name: IconName, source: str, *, style: str | None = None, count: int = 2, words_line: str = ""
    ) -> tuple[str, ...]:
        """``count`` templated sentences (chosen by the hash of ``source``), then ``words_line`` (e.g. the name's
        words + "icon"). ``style`` overrides the name's style words ("solid" for a Font Awesome family)."""
        style_text = name.style if style is None else " ".join(x for x in (style, name.style) if x)
        icon = with_article(f"{style_text} icon".strip())
        sentences = [
            t.format(icon=icon, np=name.noun_phrase, style=f"{style_text} " if style_text else "")
            for t in pick_templates(self.templates, source, count)
        ]
        return unique([*sentences, words_line])


def concept_classes(heads: Sequence[str], min_count: int, other: str) -> dict[str, str]:
    """Head -> class: heads with fewer than ``min_count`` icons are merged into ``other``."""
    counts = Counter(heads)
    return {head: head if n >= min_count else other for head, n in counts.items()}
