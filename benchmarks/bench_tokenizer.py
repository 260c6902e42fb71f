"""Tokenizer throughput: clipforge's ``Tokenizer`` vs open_clip's ``SimpleTokenizer`` on the same captions.

Each repeat times both tokenizers on fresh instances (cold word caches) and then again on the same instances
(warm caches), alternating which goes first; medians and ratios are printed and the ids must be identical.

    python benchmarks/bench_tokenizer.py --n 100000 --repeats 3
    python benchmarks/bench_tokenizer.py --captions captions.txt   # one caption per line
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from clipforge.bpe import _NEEDS_FULL_CLEAN, Tokenizer


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


def _time(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(captions: list[str], repeats: int) -> dict[str, float]:
    """Median seconds per pass for both tokenizers, cold and warm; asserts identical ids every pass."""
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
                seconds, outputs[name] = _time(lambda tokenizer=tokenizer: tokenizer(captions))
                times[f"{name} {phase}"].append(seconds)
            if not torch.equal(outputs["clipforge"], outputs["open_clip"]):
                rows = (outputs["clipforge"] != outputs["open_clip"]).any(dim=1).nonzero().flatten()
                raise AssertionError(f"ids differ on {len(rows)} captions, first: {captions[int(rows[0])]!r}")
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--n", type=int, default=100_000, help="number of synthetic captions")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per tokenizer (medians)")
    parser.add_argument("--captions", type=Path, help="read captions from this file, one per line, instead")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both tokenizers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # Long captions would log one truncation warning per pass; the ids are compared to open_clip's anyway.
    logging.getLogger("clipforge.tokenizer").setLevel(logging.ERROR)
    if args.captions:
        captions = args.captions.read_text(encoding="utf-8").splitlines()[: args.n]
        source = str(args.captions)
    else:
        captions = synthetic_captions(args.n, seed=args.seed)
        source = f"synthetic (seed {args.seed})"
    plain = sum(_NEEDS_FULL_CLEAN.search(caption) is None for caption in captions) / max(len(captions), 1)
    print(f"{len(captions):,} captions from {source}, {plain:.1%} plain ASCII (ftfy skipped)")
    print(f"{args.repeats} alternating repeats, {args.threads} torch thread(s), medians")
    medians = run(captions, args.repeats)

    print(f"{'':<6}{'clipforge':>14}{'open_clip':>14}{'speed-up':>10}")
    for phase in ("cold", "warm"):
        ours, theirs = medians[f"clipforge {phase}"], medians[f"open_clip {phase}"]
        print(
            f"{phase:<6}{len(captions) / ours:>12,.0f}/s{len(captions) / theirs:>12,.0f}/s{theirs / ours:>9.1f}x"
        )
    print("ids identical in every pass: yes")


if __name__ == "__main__":
    main()
