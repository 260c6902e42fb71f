"""Dataset builders on small package-like fixtures made in tmp (no Debian packages needed), the digits builder end
to end against scikit-learn, and the built-in dataset shipped in the package."""

from __future__ import annotations

import argparse
import io
import json
import os
from collections import Counter
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest
from PIL import Image, features

from clipforge.data.builders import BUILDERS, HELDOUT_SPLIT, MissingPackageError, build
from clipforge.data.builders.captions import with_article
from clipforge.data.builders.core import (
    Candidate,
    LabelField,
    SplitOptions,
    assign_splits,
    choose_heldout_classes,
    mention_counts,
    mentions,
    split_counts,
)
from clipforge.data.builders.digits import NUMBER_WORDS, digit_image
from clipforge.data.builders.emoji import DEFAULT_FONT, emoji_captions, name_phrase, parse_emoji_test
from clipforge.data.builders.environment import load_rules
from clipforge.data.builders.openclipart import normalize_title
from clipforge.data.builders.tuxpaint import parse_description
from clipforge.data.raw import DataError, RawSample
from clipforge.data.shards import Manifest, iter_shard
from tests.conftest import locked_import

PD = "http://web.resource.org/cc/PublicDomain"
GPL = "http://creativecommons.org/licenses/GPL/2.0/"


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: package-like trees


