"""Emoji (Debian ``fonts-noto-color-emoji`` + ``unicode-data``): every fully-qualified emoji of
``emoji-test.txt`` rendered with Pillow (Noto Color Emoji at size 109, ``embedded_color=True``, shaped by
libraqm so ZWJ sequences, flags and skin tones become one glyph) on white; the caption comes from the CLDR
name, the labels from the CLDR group (``label``) and subgroup (``subgroup_label``), named by ``rules.json``.
Without unicode-data the packaged table ``emoji_table.json`` (the same file compacted, Emoji 15.0; also what
the ``openmoji`` builder names its SVGs by) stands in for ``emoji-test.txt``.

Drop reasons: ``status:<status>`` (lines that are not fully-qualified), ``skin_tone_variant`` (only with
``skin_tones=False``), ``not_one_glyph`` (the font has no single glyph for the sequence), ``render_empty``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, features
from tqdm import tqdm

from clipforge.data.builders.captions import pick_templates, unique, with_article
from clipforge.data.builders.core import PRIMARY_LABEL, Candidate, Collected, ImageOptions, LabelField
from clipforge.data.builders.environment import load_rules, read_text_head, require_files
from clipforge.data.raw import DataError
from clipforge.images import to_rgb

NAME = "emoji"
DEFAULT_EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109  # Noto Color Emoji is a bitmap font with one strike: 109 selects it (136 x 128 px glyphs)
PACKAGES = ("fonts-noto-color-emoji", "unicode-data")
COPYRIGHT_FILES = {
    "fonts-noto-color-emoji": Path("/usr/share/doc/fonts-noto-color-emoji/copyright"),
    "unicode-data": Path("/usr/share/doc/unicode-data/copyright"),
}
LICENCE = (
    "emoji images: Apache-2.0 (Noto Emoji, Google); font: SIL OFL-1.1; names and groups: Unicode License "
    "(emoji-test.txt)"
)
SUBGROUP_LABEL = LabelField("subgroup_label", "subgroup")
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
_LINE = re.compile(
    r"^(?P<cps>[0-9A-Fa-f]+(?: [0-9A-Fa-f]+)*)\s*;\s*(?P<status>[\w-]+)\s*#\s*(?P<emoji>\S+)"
    r"\s+E(?P<version>\d+\.\d+)\s+(?P<name>.+?)\s*$"
)


@dataclass(frozen=True)
class EmojiEntry:
    """One data line of ``emoji-test.txt``."""

    text: str
    codepoints: str  # "1F468 200D 1F469"
    status: str  # fully-qualified, minimally-qualified, unqualified, component
    version: str  # "E1.0"
    name: str  # CLDR short name, "grinning face"
    group: str
    subgroup: str
    line: int


def parse_emoji_test(text: str, path: str = "emoji-test.txt") -> list[EmojiEntry]:
    """Every data line with its group and subgroup; :class:`DataError` names the file and line if malformed."""
    entries: list[EmojiEntry] = []
    group = subgroup = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("# group:"):
            group = line.partition(":")[2].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.partition(":")[2].strip()
        elif line and not line.startswith("#"):
            match = _LINE.match(line)
            if match is None:
                raise DataError(f"{path}:{number}: not an emoji-test.txt data line: {line[:80]!r}")
            if not group or not subgroup:
                raise DataError(f"{path}:{number}: data line before any '# group:'/'# subgroup:' line")
            codepoints = match.group("cps").upper()
            text_form = "".join(chr(int(cp, 16)) for cp in codepoints.split())
            entries.append(
                EmojiEntry(
                    text_form,
                    codepoints,
                    match.group("status"),
                    f"E{match.group('version')}",
                    match.group("name"),
                    group,
                    subgroup,
                    number,
                )
            )
    return entries


# ----------------------------------------------------------------------------------------------------------------
# The packaged table (emoji-test.txt compacted; scripts/build_emoji_table.py writes it)

EMOJI_TABLE_PATH = Path(__file__).with_name("emoji_table.json")
EMOJI_TABLE_FORMAT = "clipforge.emoji_table"
TABLE_STATUSES = {"f": "fully-qualified", "m": "minimally-qualified", "u": "unqualified", "c": "component"}


def emoji_table_document(entries: list[EmojiEntry], header: dict[str, Any]) -> str:
    """The table as JSON text, one row per line: ``[codepoints, status code, version, name, subgroup index]``
    with ``subgroups`` = ``[[group index, subgroup name], ...]`` and ``groups`` = names, in file order."""
    codes = {v: k for k, v in TABLE_STATUSES.items()}
    groups: list[str] = []
    subgroups: list[tuple[str, str]] = []
    rows = []
    for entry in entries:
        if entry.group not in groups:
            groups.append(entry.group)
        if (entry.group, entry.subgroup) not in subgroups:
            subgroups.append((entry.group, entry.subgroup))
        rows.append(
            [
                entry.codepoints,
                codes[entry.status],
                entry.version,
                entry.name,
                subgroups.index((entry.group, entry.subgroup)),
            ]
        )
    head = {
        "format": EMOJI_TABLE_FORMAT,
        "version": 1,
        **header,
        "columns": ["codepoints", "status", "emoji_version", "name", "subgroup"],
        "statuses": TABLE_STATUSES,
        "groups": groups,
    }

    def one_per_line(items: list[Any]) -> str:
        return "[\n" + ",\n".join("  " + json.dumps(item, ensure_ascii=False) for item in items) + "\n ]"

    lines = json.dumps(head, indent=1, ensure_ascii=False)[:-2]
    subgroup_rows = [[groups.index(g), name] for g, name in subgroups]
    return f'{lines},\n "subgroups": {one_per_line(subgroup_rows)},\n "rows": {one_per_line(rows)}\n}}\n'


def load_emoji_table(path: str | Path | None = None) -> tuple[list[EmojiEntry], dict[str, Any]]:
    """Entries of the packaged table (same as :func:`parse_emoji_test` on the file it came from) and its
    header (source, copyright, licence); :class:`DataError` names the file if it is malformed."""
    table_path = Path(path) if path is not None else EMOJI_TABLE_PATH
    try:
        data = json.loads(table_path.read_text(encoding="utf-8"))
        if data.get("format") != EMOJI_TABLE_FORMAT:
            raise ValueError(f"its format is not {EMOJI_TABLE_FORMAT!r}")
        groups, subgroups, statuses = data["groups"], data["subgroups"], data["statuses"]
        entries = []
        for number, (codepoints, status, version, name, subgroup) in enumerate(data["rows"], start=1):
            group_index, subgroup_name = subgroups[subgroup]
            text = "".join(chr(int(cp, 16)) for cp in codepoints.split())
            entries.append(
                EmojiEntry(
                    text,
                    codepoints,
                    statuses[status],
                    version,
                    name,
                    groups[group_index],
                    subgroup_name,
                    number,
                )
            )
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise DataError(
            f"{table_path}: not a readable emoji table ({exc}); regenerate it with scripts/build_emoji_table.py"
        ) from exc
    header = {
        k: v for k, v in data.items() if k not in ("rows", "groups", "subgroups", "statuses", "columns")
    }
    return entries, header


def emoji_entries(emoji_test: str | Path | None) -> tuple[list[EmojiEntry], dict[str, Any]]:
    """The emoji-test.txt entries from ``emoji_test``, or when it is ``None`` from unicode-data's file if
    installed, else from the packaged table; and where they came from (for build.json's notes)."""
    if emoji_test is None and DEFAULT_EMOJI_TEST.exists():
        emoji_test = DEFAULT_EMOJI_TEST
    if emoji_test is not None:
        path = Path(emoji_test)
        entries = parse_emoji_test(path.read_text(encoding="utf-8"), str(path))
        return entries, {"emoji_test": str(path)}
    entries, header = load_emoji_table()
    return entries, {
        "emoji_table": "clipforge/data/builders/emoji_table.json",
        "emoji_table_source": header.get("source"),
    }


def name_phrase(name: str) -> str:
    """A CLDR name as a noun phrase: ``"flag: France"`` -> ``"the flag of France"``, ``"keycap: 7"`` ->
    ``"the keycap 7"``, ``"thumbs up: medium skin tone"`` -> ``"thumbs up (medium skin tone)"``."""
    head, colon, tail = name.partition(":")
    if not colon:
        return name
    head, tail = head.strip(), tail.strip()
    if head == "flag":
        return f"the flag of {tail}"
    if head == "keycap":
        return f"the keycap {tail}"
    return f"{head} ({tail})"


def emoji_captions(name: str, source: str, templates: list[str]) -> tuple[str, ...]:
    phrase = name_phrase(name)
    noun_phrase = with_article(phrase)
    return unique([t.format(np=noun_phrase, name=phrase) for t in pick_templates(templates, source, 2)])


def subgroup_class(subgroup: str, names: Mapping[str, str]) -> str:
    return names.get(subgroup, subgroup.replace("-", " "))


def render(text: str, font: ImageFont.FreeTypeFont) -> Image.Image | None:
    """The emoji on white, cropped to its glyph box; ``None`` when the font draws it as several glyphs."""
    left, top, right, bottom = font.getbbox(text)
    width, height = right - left, bottom - top
    if width <= 0 or height <= 0 or width > 1.5 * height:
        return None
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((-left, -top), text, font=font, embedded_color=True)
    return to_rgb(canvas)


def load_font(path: str | Path, size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    """The emoji font with libraqm layout (needed to shape ZWJ sequences); :class:`DataError` without it."""
    if not features.check("raqm"):
        raise DataError(
            "emoji: this Pillow has no libraqm text layout, so ZWJ sequences, flags and skin tones would render "
            "as several glyphs; install a Pillow wheel from PyPI (they bundle libraqm) or the libraqm0 package"
        )
    try:
        return ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.RAQM)
    except OSError as exc:
        raise DataError(f"{path}: cannot open the emoji font at size {size} ({exc})") from exc


def collect(
    image_options: ImageOptions,
    *,
    emoji_test: str | Path | None = None,
    font: str | Path = DEFAULT_FONT,
    font_size: int = FONT_SIZE,
    skin_tones: bool = True,
    rules: str | Path | None = None,
    progress: bool = True,
) -> Collected:
    """Every fully-qualified emoji rendered as a thumbnail, labelled by CLDR group and subgroup.

    ``emoji_test=None``: unicode-data's ``emoji-test.txt`` if installed, else the packaged table made from it
    (:func:`load_emoji_table`, Emoji 15.0), so only the font package is needed.
    """
    font = Path(font)
    needed = [(font, PACKAGES[0])]
    if emoji_test is not None:
        needed.append((Path(emoji_test), PACKAGES[1]))
    require_files(NAME, needed, "font=/emoji_test= (--root)")
    names = load_rules(NAME, rules, required=("groups", "subgroups", "caption_templates"))
    entries, entries_from = emoji_entries(emoji_test)
    face = load_font(font, font_size)
    dropped: Counter[str] = Counter()
    candidates: list[Candidate] = []
    for entry in tqdm(entries, desc=NAME, unit="emoji", disable=not progress, dynamic_ncols=True):
        if entry.status != "fully-qualified":
            dropped[f"status:{entry.status}"] += 1
            continue
        if not skin_tones and any(ord(ch) in SKIN_TONES for ch in entry.text):
            dropped["skin_tone_variant"] += 1
            continue
        image = render(entry.text, face)
        if image is None:
            dropped["not_one_glyph"] += 1
            continue
        if image.getextrema() == ((255, 255),) * 3:
            dropped["render_empty"] += 1
            continue
        candidates.append(_candidate(entry, image_options.thumbnail(image), names))
    return Collected(
        candidates=candidates,
        dropped=dropped,
        label_fields=(PRIMARY_LABEL, SUBGROUP_LABEL),
        packages=PACKAGES,
        licence={
            "licence": LICENCE,
            "copyright_files": {k: str(v) for k, v in COPYRIGHT_FILES.items()},
            "copyright_excerpts": {k: read_text_head(v, 20) for k, v in COPYRIGHT_FILES.items()},
        },
        notes={
            **entries_from,
            "font": str(font),
            "font_size": font_size,
            "layout_engine": "raqm",
            "raqm_version": features.version("raqm"),
            "skin_tones": skin_tones,
        },
    )


def _candidate(entry: EmojiEntry, thumbnail: bytes, names: dict[str, Any]) -> Candidate:
    """One emoji (its encoded thumbnail) as a candidate: captions from its CLDR name, group and subgroup classes."""
    source = f"emoji/{entry.codepoints.replace(' ', '_')}"
    extra: dict[str, Any] = {
        "package": PACKAGES[0],
        "licence": "Apache-2.0",
        "emoji": entry.text,
        "codepoints": entry.codepoints,
        "cldr_name": entry.name,
        "cldr_group": entry.group,
        "cldr_subgroup": entry.subgroup,
        "emoji_version": entry.version,
    }
    return Candidate(
        source=source,
        image=thumbnail,
        captions=emoji_captions(entry.name, source, list(names["caption_templates"])),
        classes=(
            names["groups"].get(entry.group, entry.group),
            subgroup_class(entry.subgroup, names["subgroups"]),
        ),
        extra=extra,
    )
