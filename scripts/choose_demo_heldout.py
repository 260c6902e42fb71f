"""Choose the demo's held-out icon concepts by a fixed rule and print them (the result is recorded in
``src/clipforge/configs/demo/data.json``; rerun this after a data package or builder rule changes).

Rule: among the concept classes (``label``) of the Material Design Icons and Font Awesome datasets, counting
both sets together, those with 25 to 150 images whose name is mentioned (clipforge.data.builders.core.mentions)
in the captions of at least 10 samples of *other* classes — of any training source: the two icon sets, Simple
Icons and the built-in openclipart and emoji training splits — every 2nd by name. Classes that are not things
(``other``, ``brand logo``, and the ABSTRACT list below) are never held out. The built-in dataset's own held-out
classes (MANIFEST.json) are held out of the icon sets too, where an icon class has the same name, so a held-out
concept is absent from every training source.

    python scripts/choose_demo_heldout.py
"""

from __future__ import annotations

import json
from collections import Counter

from clipforge.data.builders.core import mentions
from clipforge.data.builtin import builtin_dataset_info, builtin_dataset_path
from clipforge.data.packs import ensure_datasets
from clipforge.data.shards import iter_shard

ICON_SOURCES = ("mdi", "fontawesome")
OTHER_SOURCES = ("simpleicons",)
ABSTRACT = ("other", "brand logo", "sign", "circle", "plus sign", "check mark", "letter", "number", "view",
            "filter", "table", "code", "image", "note", "square", "arrows", "roman")  # fmt: skip
MIN_COUNT, MAX_COUNT, MIN_MENTIONS, EVERY = 25, 150, 10, 2


def _samples(folder, splits=("train", "val", "test")):
    for split in splits:
        for shard in sorted((folder / split).glob("shard-*.tar")):
            for raw in iter_shard(shard):
                if hasattr(raw, "captions"):  # a sample, not a damaged-shard event
                    yield raw.extra.get("class"), " ".join(raw.captions)


def main() -> None:
    paths = ensure_datasets([*ICON_SOURCES, *OTHER_SOURCES], progress=False)
    rows = []
    for name in ICON_SOURCES:
        rows += [(name, c, t) for c, t in _samples(paths[name])]
    for name in OTHER_SOURCES:
        rows += [(name, None, t) for _, t in _samples(paths[name])]
    for name in ("openclipart", "emoji"):
        rows += [(name, None, t) for _, t in _samples(builtin_dataset_path(name), ("train",))]
    counts = Counter(c for source, c, _ in rows if source in ICON_SOURCES)
    eligible = []
    for name, count in sorted(counts.items()):
        if name in ABSTRACT or not MIN_COUNT <= count <= MAX_COUNT:
            continue
        mentioned = sum(1 for _, c, text in rows if c != name and mentions(name, text))
        if mentioned >= MIN_MENTIONS:
            eligible.append((name, count, mentioned))
    chosen = {c for c, _, _ in eligible[EVERY - 1 :: EVERY]}
    info = builtin_dataset_info()
    builtin = {name for source in info["sources"].values() for name in source["heldout"]["classes"]}
    per_source = {}
    for name in ICON_SOURCES:
        classes = {c for source, c, _ in rows if source == name}
        per_source[name] = sorted((chosen | builtin) & classes)
    held = sorted(set().union(*per_source.values()))
    print(json.dumps({"rule_chosen": sorted(chosen), "also_builtin": sorted(builtin & set(held)),
                      "per_source": per_source, "images": sum(counts[c] for c in held)}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
