"""Tokenizer throughput: clipforge's ``Tokenizer`` vs open_clip's ``SimpleTokenizer`` on the same texts.

By default the texts are real and varied (:func:`real_texts`): Tux Paint stamp descriptions with their
translations, Openclipart titles and descriptions, and translated names from the system's gettext catalogs
(iso-codes: countries, languages, scripts, currencies; shared-mime-info: file types), in well over 100
languages; the counts by source and by script are printed. ``--synthetic`` uses seeded English clip-art
captions over a ~200-word vocabulary instead (the word caches almost always hit: not what users feed it).

Each repeat times both tokenizers on fresh instances (cold caches: each word seen for the first time) and then
again on the same instances (warm: the second pass), alternating which goes first. The speed-up is open_clip's
time over clipforge's within each repeat; its median is printed, and the ids must be identical in every pass.

    python benchmarks/bench_tokenizer.py                      # real text, 60,000 strings, 5 repeats
    python benchmarks/bench_tokenizer.py --synthetic --n 100000
    python benchmarks/bench_tokenizer.py --captions captions.txt   # one caption per line
"""

from __future__ import annotations

import argparse
import gettext
import logging
import random
import statistics
import time
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import chain, zip_longest
from pathlib import Path

import torch

from clipforge.bpe import _NEEDS_FULL_CLEAN, Tokenizer, _cleans_simply
from clipforge.data.builders import openclipart, tuxpaint

LOCALE_ROOT = Path("/usr/share/locale")
# Catalogs of short translated names (the rest of /usr/share/locale is program messages and help texts).
CATALOGS = ("iso_3166-1", "iso_3166-2", "iso_3166-3", "iso_639-2", "iso_639-3", "iso_639-5", "iso_15924")
CATALOGS += ("iso_4217", "shared-mime-info", "xdg-user-dirs")
INSTALL_HINT = "apt-get install tuxpaint-stamps-default openclipart-svg iso-codes shared-mime-info"


def tuxpaint_texts(root: Path) -> Iterator[str]:
    """Each stamp's English description and every translation (``xx.utf8=...`` lines) under ``root``."""
    for path in sorted(root.rglob("*.txt")):
        english, translations = tuxpaint.parse_description(
            path.read_bytes().decode("utf-8", errors="replace")
        )
        yield from filter(None, [english, *translations.values()])


def openclipart_texts(root: Path) -> Iterator[str]:
    """The title and description of every SVG under ``root`` (unparsable files are skipped)."""
    for path in sorted(root.rglob("*.svg")):
        try:
            metadata = openclipart.read_svg_metadata(path)
        except ValueError:
            continue
        yield from (text for text in (metadata.title, metadata.description) if text.strip())


def gettext_texts(root: Path, catalogs: tuple[str, ...] = CATALOGS) -> Iterator[str]:
    """Translations in the gettext ``catalogs`` (names of .mo files) for every language under ``root``."""
    for path in sorted(root.glob("*/LC_MESSAGES/*.mo")):
        if path.stem not in catalogs:
            continue
        with path.open("rb") as file:
            try:
                catalog = gettext.GNUTranslations(file)._catalog  # type: ignore[attr-defined]
            except (OSError, UnicodeDecodeError, IndexError):
                continue  # a catalog in a legacy encoding or truncated
        yield from (
            text for key, text in sorted(catalog.items(), key=str) if key and isinstance(text, str) and text
        )