def _png(path: Path, size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (200, 30, 30)) -> None:
    """A transparent PNG with one coloured rectangle (the colour makes the bytes unique)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste((*colour, 255), (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    image.save(path)


def _svg(path: Path, title: str, description: str = "", keywords=(), licence: str = PD) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    items = "".join(f"<rdf:li>{escape(k)}</rdf:li>" for k in keywords)
    path.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<metadata><rdf:RDF><cc:Work rdf:about="">'
        f"<dc:title>{escape(title)}</dc:title><dc:description>{escape(description)}</dc:description>"
        f"<dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>"
        "<dc:creator><cc:Agent><dc:title>Test Artist</dc:title></cc:Agent></dc:creator>"
        f'<cc:license rdf:resource="{licence}"/></cc:Work></rdf:RDF></metadata></svg>',
        encoding="utf-8",
    )


# (relative stem, svg title, expected outcome); colours are distinct so only the explicit copy is a duplicate
OPENCLIPART_FILES = [
    ("food/fruit/red_apple", "Red Apple", "kept"),
    ("food/fruit/green_pear_01", "Green_Pear", "kept"),
    ("food/fruit/yellow_banana", "Yellow Banana", "kept"),
    ("animals/birds/robin", "Robin", "kept"),
    ("animals/birds/owl_01", "Snowy Owl", "kept"),
    ("animals/birds/eagle", "Bald Eagle", "kept"),
    ("signs_and_symbols/money/piggybank", "Clipart by Nicu Buculei - piggybank", "kept"),
    ("computer/icons/flat-theme/action/save", "Part of the Flat Icon Collection (Wed Aug 25 2004)", "folder"),
    ("shapes/stars/star_5pt03step", "gramastar", "folder"),
    ("recreation/games/cards/bordered/ace_of_spades", "card", "folder"),
    ("animals/birds/untitled_bird", "Untitled", "title:boilerplate_title"),
    ("animals/birds/flat_bird", "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)", "collection"),
    ("animals/birds/contour_bat", "Clipart by Nicu Buculei - contour_chipmunk", "template"),
    ("animals/birds/groom1", "groom1", "file_name"),
    ("animals/birds/blank", "", "empty"),
    ("animals/birds/gpl_bird", "GPL Bird", "licence"),
    ("animals/birds/huge_bird", "Huge Bird", "too_large"),
    ("animals/birds/tiny_bird", "Tiny Bird", "too_small"),
    ("misc/thing", "A Thing", "no_class"),
]


@pytest.fixture
def openclipart_tree(tmp_path: Path) -> Path:
    root = tmp_path / "openclipart"
    for index, (stem, title, outcome) in enumerate(OPENCLIPART_FILES):
        size = {"huge_bird": (200, 200), "tiny_bird": (8, 8)}.get(stem.rsplit("/", 1)[1], (40, 30))
        _png(root / "png" / f"{stem}.png", size, (10 * index, 255 - 10 * index, 7 * index))
        description = "A shiny red apple." if stem.endswith("red_apple") else ""
        keywords = ["hash", "", "food", "apple", "fruit"] if stem.endswith("red_apple") else ["bird"]
        licence = GPL if outcome == "licence" else PD
        _svg(root / "svg" / f"{stem}.svg", title, description, keywords, licence)
    fruit_png, fruit_svg = root / "png" / "food/fruit", root / "svg" / "food/fruit"
    # the same bytes as red_apple.png: duplicate_image
    (fruit_png / "zz_apple_copy.png").write_bytes((fruit_png / "red_apple.png").read_bytes())
    _svg(fruit_svg / "zz_apple_copy.svg", "Apple Copy")
    os.symlink("red_apple.png", fruit_png / "apple_link.png")  # symlink_duplicate
    os.symlink("red_apple.svg", fruit_svg / "apple_link.svg")
    _svg(fruit_svg / "only_svg.svg", "Only An SVG")  # no_png
    _png(fruit_png / "only_png.png", colour=(1, 2, 3))  # no_svg_metadata
    _png(fruit_png / "broken.png", colour=(4, 5, 6))
    (fruit_svg / "broken.svg").write_text("<svg><metadata>", encoding="utf-8")  # svg_unparsable
    return root


OPENCLIPART_DROPS = {
    "symlink_duplicate": 1,
    "no_png": 1,
    "no_svg_metadata": 1,
    "svg_unparsable": 1,
    "duplicate_image": 1,
    "folder:computer_icons": 1,
    "folder:generated_stars": 1,
    "folder:card_sets": 1,
    "title:boilerplate_title": 1,
    "title:collection_title": 1,
    "title:template_title": 1,
    "title:file_name_title": 1,
    "title:empty_title": 1,
    "licence:not_public_domain": 1,
    "image:too_large": 1,
    "image:too_small": 1,
    "no_class": 1,
}


def _samples(out: Path, split: str) -> list[RawSample]:
    samples = []
    for shard in sorted((out / split).glob("shard-*.tar")):
        for item in iter_shard(shard):
            assert isinstance(item, RawSample) and item.error is None, item
            samples.append(item)
    return samples


def _all_samples(out: Path) -> dict[str, list[RawSample]]:
    info = json.loads((out / "build.json").read_text())
    return {split: _samples(out, split) for split in info["layout"]["splits"]}


def _build_openclipart(tree: Path, out: Path, **options):
    return build(
        "openclipart",
        out,
        png_root=tree / "png",
        svg_root=tree / "svg",
        max_pixels=20_000,
        size=32,
        progress=False,
        **options,
    )


# ----------------------------------------------------------------------------------------------------------------
# openclipart


def test_openclipart_counts_every_drop_by_rule(openclipart_tree: Path, tmp_path: Path) -> None:
    result = _build_openclipart(openclipart_tree, tmp_path / "out")
    counts = result.info["counts"]
    assert counts["dropped"] == OPENCLIPART_DROPS
    assert sum(counts["kept"].values()) == 7
    assert counts["candidates"] == 7 + sum(OPENCLIPART_DROPS.values())
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert classes == {"label": ["bird", "fruit", "money"]}
    kept = {s.extra["source"]: s for split in _all_samples(tmp_path / "out").values() for s in split}
    assert sorted(kept) == sorted(
        f"{stem}.png" for stem, _, outcome in OPENCLIPART_FILES if outcome == "kept"
    )
    piggy = kept["signs_and_symbols/money/piggybank.png"]
    assert (piggy.extra["class"], piggy.extra["label"]) == ("money", 2)
    assert piggy.extra["title"] == "Clipart by Nicu Buculei - piggybank"  # raw metadata kept in the json
    assert any("piggybank" in c for c in piggy.captions)


def test_openclipart_captions_and_metadata(openclipart_tree: Path, tmp_path: Path) -> None:
    _build_openclipart(openclipart_tree, tmp_path / "out")
    kept = {s.extra["source"]: s for split in _all_samples(tmp_path / "out").values() for s in split}
    apple = kept["food/fruit/red_apple.png"]
    templates = load_rules("openclipart")["caption_templates"]
    sentences = {t.format(np="a red apple") for t in templates}
    assert apple.captions[0] in sentences and apple.captions[1] in sentences
    assert apple.captions[0] != apple.captions[1]
    # "hash" and "" are ignored keywords; "apple" repeats a title word
    assert apple.captions[2:] == ("red apple, food, fruit", "A shiny red apple.")
    assert apple.extra["keywords"] == ["hash", "", "food", "apple", "fruit"]
    assert apple.extra["description"] == "A shiny red apple."
    assert apple.extra["licence"] == "public domain" and apple.extra["svg"] == "food/fruit/red_apple.svg"
    pear = kept["food/fruit/green_pear_01.png"]
    assert any("a green pear" in c for c in pear.captions)
    image = Image.open(io.BytesIO(apple.image))
    assert image.size == (32, 32) and image.getpixel((0, 0)) == (255, 255, 255)  # transparency -> white pad


def test_title_normalisation_and_articles() -> None:
    assert normalize_title("Pop_Can (B and W) 01") == "pop can (black and white)"
    assert normalize_title("FatherChristmas") == "father christmas"
    assert normalize_title("glace_03") == "glace"
    assert normalize_title("international maritime signal flag 5") == "international maritime signal flag 5"
    assert normalize_title("L&amp;Atilde;&amp;copy;zard") == "lézard"
    assert [
        with_article(p) for p in ("owl", "red apple", "bananas", "the moon", "unicorn", "hour glass")
    ] == [
        "an owl",
        "a red apple",
        "bananas",
        "the moon",
        "a unicorn",
        "an hour glass",
    ]


def test_heldout_class_goes_whole_to_test_heldout(openclipart_tree: Path, tmp_path: Path) -> None:
    result = _build_openclipart(openclipart_tree, tmp_path / "out", heldout_classes=["money"])
    samples = _all_samples(tmp_path / "out")
    assert [s.extra["class"] for s in samples[HELDOUT_SPLIT]] == ["money"]
    assert all(s.extra["class"] != "money" for split in ("train", "val", "test") for s in samples[split])
    assert result.info["heldout"]["classes"] == ["money"] and result.info["heldout"]["indices"] == [2]
    assert json.loads((tmp_path / "out" / "classes.json").read_text())["label"] == ["bird", "fruit", "money"]
    assert Manifest.load(tmp_path / "out" / HELDOUT_SPLIT / "manifest.json").num_samples == 1
    with pytest.raises(ValueError, match="do not exist"):
        _build_openclipart(openclipart_tree, tmp_path / "out2", heldout_classes=["dragon"])


def test_bad_rules_file_names_file_and_field(openclipart_tree: Path, tmp_path: Path) -> None:
    rules = json.loads((Path(__file__).parents[1] / "src/clipforge/data/builders/rules.json").read_text())
    del rules["openclipart"]["classes"]
    bad = tmp_path / "rules.json"
    bad.write_text(json.dumps(rules))
    with pytest.raises(DataError, match=r"rules\.json: the 'openclipart' section lacks \['classes'\]"):
        _build_openclipart(openclipart_tree, tmp_path / "out", rules=bad)
    rules["openclipart"]["classes"] = {}
    rules["openclipart"]["title_rules"][0]["pattern"] = "(unclosed"
    bad.write_text(json.dumps(rules))
    with pytest.raises(DataError, match="malformed rule"):
        _build_openclipart(openclipart_tree, tmp_path / "out", rules=bad)


def test_existing_output_needs_overwrite(openclipart_tree: Path, tmp_path: Path) -> None:
    _build_openclipart(openclipart_tree, tmp_path / "out")
    with pytest.raises(DataError, match="overwrite"):
        _build_openclipart(openclipart_tree, tmp_path / "out")
    _build_openclipart(openclipart_tree, tmp_path / "out", overwrite=True, heldout_classes=["money"])
    assert (tmp_path / "out" / HELDOUT_SPLIT).is_dir()


def test_missing_package_names_the_apt_get_line(tmp_path: Path) -> None:
    with pytest.raises(MissingPackageError) as raised:
        build("openclipart", tmp_path / "out", png_root=tmp_path / "png", svg_root=tmp_path / "svg")
    message = str(raised.value)
    assert (
        "apt-get install -y openclipart-png openclipart-svg" in message and str(tmp_path / "png") in message
    )
    assert isinstance(raised.value, FileNotFoundError) and isinstance(raised.value, ValueError)
    with pytest.raises(MissingPackageError, match="apt-get install -y tuxpaint-stamps-default"):
        build("tuxpaint", tmp_path / "out", root=tmp_path / "stamps")
    with pytest.raises(MissingPackageError, match="apt-get install -y fonts-noto-color-emoji unicode-data"):
        build("emoji", tmp_path / "out", emoji_test=tmp_path / "e.txt", font=tmp_path / "f.ttf")
    assert not (tmp_path / "out" / "build.json").exists()


def test_cli_build_reports_missing_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clipforge.cli import main
    from clipforge.cli.databuild import builder_options, register_build

    parser = argparse.ArgumentParser()
    register_build(parser.add_subparsers())
    args = parser.parse_args(
        ["build", "tuxpaint", "--out", str(tmp_path / "o"), "--root", str(tmp_path / "x")]
    )
    assert builder_options(args)["root"] == tmp_path / "x"
    wrong = parser.parse_args(["build", "digits", "--out", "o", "--font", "f.ttf"])
    with pytest.raises(ValueError, match="--font do"):
        builder_options(wrong)
    with pytest.raises(MissingPackageError, match="apt-get install"):
        args.func(args)
    code = main(["data", "build", "tuxpaint", "--out", str(tmp_path / "o"), "--root", str(tmp_path / "x")])
    assert code == 2 and "apt-get install -y tuxpaint-stamps-default" in capsys.readouterr().err


def test_unknown_builder_and_option() -> None:
    with pytest.raises(KeyError, match="available"):
        build("nope", "x")
    with pytest.raises(TypeError, match="unknown options"):
        build("digits", "x", png_root="y")
    from clipforge.cli.databuild import BUILDER_NAMES

    assert sorted(BUILDERS) == list(BUILDER_NAMES)
    assert {"digits", "emoji", "openclipart", "tuxpaint"} <= set(BUILDER_NAMES)


# ----------------------------------------------------------------------------------------------------------------
# Splits


def _candidates(counts: dict[str, int], prefix: str = "") -> list[Candidate]:
    return [
        Candidate(f"{prefix}{name}/{i:03d}.png", b"", ("x",), (name,))
        for name, n in counts.items()
        for i in range(n)
    ]


def test_splits_are_stratified_deterministic_and_stable() -> None:
    counts = {"cat": 50, "dog": 30, "eel": 7, "fox": 1}
    candidates = _candidates(counts)
    fields = (LabelField("label", "class"),)
    assignment, heldout = assign_splits(candidates, fields, SplitOptions())
    assert heldout == []
    per_class = Counter((c.classes[0], assignment[c.source]) for c in candidates)
    for name, n in counts.items():
        assert (
            per_class[(name, "train")],
            per_class[(name, "val")],
            per_class[(name, "test")],
        ) == split_counts(n, (0.8, 0.1, 0.1))
    assert split_counts(50, (0.8, 0.1, 0.1)) == (40, 5, 5) and split_counts(7, (0.8, 0.1, 0.1)) == (5, 1, 1)
    assert split_counts(1, (0.8, 0.1, 0.1)) == (1, 0, 0)
    # deterministic whatever the input order; a different seed gives a different split
    assert assign_splits(candidates[::-1], fields, SplitOptions())[0] == assignment
    assert assign_splits(candidates, fields, SplitOptions(seed=1))[0] != assignment
    # adding one file to a class moves at most one other sample of it across each of the two boundaries
    grown, _ = assign_splits(
        [*candidates, Candidate("cat/new.png", b"", ("x",), ("cat",))], fields, SplitOptions()
    )
    moved = [s for s in assignment if grown[s] != assignment[s]]
    assert len(moved) <= 2 and all(s.startswith("cat/") for s in moved)


def test_heldout_choice_rules() -> None:
    counts = {f"class{i:02d}": 30 for i in range(10)} | {"small": 3}
    assert choose_heldout_classes(counts, 2, 10) == ["class02", "class07"]
    fields = (LabelField("label", "class"),)
    candidates = _candidates(counts)
    assignment, heldout = assign_splits(
        candidates, fields, SplitOptions(heldout_every=5, heldout_min_count=10)
    )
    assert heldout == ["class04", "class09"]  # the 5th and 10th of the 10 eligible (sorted); "small" is not
    assert {c.classes[0] for c in candidates if assignment[c.source] == HELDOUT_SPLIT} == set(heldout)
    with pytest.raises(ValueError, match="only 10 classes have at least 10"):
        choose_heldout_classes(counts, 11, 10)
    with pytest.raises(ValueError, match="not both"):
        SplitOptions(heldout_classes=2, heldout_every=5)


def test_heldout_mention_rule() -> None:
    """Only classes named in >= M captions of other classes (or of the extra texts) may be held out."""
    assert mentions("heart", "Two Hearts, love") and mentions("body part", "body  parts")
    assert not mentions("map", "a mapping tool") and not mentions("tool", "toolbox")
    fields = (LabelField("label", "class"),)
    captions = {"cat": "a cat", "dog": "a dog near two cats", "fish": "a fish", "owl": "an owl, a bird"}
    candidates = [
        Candidate(f"{name}/{i}.png", b"", (captions[name],), (name,)) for name in captions for i in range(4)
    ]
    assert mention_counts(candidates, 0) == {"cat": 4, "dog": 0, "fish": 0, "owl": 0}
    assert mention_counts(candidates, 0, ["fish soup", "dogs", "fish"]) == {
        "cat": 4,
        "dog": 1,
        "fish": 2,
        "owl": 0,
    }
    options = SplitOptions(heldout_every=2, heldout_min_count=1, heldout_min_mentions=2)
    with pytest.raises(ValueError, match="selects no class"):  # only "cat" is eligible: there is no 2nd
        assign_splits(candidates, fields, options)
    options = SplitOptions(heldout_classes=1, heldout_min_count=1, heldout_min_mentions=2)
    assert assign_splits(candidates, fields, options)[1] == ["cat"]
    options = SplitOptions(
        heldout_classes=1, heldout_min_count=1, heldout_min_mentions=2, heldout_mention_texts=("fish", "fish")
    )
    assert assign_splits(candidates, fields, options)[1] == [
        "fish"
    ]  # cat, fish eligible: position floor(0.5*2)


# ----------------------------------------------------------------------------------------------------------------
# tuxpaint


@pytest.fixture
def tuxpaint_tree(tmp_path: Path) -> Path:
    root = tmp_path / "stamps"

    def stamp(stem: str, text: str | None, png: bool = True, svg: bool = False, colour=(9, 9, 9)) -> None:
        (root / stem).parent.mkdir(parents=True, exist_ok=True)
        if png:
            _png(root / f"{stem}.png", colour=colour)
        if svg:
            (root / f"{stem}.svg").write_text("<svg/>")
        if text is not None:
            (root / f"{stem}.txt").write_text(text, encoding="utf-8")

    stamp(
        "animals/birds/blackbird",
        "A blackbird.\nfr.utf8=Un merle.\nde.utf8=Eine Amsel.\nxx.utf8=\n",
        colour=(1, 1, 1),
    )
    stamp("animals/birds/blackbird_mirror", None, colour=(2, 2, 2))  # mirror_variant
    stamp("animals/birds/owl", "An owl.", png=False, svg=True)  # svg_only
    stamp("food/fruit/apple", "A red apple.\nes.utf8=Una manzana roja.", colour=(3, 3, 3))
    stamp("food/fruit/cartoon/banana", "A cartoon banana.", colour=(4, 4, 4))  # class from the ancestor
    stamp("food/fruit/empty", "\nfr.utf8=Vide.", colour=(5, 5, 5))  # no_description
    stamp("cartoon/tux/tux-yes", None, colour=(6, 6, 6))  # png_without_description
    stamp("misc/thing", "A thing.", colour=(7, 7, 7))  # no_class
    (root / "animals/birds/blackbird.dat").write_text("noflip\n")
    return root


def test_tuxpaint_captions_translations_classes(tuxpaint_tree: Path, tmp_path: Path) -> None:
    result = build("tuxpaint", tmp_path / "out", root=tuxpaint_tree, size=24, progress=False)
    assert result.info["counts"]["dropped"] == {
        "mirror_variant": 1,
        "svg_only": 1,
        "no_description": 1,
        "png_without_description": 1,
        "no_class": 1,
    }
    kept = {s.extra["source"]: s for split in _all_samples(tmp_path / "out").values() for s in split}
    assert sorted(kept) == [
        "animals/birds/blackbird.png",
        "food/fruit/apple.png",
        "food/fruit/cartoon/banana.png",
    ]
    bird = kept["animals/birds/blackbird.png"]
    assert bird.captions == ("A blackbird.",)
    assert bird.extra["translations"] == {"fr": "Un merle.", "de": "Eine Amsel."}
    assert bird.extra["stamp_options"] == ["noflip"] and bird.extra["licence"] == "GPL-2"
    assert kept["food/fruit/cartoon/banana.png"].extra["class"] == "fruit"
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == {"label": ["bird", "fruit"]}
    assert parse_description("\ufeffA cat.\r\nfr_CA.utf8=Un chat.\nbroken line") == (
        "A cat.",
        {"fr_CA": "Un chat."},
    )


# ----------------------------------------------------------------------------------------------------------------
# emoji

EMOJI_TEST = """# emoji-test.txt (a few lines of the real file's format)
# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# subgroup: face-unwell
1F92E                                                  ; fully-qualified     # 🤮 E5.0 face vomiting

