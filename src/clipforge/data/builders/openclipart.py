"""openclipart (Debian ``openclipart-png`` + ``openclipart-svg``, public domain): PNG renderings paired by path
with their SVGs, captions from each SVG's RDF metadata (dc:title, dc:description, dc:subject), classes from
folders, and the noise rules of ``rules.json`` (section ``openclipart``), each drop counted by rule.

Checks run in this order; a dropped file is counted once, under the first that matches:
``symlink_duplicate`` (a symlink to a file kept at its own path), ``no_png`` (an SVG without a PNG rendering),
``no_svg_metadata``, ``folder:<rule>``, ``svg_unparsable``, ``licence:<rule>``, ``title:<rule>`` (template,
raw-title, then normalised-title rules), ``no_class`` (no listed ancestor folder), ``image:<reason>`` (from
:func:`clipforge.images.load_image`, e.g. ``too_large`` over ``max_pixels``; ``too_small`` below
``min_image_side``), then ``duplicate_image`` (same PNG bytes as a file earlier by path).
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ftfy
from PIL import Image
from tqdm import tqdm

from clipforge.data.builders.captions import pick_templates, unique, with_article
from clipforge.data.builders.core import PRIMARY_LABEL, Candidate, Collected, ImageOptions
from clipforge.data.builders.environment import RULES_PATH, load_rules, read_text_head, require_files
from clipforge.data.raw import DataError
from clipforge.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

NAME = "openclipart"
DEFAULT_PNG_ROOT = Path("/usr/share/openclipart/png")
DEFAULT_SVG_ROOT = Path("/usr/share/openclipart/svg")
PACKAGES = ("openclipart-png", "openclipart-svg")
COPYRIGHT_FILE = Path("/usr/share/doc/openclipart-svg/copyright")
LICENCE = "public domain (Creative Commons public-domain dedication; Debian package openclipart-svg/-png)"

RULE_FIELDS = (
    "folder_rules",
    "licence_rule",
    "template_title",
    "title_rules",
    "normalized_title_rules",
    "description_ignore",
    "keyword_ignore",
    "max_keywords",
    "min_image_side",
    "classes",
    "caption_templates",
)
_DC = "{http://purl.org/dc/elements/1.1/}"
_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"


# ----------------------------------------------------------------------------------------------------------------
# SVG metadata


@dataclass(frozen=True)
class SvgMetadata:
    """The RDF work description of one SVG (raw strings; empty when absent)."""

    title: str = ""
    description: str = ""
    keywords: tuple[str, ...] = ()
    creator: str = ""
    licence: str = ""


def read_svg_metadata(path: str | Path) -> SvgMetadata:
    """The first ``cc:Work`` of an SVG's metadata; raises ``ValueError`` if the file is not parsable XML."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot parse the SVG ({exc})") from exc
    work = next((e for e in root.iter() if isinstance(e.tag, str) and e.tag.endswith("}Work")), None)
    if work is None:
        return SvgMetadata()

    def text(name: str) -> str:
        element = work.find(_DC + name)
        return (element.text or "") if element is not None else ""

    subject = work.find(_DC + "subject")
    keywords = tuple((li.text or "") for li in subject.iter(_RDF + "li")) if subject is not None else ()
    creator = work.find(f"{_DC}creator//{_DC}title")
    licence = next((e for e in work if isinstance(e.tag, str) and e.tag.endswith("}license")), None)
    return SvgMetadata(
        title=text("title"),
        description=text("description"),
        keywords=keywords,
        creator=(creator.text or "") if creator is not None else "",
        licence=(licence.get(_RDF + "resource") or "") if licence is not None else "",
    )


# ----------------------------------------------------------------------------------------------------------------
# Rules


def _full(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE | re.DOTALL)


def clean_text(raw: str) -> str:
    """Undo HTML escaping (twice: some titles are double-escaped) and mojibake; collapse whitespace."""
    return " ".join(ftfy.fix_text(html.unescape(html.unescape(raw))).split())


def normalize_title(title: str) -> str:
    """A title as a caption phrase: ``"Pop_Can (B and W) 01"`` -> ``"pop can (black and white)"``.

    File-name-style titles (no spaces) get hyphens and camelCase split into words and lose trailing numbers;
    underscores become spaces everywhere; trailing zero-padded numbers ("01") are removed (a plain "5" may
    mean something: "signal flag 5"); the result is lower-cased.
    """
    text = clean_text(title)
    file_name_style = " " not in text
    if file_name_style:
        text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text.replace("-", " "))
    text = text.replace("_", " ")
    text = re.sub(r"\(\s*b\s*(and|&)\s*w\s*\)|\bb&w\b|\bbw\b", "(black and white)", text, flags=re.IGNORECASE)
    trailing = r"(\s+\d+)+\s*$" if file_name_style else r"(\s+0\d+)+\s*$"
    text = re.sub(trailing, "", " ".join(text.split()))
    return text.strip(" .,;:").lower()


