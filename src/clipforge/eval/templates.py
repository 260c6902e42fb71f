"""Prompt templates and class names as data: the paper's per-dataset template sets (``templates/*.json``), the
polysemy overrides (``templates/overrides.json``), user template files, and :func:`resolve_classnames`.

A template holds one placeholder, ``{}`` or ``{c}``, replaced by the class name ("a photo of a {}."). A class may
have several names (FER-2013's "happy"/"smiling"); its prompts are every template with every name.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

_PLACEHOLDERS = ("{}", "{c}")
_OVERRIDES_FILE = "overrides.json"
_DEFAULT_TEMPLATE = "a photo of a {}."

ClassName = str | tuple[str, ...]  # one name, or several synonyms whose prompts are averaged together


class TemplateError(ValueError):
    """A template set or class-name file is missing or malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class TemplateSet:
    """Templates for one dataset, and its class names where the source gives them.

    ``class_ids`` (ImageNet's WordNet ids) run parallel to ``classnames``, so raw ids resolve to names.
    """

    name: str
    templates: tuple[str, ...]
    classnames: tuple[ClassName, ...] | None = None
    class_ids: tuple[str, ...] | None = None
    source: str = ""
    title: str = ""


@dataclass(frozen=True)
class ClassnameChange:
    """One class whose name :func:`resolve_classnames` changed, and why."""

    index: int
    raw: str
    name: ClassName
    reason: str


@dataclass(frozen=True)
class ResolvedClassnames:
    """Class names ready for prompts, the changes made to the raw ones, and any names shared by several classes
    (zero-shot cannot tell such classes apart: their prompts are identical)."""

    names: tuple[ClassName, ...]
    changes: tuple[ClassnameChange, ...] = ()
    duplicates: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "changed": [
                {"index": c.index, "raw": c.raw, "name": c.name, "reason": c.reason} for c in self.changes
            ],
            "duplicates": self.duplicates,
        }


def format_template(template: str, classname: str) -> str:
    """``template`` with its ``{}`` / ``{c}`` placeholder(s) replaced by ``classname`` (no other braces are
    interpreted, so templates may contain literal ``{`` and ``}``)."""
    for placeholder in _PLACEHOLDERS:
        template = template.replace(placeholder, classname)
    return template


def check_templates(templates: Sequence[str], where: str = "templates") -> tuple[str, ...]:
    """The templates as a tuple; :class:`TemplateError` if there are none or one lacks a placeholder."""
    if isinstance(templates, str):
        raise TemplateError(f"{where}: expected a list of templates, got one string {templates!r}")
    checked = tuple(templates)
    if not checked:
        raise TemplateError(f"{where}: no templates; give at least one, e.g. {_DEFAULT_TEMPLATE!r}")
    for index, template in enumerate(checked):
        if not isinstance(template, str):
            raise TemplateError(f"{where}: template {index} is a {type(template).__name__}, not a string")
        if not any(p in template for p in _PLACEHOLDERS):
            raise TemplateError(
                f"{where}: template {index} ({template!r}) has no '{{}}' or '{{c}}' placeholder for the class name"
            )
    return checked