# group: Component
# subgroup: skin-tone
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone

# group: People & Body
# subgroup: hand-fingers-closed
1F44D 1F3FD                                            ; fully-qualified     # 👍🏽 E1.0 thumbs up: medium skin tone

# group: Flags
# subgroup: country-flag
1F1EB 1F1F7                                            ; fully-qualified     # 🇫🇷 E2.0 flag: France
"""


def test_emoji_test_parsing_and_captions(tmp_path: Path) -> None:
    entries = parse_emoji_test(EMOJI_TEST)
    assert [e.status for e in entries] == ["fully-qualified"] * 2 + [
        "unqualified",
        "fully-qualified",
        "component",
    ] + ["fully-qualified"] * 2
    vomiting = entries[3]
    assert (vomiting.text, vomiting.name, vomiting.group, vomiting.subgroup) == (
        "\U0001f92e",
        "face vomiting",
        "Smileys & Emotion",
        "face-unwell",
    )
    assert entries[-1].text == "\U0001f1eb\U0001f1f7" and entries[-1].codepoints == "1F1EB 1F1F7"
    assert name_phrase("flag: France") == "the flag of France"
    assert name_phrase("thumbs up: medium skin tone") == "thumbs up (medium skin tone)"
    templates = load_rules("emoji")["caption_templates"]
    captions = emoji_captions("face vomiting", "emoji/1F92E", templates)
    assert len(captions) == 2 and set(captions) <= {
        "an emoji of a face vomiting",
        "face vomiting emoji",
        "an icon of a face vomiting",
    }
    with pytest.raises(DataError, match=r"bad\.txt:2"):
        parse_emoji_test("# group: X\n1F600 ; fully-qualified\n", "bad.txt")


def test_emoji_renders_with_the_real_font(tmp_path: Path) -> None:
    # `make test` installs the font (Makefile: debian-packages); Pillow's wheel bundles libraqm.
    assert DEFAULT_FONT.exists(), f"{DEFAULT_FONT} missing: apt-get install fonts-noto-color-emoji"
    assert features.check("raqm"), "Pillow was built without libraqm, which shapes emoji sequences"
    emoji_test = tmp_path / "emoji-test.txt"
    emoji_test.write_text(EMOJI_TEST, encoding="utf-8")
    result = build("emoji", tmp_path / "out", emoji_test=emoji_test, size=32, progress=False)
    assert result.info["counts"]["dropped"] == {"status:unqualified": 1, "status:component": 1}
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert classes["label"] == ["flag", "person or body part", "smiley or emotion"]
    assert classes["subgroup_label"] == ["closed hand", "country flag", "smiling face", "unwell face"]
    kept = {s.extra["codepoints"]: s for split in _all_samples(tmp_path / "out").values() for s in split}
    assert len(kept) == 5
    flag = kept["1F1EB 1F1F7"]
    assert (flag.extra["class"], flag.extra["subgroup"], flag.extra["subgroup_label"]) == (
        "flag",
        "country flag",
        1,
    )
    pixels = np.asarray(Image.open(io.BytesIO(flag.image)))
    assert pixels.shape == (32, 32, 3) and (pixels < 200).any()  # the glyph, not an empty canvas
    assert any("the flag of France" in c for c in flag.captions)
    no_tones = build(
        "emoji", tmp_path / "out2", emoji_test=emoji_test, size=32, skin_tones=False, progress=False
    )
    assert no_tones.info["counts"]["dropped"]["skin_tone_variant"] == 1


# ----------------------------------------------------------------------------------------------------------------
# digits


@pytest.mark.slow
def test_digits_end_to_end_matches_sklearn(tmp_path: Path) -> None:
    locked_import("sklearn", "scikit-learn")
    from sklearn.datasets import load_digits

    result = build("digits", tmp_path / "out", size=16, progress=False)
    data = load_digits()
    counts = result.info["counts"]
    assert sum(counts["kept"].values()) == len(data.target) == 1797 and counts["dropped"] == {}
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == {"label": list(NUMBER_WORDS)}
    for word, per_split in counts["per_class"]["label"].items():
        n = int((data.target == NUMBER_WORDS.index(word)).sum())
        assert (per_split["train"], per_split["val"], per_split["test"]) == split_counts(n, (0.8, 0.1, 0.1))
    samples = _all_samples(tmp_path / "out")
    for sample in samples["test"][:40]:
        index, label = sample.extra["index"], sample.extra["label"]
        assert label == sample.extra["digit"] == data.target[index]
        assert NUMBER_WORDS[label] in sample.captions[0] or str(label) in sample.captions[0]
        expected = np.asarray(digit_image(data.images[index], 16))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB")), expected)
    again = build("digits", tmp_path / "again", size=16, progress=False)
    for split in ("train", "val", "test"):  # byte-identical rebuild
        first = Manifest.load(tmp_path / "out" / split / "manifest.json")
        second = Manifest.load(tmp_path / "again" / split / "manifest.json")
        assert [s.sha256 for s in first.shards] == [s.sha256 for s in second.shards]
    assert again.info["counts"] == counts


# ----------------------------------------------------------------------------------------------------------------
# The built-in dataset shipped in the package


def test_builtin_dataset_is_complete_and_within_budget() -> None:
    from clipforge.data.builtin import BUILTIN_DIR, builtin_dataset_info, builtin_dataset_path, verify_builtin

    info = builtin_dataset_info()
    assert verify_builtin() == []  # every file's sha256 and size as listed, nothing unlisted, total <= budget
    total = sum(
        p.stat().st_size for p in BUILTIN_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert total <= 25_000_000 == info["budget_bytes"]
    assert set(info["sources"]) == {"openclipart", "emoji"} and "tuxpaint" in info["excluded"]
    assert info["thumbnail"]["size"] == 64
    for source, entry in info["sources"].items():
        folder = builtin_dataset_path(source)
        classes = json.loads((folder / "classes.json").read_text())
        heldout = set(entry["heldout"]["classes"])
        field = entry["heldout"]["field"]
        name_field = "class" if field == "label" else field.removesuffix("_label")
        for split, count in entry["counts"].items():
            samples = _samples(folder, split)
            assert len(samples) == count == Manifest.load(folder / split / "manifest.json").num_samples
            for sample in samples:
                assert sample.extra["package"] != "tuxpaint-stamps-default"
                assert sample.extra["licence"] in ("public domain", "Apache-2.0")
                assert classes["label"][sample.extra["label"]] == sample.extra["class"]
                assert (sample.extra[name_field] in heldout) == (split == HELDOUT_SPLIT)
            assert Image.open(io.BytesIO(samples[0].image)).size == (64, 64)