@dataclass(frozen=True)
class Rule:
    rule: str
    pattern: re.Pattern[str]
    reason: str


class OpenclipartRules:
    """The ``openclipart`` section of ``rules.json``, compiled; every check returns a rule name or ``None``."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = dict(data)
        self.folder_rules = [
            (r["rule"], tuple(f.strip("/") for f in r["folders"]), r["reason"]) for r in data["folder_rules"]
        ]
        licence = data["licence_rule"]
        self.licence_rule = Rule(licence["rule"], _full(licence["allowed"]), licence["reason"])
        template = data["template_title"]
        self.template = Rule(template["rule"], _full(template["pattern"]), template["reason"])
        self.title_rules = [Rule(r["rule"], _full(r["pattern"]), r["reason"]) for r in data["title_rules"]]
        self.normalized_rules = [
            Rule(r["rule"], _full(r["pattern"]), r["reason"]) for r in data["normalized_title_rules"]
        ]
        self.description_ignore = [_full(p) for p in data["description_ignore"]]
        self.keyword_ignore = [_full(p) for p in data["keyword_ignore"]]
        self.classes: dict[str, str] = {k.strip("/"): v for k, v in data["classes"].items()}
        self.max_keywords = int(data["max_keywords"])
        self.min_image_side = int(data["min_image_side"])
        self.templates: list[str] = list(data["caption_templates"])

    def folder_rule(self, folder: str) -> str | None:
        for rule, folders, _ in self.folder_rules:
            if any(folder == f or folder.startswith(f + "/") for f in folders):
                return rule
        return None

    def licence_ok(self, licence: str) -> bool:
        return self.licence_rule.pattern.search(licence.strip()) is not None

    def title(self, raw: str, file_stem: str) -> tuple[str | None, str]:
        """``(rule that drops it or None, normalised title)``."""
        text = clean_text(raw)
        template = self.template.pattern.fullmatch(text)
        if template is not None:
            name = template.group("name").strip()
            if _file_name_key(name) != _file_name_key(file_stem):
                return self.template.rule, ""
            text = name
        for rule in self.title_rules:
            if rule.pattern.fullmatch(text):
                return rule.rule, ""
        normalized = normalize_title(text)
        for rule in self.normalized_rules:
            if rule.pattern.fullmatch(normalized):
                return rule.rule, normalized
        return None, normalized

    def class_of(self, folder: str) -> str | None:
        """The class of the nearest listed ancestor folder (the folder itself first)."""
        parts = folder.split("/") if folder else []
        for end in range(len(parts), 0, -1):
            name = self.classes.get("/".join(parts[:end]))
            if name is not None:
                return name
        return None

    def keywords(self, raw: tuple[str, ...], title: str) -> list[str]:
        """Cleaned keywords: split on commas, underscores read as spaces, ignored ones and title words removed."""
        title_words = set(title.split())
        kept: list[str] = []
        for item in raw:
            for piece in clean_text(item).split(","):
                raw_keyword = piece.strip().lower()
                keyword = raw_keyword.replace("_", " ")
                if any(p.fullmatch(raw_keyword) or p.fullmatch(keyword) for p in self.keyword_ignore):
                    continue
                if set(keyword.split()) <= title_words or keyword in kept:
                    continue
                kept.append(keyword)
        return kept[: self.max_keywords]

    def description(self, raw: str, title: str) -> str:
        text = clean_text(raw)
        if any(p.fullmatch(text) for p in self.description_ignore):
            return ""
        if normalize_title(text).replace(" ", "") == title.replace(" ", ""):
            return ""
        return text


def _file_name_key(name: str) -> str:
    return re.sub(r"[\s\-_]+", "_", name.strip().lower())


def captions_for(
    title: str, keywords: list[str], description: str, source: str, templates: list[str]
) -> tuple[str, ...]:
    """Two templated sentences (chosen by the source's hash), the title + keywords line, the description."""
    phrase = with_article(title)
    sentences = [t.format(np=phrase) for t in pick_templates(templates, source, 2)]
    keyword_line = ", ".join([title, *keywords]) if keywords else ""
    return unique([*sentences, keyword_line, description])


# ----------------------------------------------------------------------------------------------------------------
# Collect


def _walk(root: Path, suffix: str) -> dict[str, bool]:
    """``{relative stem: is_symlink}`` for files ending in ``suffix`` under ``root``."""
    found: dict[str, bool] = {}
    for directory, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(suffix):
                path = Path(directory) / name
                found[path.relative_to(root).as_posix()[: -len(suffix)]] = path.is_symlink()
    return found


def collect(
    image_options: ImageOptions,
    *,
    png_root: str | Path = DEFAULT_PNG_ROOT,
    svg_root: str | Path = DEFAULT_SVG_ROOT,
    rules: str | Path | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> Collected:
    """Every PNG with its SVG's metadata that passes the rules, as thumbnails; drops counted by rule."""
    png_root, svg_root = Path(png_root), Path(svg_root)
    require_files(NAME, [(png_root, PACKAGES[0]), (svg_root, PACKAGES[1])], "png_root=/svg_root= (--root)")
    data = load_rules(NAME, rules, required=RULE_FIELDS)
    try:
        compiled = OpenclipartRules(data)
    except (KeyError, TypeError, ValueError, re.error) as exc:
        raise DataError(
            f"{rules or RULES_PATH}: a malformed rule in the 'openclipart' section ({type(exc).__name__}: {exc}); "
            "each rule needs 'rule', 'reason' and 'folders' or a valid 'pattern'"
        ) from exc
    pngs, svgs = _walk(png_root, ".png"), _walk(svg_root, ".svg")
    dropped: Counter[str] = Counter()
    candidates: list[Candidate] = []
    stems = sorted(set(pngs) | set(svgs))
    for stem in tqdm(stems, desc=NAME, unit="file", disable=not progress, dynamic_ncols=True):
        outcome = _one(stem, pngs, svgs, png_root, svg_root, compiled, image_options, max_pixels)
        if isinstance(outcome, str):
            dropped[outcome] += 1
        else:
            candidates.append(outcome)
    rules_path = Path(rules) if rules is not None else None
    return Collected(
        candidates=candidates,
        dropped=dropped,
        label_fields=(PRIMARY_LABEL,),
        packages=PACKAGES,
        licence={
            "licence": LICENCE,
            "copyright_file": str(COPYRIGHT_FILE),
            "copyright_excerpt": read_text_head(COPYRIGHT_FILE, 12),
        },
        notes={
            "roots": {"png": str(png_root), "svg": str(svg_root)},
            "rules": str(rules_path or "clipforge/data/builders/rules.json#openclipart"),
            "max_pixels": max_pixels,
            "svg_files": len(svgs),
            "png_files": len(pngs),
        },
    )


def _one(
    stem: str,
    pngs: Mapping[str, bool],
    svgs: Mapping[str, bool],
    png_root: Path,
    svg_root: Path,
    rules: OpenclipartRules,
    image_options: ImageOptions,
    max_pixels: int | None,
) -> Candidate | str:
    """A candidate, or the drop reason."""
    if stem not in pngs:
        return "symlink_duplicate" if svgs[stem] else "no_png"
    if pngs[stem]:
        return "symlink_duplicate"
    if stem not in svgs:
        return "no_svg_metadata"
    folder, _, file_stem = stem.rpartition("/")
    folder_rule = rules.folder_rule(folder)
    if folder_rule is not None:
        return f"folder:{folder_rule}"
    svg_path = svg_root / f"{stem}.svg"
    try:
        meta = read_svg_metadata(svg_path)
    except ValueError:
        return "svg_unparsable"
    if not rules.licence_ok(meta.licence):
        return f"licence:{rules.licence_rule.rule}"
    title_rule, title = rules.title(meta.title, file_stem)
    if title_rule is not None:
        return f"title:{title_rule}"
    class_name = rules.class_of(folder)
    if class_name is None:
        return "no_class"
    png_path = png_root / f"{stem}.png"
    try:
        data = png_path.read_bytes()
        with warnings.catch_warnings():  # Pillow warns before load_image refuses it: the refusal is counted
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = load_image(data, name=str(png_path), max_pixels=max_pixels)
    except ImageLoadError as exc:
        return f"image:{exc.reason}"
    except OSError:
        return "image:unreadable"
    if min(image.size) < rules.min_image_side:
        return "image:too_small"
    source = f"{stem}.png"
    keywords = rules.keywords(meta.keywords, title)
    description = rules.description(meta.description, title)
    extra = {
        "package": PACKAGES[0],
        "licence": "public domain",
        "svg": f"{stem}.svg",
        "folder": folder,
        "title": meta.title,
        "description": meta.description,
        "keywords": list(meta.keywords),
        "creator": meta.creator,
        "svg_licence": meta.licence,
        "original_size": list(image.size),
    }
    return Candidate(
        source=source,
        image=image_options.thumbnail(image),
        captions=captions_for(title, keywords, description, source, rules.templates),
        classes=(class_name,),
        extra=extra,
        content_id=hashlib.sha256(data).hexdigest(),
    )