def real_texts(
    n: int,
    *,
    tuxpaint_root: Path,
    openclipart_root: Path,
    locale_root: Path = LOCALE_ROOT,
    catalogs: tuple[str, ...] = CATALOGS,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Up to ``n`` distinct real texts and the source of each: the sources shuffled, then taken in turn.

    Taking one text from each source in turn keeps a small source (Openclipart has ~10k) from being drowned
    by a large one (the catalogs have ~200k) until it runs out.
    """
    sources = {
        "tuxpaint": tuxpaint_texts(tuxpaint_root) if tuxpaint_root.is_dir() else iter(()),
        "openclipart": openclipart_texts(openclipart_root) if openclipart_root.is_dir() else iter(()),
        "gettext": gettext_texts(locale_root, catalogs) if locale_root.is_dir() else iter(()),
    }
    rng = random.Random(seed)
    shuffled = []
    for name, texts in sources.items():
        distinct = list(dict.fromkeys(texts))
        rng.shuffle(distinct)
        shuffled.append([(text, name) for text in distinct])
    taken: dict[str, str] = {}
    for text, name in filter(None, chain.from_iterable(zip_longest(*shuffled))):
        if len(taken) == n:
            break
        taken.setdefault(text, name)
    return list(taken), list(taken.values())


def script_of(text: str) -> str:
    """The Unicode script (first word of the character names, e.g. LATIN, CYRILLIC, CJK) of most letters."""
    scripts = Counter(unicodedata.name(c, "?").split(" ")[0] for c in text if c.isalpha())
    return scripts.most_common(1)[0][0] if scripts else "(no letters)"


def describe(texts: list[str], sources: list[str]) -> str:
    """Counts by source and by script, and the share of texts that skip ftfy, for the benchmark's header."""
    by_source = ", ".join(f"{name} {count:,}" for name, count in Counter(sources).most_common())
    scripts = Counter(map(script_of, texts)).most_common()
    top = ", ".join(f"{name} {count:,}" for name, count in scripts[:14])
    if len(scripts) > 14:
        top += f", {len(scripts) - 14} more {sum(count for _, count in scripts[14:]):,}"
    plain = sum(_NEEDS_FULL_CLEAN.search(text) is None for text in texts)
    simple = sum(map(_cleans_simply, texts))
    return (
        f"by source: {by_source}\n"
        f"by script ({len(scripts)} scripts): {top}\n"
        f"{plain / len(texts):.1%} plain ASCII, {simple / len(texts):.1%} left unchanged by ftfy (ftfy skipped)"
    )


def _words(text: str, sep: str = " ") -> list[str]:
    return text.strip().split(sep)


# Word lists for short clip-art style captions ("A red and white anemone flower.").
COLORS = _words(
    "red orange yellow green blue purple pink brown black white gray grey golden silver dark light"
)
ADJECTIVES = _words(
    "small big little large tiny happy sad old young cute funny smiling sleeping flying running wooden shiny "
    "striped spotted fluffy round square tall short cartoon simple colorful bright friendly angry hungry "
    "wild tropical frozen ancient modern broken empty full heavy"
)
NOUNS = _words(
    "cat dog bird fish horse cow pig sheep goat duck chicken rabbit mouse elephant lion tiger bear monkey "
    "giraffe zebra penguin owl frog turtle snake butterfly bee spider dolphin whale shark octopus crab apple "
    "banana orange cherry grape strawberry lemon pear pineapple watermelon carrot tomato potato onion pumpkin "
    "bread cake pizza sandwich cookie car truck bus train bicycle motorcycle airplane helicopter boat ship "
    "rocket tractor house castle tower bridge tree flower rose tulip sunflower cactus mushroom leaf mountain "
    "river cloud sun moon star planet comet guitar piano drum violin trumpet hat shoe shirt umbrella clock "
    "lamp chair table book pencil ball kite balloon flag robot dragon unicorn snowman anemone daisy"
)
PLURALS = {"mouse": "mice", "sheep": "sheep", "fish": "fish", "cherry": "cherries", "strawberry": "berries"}
VERBS = _words(
    "holding|eating|sitting on|standing next to|jumping over|looking at|flying above|playing with", "|"
)
PLACES = _words(
    "in a garden|on the beach|in the snow|under a tree|in space|on a table|in the forest|at night|in the city|"
    "on a white background|near a lake|in the desert|on a hill|in a field of flowers",
    "|",
)
SUFFIXES = [".", ".", ".", "", "!", " .", "..."]
# A few captions carry what real ones do: entities, curly quotes, accents (these take the full ftfy path).
EXTRAS = [
    "black &amp; white",
    "rock & roll",
    "the artist’s sketch",
    "café",
    "jalapeño",
    "crème brûlée",
    "naïve style",
    "piñata",
    "“hello”",
    "Zürich",
]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` short English captions from word lists with a fixed seed (about 3% with non-ASCII or '&')."""
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        noun, other = rng.choice(NOUNS), rng.choice(NOUNS)
        color, adjective = rng.choice(COLORS), rng.choice(ADJECTIVES)
        count = rng.randint(2, 12)
        templates = [
            f"{_article(color).capitalize()} {color} {noun}",
            f"{_article(adjective).capitalize()} {adjective} {color} {noun} {rng.choice(PLACES)}",
            f"A {color} and {rng.choice(COLORS)} {noun}",
            f"{_article(noun).capitalize()} {noun} {rng.choice(VERBS)} {_article(other)} {other}",
            f"{count} {PLURALS.get(noun, noun + 's')} {rng.choice(PLACES)}",
            f"The {noun}'s {other}",
            f"Clip art of {_article(adjective)} {adjective} {noun}",
            f"{noun.upper()} ICON",
            f"Drawing of a {noun}, {color} and {adjective}, {rng.choice(PLACES)}",
            f"A {noun} that isn't {color}",
        ]
        caption = rng.choice(templates) + rng.choice(SUFFIXES)
        if rng.random() < 0.03:
            caption = f"{caption} {rng.choice(EXTRAS)}"
        captions.append(caption)
    return captions


NAMES = ("clipforge", "open_clip")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process only (a shared machine)


def _time(fn: Callable[[], torch.Tensor], clock: Callable[[], float]) -> tuple[float, torch.Tensor]:
    start = clock()
    out = fn()
    return clock() - start, out


def run(captions: list[str], repeats: int, clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per pass for both tokenizers, cold and warm, one entry per repeat; asserts identical ids."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from open_clip.tokenizer import SimpleTokenizer

    times: dict[str, list[float]] = {f"{name} {phase}": [] for name in NAMES for phase in ("cold", "warm")}
    for repeat in range(repeats):
        ours, theirs = Tokenizer(), SimpleTokenizer()  # fresh instances: empty caches
        order = [("clipforge", ours), ("open_clip", theirs)]
        if repeat % 2:
            order.reverse()
        for phase in ("cold", "warm"):
            outputs = {}
            for name, tokenizer in order:
                seconds, outputs[name] = _time(lambda tokenizer=tokenizer: tokenizer(captions), CLOCKS[clock])
                times[f"{name} {phase}"].append(seconds)
            if not torch.equal(outputs["clipforge"], outputs["open_clip"]):
                rows = (outputs["clipforge"] != outputs["open_clip"]).any(dim=1).nonzero().flatten()
                raise AssertionError(f"ids differ on {len(rows)} captions, first: {captions[int(rows[0])]!r}")
    return times


def _texts(args: argparse.Namespace) -> tuple[list[str], str]:
    if args.captions:
        captions = args.captions.read_text(encoding="utf-8").splitlines()[: args.n]
        return captions, f"{args.captions}, {_describe_simple(captions)}"
    if args.synthetic:
        captions = synthetic_captions(args.n, seed=args.seed)
        return captions, f"synthetic captions (seed {args.seed}), {_describe_simple(captions)}"
    texts, sources = real_texts(
        args.n, tuxpaint_root=args.tuxpaint_root, openclipart_root=args.openclipart_root, seed=args.seed
    )
    if not texts:
        raise SystemExit(
            f"no real text found: {INSTALL_HINT}, pass --tuxpaint-root/--openclipart-root, or use --synthetic"
        )
    if len(texts) < args.n:
        print(
            f"only {len(texts):,} distinct real texts found (asked for {args.n:,}); for more: {INSTALL_HINT}"
        )
    return texts, f"real text (seed {args.seed})\n{describe(texts, sources)}"


def _describe_simple(captions: list[str]) -> str:
    plain = sum(_NEEDS_FULL_CLEAN.search(caption) is None for caption in captions) / max(len(captions), 1)
    return f"{plain:.1%} plain ASCII"


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--n", type=int, default=60_000, help="number of texts")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per tokenizer (medians)")
    parser.add_argument("--synthetic", action="store_true", help="seeded synthetic English captions instead")
    parser.add_argument("--captions", type=Path, help="read captions from this file, one per line, instead")
    parser.add_argument("--tuxpaint-root", type=Path, default=tuxpaint.DEFAULT_ROOT)
    parser.add_argument("--openclipart-root", type=Path, default=openclipart.DEFAULT_SVG_ROOT)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both tokenizers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # Long captions would log one truncation warning per pass; the ids are compared to open_clip's anyway.
    logging.getLogger("clipforge.tokenizer").setLevel(logging.ERROR)
    texts, description = _texts(args)
    print(f"{len(texts):,} texts: {description}")
    print(f"{args.repeats} alternating repeats, {args.threads} torch thread(s), {args.clock} clock, medians")
    times = run(texts, args.repeats, args.clock)

    print(f"{'':<6}{'clipforge':>14}{'open_clip':>14}{'speed-up':>10}  (per repeat)")
    for phase in ("cold", "warm"):
        ours, theirs = times[f"clipforge {phase}"], times[f"open_clip {phase}"]
        ratios = [t / o for o, t in zip(ours, theirs)]
        rate = len(texts) / statistics.median(ours), len(texts) / statistics.median(theirs)
        each = " ".join(f"{r:.1f}" for r in ratios)
        print(f"{phase:<6}{rate[0]:>12,.0f}/s{rate[1]:>12,.0f}/s{statistics.median(ratios):>9.1f}x  ({each})")
    print("ids identical in every pass: yes")


if __name__ == "__main__":
    main()