def _normalize(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _data_dir() -> Any:
    return resources.files("clipforge.eval") / "templates"


@functools.lru_cache(maxsize=1)
def _builtin_index() -> dict[str, str]:
    """Normalised name -> file stem of every built-in set (so "Oxford_Pets" finds "oxford-pets")."""
    stems = sorted(
        p.name[: -len(".json")]
        for p in _data_dir().iterdir()
        if p.name.endswith(".json") and p.name != _OVERRIDES_FILE
    )
    return {_normalize(stem): stem for stem in stems}


def list_template_sets() -> list[str]:
    """Names of the built-in template sets (the paper's prompt sets, plus ``generic``)."""
    return sorted(_builtin_index().values())


def get_templates(name_or_path: str | Path) -> TemplateSet:
    """A built-in template set by name (case and punctuation ignored), or a user file.

    A user file is ``.txt`` (one template per line; blank lines and lines starting with ``#`` skipped) or
    ``.json`` (a list of templates, or an object with ``templates`` and optionally ``classnames``).
    """
    text = str(name_or_path)
    stem = _builtin_index().get(_normalize(text))
    path = Path(text).expanduser()
    if stem is not None and not path.is_file():
        return _builtin(stem)
    if path.suffix.lower() in (".txt", ".json") or path.exists():
        return _read_user_file(path)
    raise TemplateError(
        f"{text!r} is neither a built-in template set nor a file; built-in sets: {', '.join(list_template_sets())}"
        " (or pass a .txt file with one template per line, or a .json list)"
    )


@functools.lru_cache(maxsize=64)
def _builtin(stem: str) -> TemplateSet:
    data = json.loads((_data_dir() / f"{stem}.json").read_text(encoding="utf-8"))
    return _template_set(data, f"built-in template set {stem!r}", default_name=stem)


def _read_user_file(path: Path) -> TemplateSet:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TemplateError(f"{path}: template file not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"{path}: cannot read the template file ({exc}); save it as UTF-8 text") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TemplateError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, list):
            data = {"templates": data}
        if not isinstance(data, dict):
            raise TemplateError(f"{path}: expected a JSON list of templates or an object with 'templates'")
        return _template_set(data, str(path), default_name=path.stem, source=str(path))
    lines = [line.strip() for line in text.splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    return TemplateSet(path.stem, check_templates(templates, str(path)), source=str(path), title=path.stem)


def _template_set(data: dict[str, Any], where: str, default_name: str, source: str = "") -> TemplateSet:
    if "templates" not in data:
        raise TemplateError(f"{where}: no 'templates' field; the keys are {sorted(data)}")
    templates = check_templates(data["templates"], where)
    classnames = data.get("classnames")
    names = None
    if classnames is not None:
        names = tuple(_class_name(entry, where, index) for index, entry in enumerate(classnames))
    ids = data.get("class_ids")
    if ids is not None and (names is None or len(ids) != len(names)):
        raise TemplateError(f"{where}: 'class_ids' must run parallel to 'classnames'")
    return TemplateSet(
        name=str(data.get("name", default_name)),
        templates=templates,
        classnames=names,
        class_ids=tuple(ids) if ids is not None else None,
        source=str(data.get("source", source)),
        title=str(data.get("title", default_name)),
    )


def _class_name(entry: Any, where: str, index: int) -> ClassName:
    if isinstance(entry, str) and entry.strip():
        return entry
    if isinstance(entry, list) and entry and all(isinstance(e, str) and e.strip() for e in entry):
        return entry[0] if len(entry) == 1 else tuple(entry)
    raise TemplateError(
        f"{where}: class {index} must be a non-empty string or list of strings, got {entry!r}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Class names


@functools.lru_cache(maxsize=1)
def _overrides() -> dict[str, dict[str, dict[str, dict[str, str]]]]:
    data = json.loads((_data_dir() / _OVERRIDES_FILE).read_text(encoding="utf-8"))
    return {_normalize(k): v for k, v in data.items() if not k.startswith("_")}


def classname_overrides(dataset_name: str) -> dict[str, dict[str, dict[str, str]]]:
    """The overrides for one dataset: ``{"by_id": {raw_id: {"name", "why"}}, "by_name": {...}}`` (may be empty)."""
    return _overrides().get(_normalize(dataset_name), {})


def resolve_classnames(dataset_name: str | None, raw_names: Sequence[ClassName]) -> ResolvedClassnames:
    """Turn raw class names or ids (folder names, WordNet ids, ``classes.json`` entries) into prompt names.

    For each raw name, in this order: an override for ``dataset_name`` keyed by id, then by name (polysemy fixes
    such as ImageNet's two "crane"s); then the dataset's class-id table (ImageNet WordNet id -> the paper's
    name); otherwise underscores become spaces ("golden_retriever" -> "golden retriever"). Every change is
    recorded with its reason, and names that end up shared by several classes are listed in ``duplicates``.
    Entries that are already synonym tuples are kept as they are.
    """
    overrides = classname_overrides(dataset_name) if dataset_name else {}
    by_id, by_name = overrides.get("by_id", {}), overrides.get("by_name", {})
    id_table: dict[str, ClassName] = {}
    if dataset_name and _normalize(dataset_name) in _builtin_index():
        template_set = _builtin(_builtin_index()[_normalize(dataset_name)])
        if template_set.class_ids is not None and template_set.classnames is not None:
            id_table = dict(zip(template_set.class_ids, template_set.classnames))
    names: list[ClassName] = []
    changes: list[ClassnameChange] = []
    for index, raw in enumerate(raw_names):
        if not isinstance(raw, str):
            names.append(tuple(raw))
            continue
        key = raw.strip()
        name: ClassName = key
        reason = ""
        if key in by_id:
            name, reason = by_id[key]["name"], f"override by id: {by_id[key]['why']}"
        elif key in by_name:
            name, reason = by_name[key]["name"], f"override by name: {by_name[key]['why']}"
        elif key in id_table:
            name, reason = id_table[key], f"class id looked up in the {dataset_name} class table"
        elif "_" in key and key.replace("_", " ").strip():
            name, reason = " ".join(key.replace("_", " ").split()), "underscores read as spaces"
        if not name:
            raise TemplateError(f"class {index} has an empty name; every class needs a name for its prompts")
        names.append(name)
        if name != raw:
            changes.append(ClassnameChange(index, raw, name, reason or "surrounding whitespace removed"))
    seen: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        seen.setdefault(name if isinstance(name, str) else " / ".join(name), []).append(index)
    duplicates = {name: indices for name, indices in seen.items() if len(indices) > 1}
    return ResolvedClassnames(tuple(names), tuple(changes), duplicates)
