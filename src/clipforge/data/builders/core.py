"""What every dataset builder shares: the candidate record, thumbnails, deterministic stratified splits with
optional held-out classes, and the writer of the on-disk layout (package checks and rules:
:mod:`clipforge.data.builders.environment`).

Layout written by :func:`write_dataset` (other code reads exactly this)::

    OUT/train/shard-000000.tar ... + manifest.json      (also val/, test/, and test_heldout/ when classes are
    OUT/classes.json   {"label": [names by index], ...}  held out)
    OUT/build.json     counts, drop reasons, per-class counts, package versions (Debian and Python),
                       licences, options

Each sample is ``key.png`` (or ``.jpg``), ``key.txt`` (first caption) and ``key.json`` = ``{"captions": [...],
"label": int, "class": str, ...}`` plus the builder's extra fields. ``build.json`` is written last: a folder
without it is an interrupted build.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from clipforge.data.builders.environment import package_versions, python_package_versions
from clipforge.data.raw import DataError
from clipforge.data.shards import MANIFEST_NAME, ShardWriter
from clipforge.files import atomic_path

SPLITS = ("train", "val", "test")
HELDOUT_SPLIT = "test_heldout"
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
BUILD_INFO_NAME = "build.json"
CLASSES_NAME = "classes.json"
_LAYOUT_ENTRIES = (*SPLITS, HELDOUT_SPLIT, CLASSES_NAME, BUILD_INFO_NAME)
_RESAMPLE = {"bicubic": Image.BICUBIC, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


# ----------------------------------------------------------------------------------------------------------------
# Candidates and thumbnails


@dataclass(frozen=True)
class LabelField:
    """A label field of the sample json: ``field`` holds the class index, ``name_field`` the class name."""

    field: str  # e.g. "label", "subgroup_label"
    name_field: str  # e.g. "class", "subgroup"


PRIMARY_LABEL = LabelField("label", "class")


@dataclass(frozen=True)
class Candidate:
    """One sample a builder kept: encoded thumbnail, captions, one class name per label field, extra json."""

    source: str  # stable relative source path: seeds the split and the sample key
    image: bytes
    captions: tuple[str, ...]
    classes: tuple[str, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)
    content_id: str | None = None  # e.g. sha256 of the source file: later duplicates are dropped


@dataclass
class Collected:
    """What a builder's ``collect`` returns: kept candidates, drop counts by reason, and provenance."""

    candidates: list[Candidate]
    dropped: Counter[str]
    label_fields: tuple[LabelField, ...]
    packages: tuple[str, ...]
    licence: Mapping[str, Any]
    class_order: Mapping[str, Sequence[str]] = field(default_factory=dict)  # default: sorted by name
    notes: dict[str, Any] = field(default_factory=dict)
    python_packages: tuple[str, ...] = ()  # PyPI distributions read (versions go into build.json)


@dataclass(frozen=True)
class ImageOptions:
    """Thumbnails: every image becomes a ``size`` x ``size`` square (fitted, then padded with white)."""

    size: int = 224
    image_format: str = "png"  # "png" or "jpeg"
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"image size must be at least 8 pixels, got {self.size}")
        if self.image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format must be 'png' or 'jpeg', got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")

    @property
    def ext(self) -> str:
        return "png" if self.image_format == "png" else "jpg"

    def square(self, image: Image.Image, resample: str = "bicubic") -> Image.Image:
        """Fit an RGB image inside the square (aspect kept, upscaled too) and centre it on white."""
        width, height = image.size
        scale = self.size / max(width, height)
        fitted = (max(1, round(width * scale)), max(1, round(height * scale)))
        if fitted != image.size:
            image = image.resize(fitted, _RESAMPLE[resample])
        if fitted == (self.size, self.size):
            return image
        canvas = Image.new("RGB", (self.size, self.size), (255, 255, 255))
        canvas.paste(image, ((self.size - fitted[0]) // 2, (self.size - fitted[1]) // 2))
        return canvas

    def encode(self, image: Image.Image) -> bytes:
        """Encode an RGB image deterministically (PNG optimised, or baseline JPEG at ``jpeg_quality``)."""
        buffer = io.BytesIO()
        if self.image_format == "png":
            image.save(buffer, format="PNG", optimize=True)
        else:
            image.save(buffer, format="JPEG", quality=self.jpeg_quality)
        return buffer.getvalue()

    def thumbnail(self, image: Image.Image, resample: str = "bicubic") -> bytes:
        return self.encode(self.square(image, resample))


# ----------------------------------------------------------------------------------------------------------------
# Splits


@dataclass(frozen=True)
class SplitOptions:
    """How samples are split: fractions of (train, val, test), seed, and classes held out of all three.

    Held-out classes (of ``heldout_field``) go whole to the ``test_heldout`` split. Either
    ``heldout_classes``: a number N (spread evenly by :func:`choose_heldout_classes` over the classes with at
    least ``heldout_min_count`` samples) or a list of class names; or ``heldout_every``: K, every K-th of
    those eligible classes sorted by name (the K-th, 2K-th, ...).

    ``heldout_min_mentions`` M > 0 makes a class eligible only if its name is *mentioned* (:func:`mentions`)
    in the captions of at least M samples of other classes: zero-shot on a held-out class then tests what
    the paper's zero-shot tests — a concept known only from the language of other images — rather than a
    word the training text never contains (which no model can classify by its name).
    ``heldout_mention_texts`` adds caption texts of other data trained alongside (one string per sample) to
    that count, described by ``heldout_mention_note`` in the recorded rule.
    """

    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    seed: int = 0
    heldout_classes: int | Sequence[str] | None = None
    heldout_every: int | None = None
    heldout_field: str = "label"
    heldout_min_count: int = 10
    heldout_max_count: int = 0  # > 0: larger classes stay in training (and do not dominate the held-out set)
    heldout_min_mentions: int = 0
    heldout_mention_texts: tuple[str, ...] = ()
    heldout_mention_note: str = ""

    def __post_init__(self) -> None:
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions):
            raise ValueError(
                f"fractions must be three non-negative numbers (train, val, test), got {self.fractions}"
            )
        if not math.isclose(sum(self.fractions), 1.0, abs_tol=1e-6):
            raise ValueError(f"fractions must sum to 1, got {self.fractions} (sum {sum(self.fractions)})")
        if self.heldout_classes is not None and self.heldout_every is not None:
            raise ValueError("give heldout_classes or heldout_every, not both")
        if self.heldout_every is not None and self.heldout_every < 2:
            raise ValueError(f"heldout_every must be at least 2 (every K-th class), got {self.heldout_every}")


def split_key(source: str, seed: int) -> str:
    """The sort key of a sample within its class: sha256 of ``"{seed}:{source}"`` (hex)."""
    return hashlib.sha256(f"{seed}:{source}".encode()).hexdigest()


def split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """(train, val, test) counts for a class of ``n``: val and test rounded half up, train gets the rest."""
    n_val = math.floor(n * fractions[1] + 0.5)
    n_test = math.floor(n * fractions[2] + 0.5)
    while n_val + n_test > n:  # only possible for tiny n with large val/test fractions
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test


def _mention_pattern(name: str) -> re.Pattern[str]:
    return re.compile(r"\b" + r"\s+".join(re.escape(w) for w in name.lower().split()) + r"(?:s|es)?\b")


def mentions(name: str, text: str) -> bool:
    """Whether class ``name`` occurs in ``text`` as whole words (case-insensitive; plural ``s``/``es`` allowed).

    >>> mentions("heart", "Two Hearts, love"), mentions("map", "a mapping tool")
    (True, False)
    """
    return _mention_pattern(name).search(text.lower()) is not None


def mention_counts(
    candidates: Sequence[Candidate], index: int, extra_texts: Sequence[str] = ()
) -> dict[str, int]:
    """Per class (of label field ``index``): how many samples of *other* classes mention its name in a caption,
    plus how many of ``extra_texts`` (captions of other data, one string per sample) do."""
    names = sorted({c.classes[index] for c in candidates})
    patterns = {name: _mention_pattern(name) for name in names}
    counts = dict.fromkeys(names, 0)
    texts = [("\n".join(c.captions).lower(), c.classes[index]) for c in candidates]
    texts += [(text.lower(), None) for text in extra_texts]
    for text, own in texts:
        for name, pattern in patterns.items():
            if name != own and pattern.search(text):
                counts[name] += 1
    return counts


def choose_heldout_classes(counts: Mapping[str, int], n: int, min_count: int) -> list[str]:
    """``n`` classes spread evenly over the eligible ones (count >= ``min_count``) sorted by name.

    With E eligible classes, picks the ones at positions ``floor((i + 0.5) * E / n)`` for i in 0..n-1 (for
    E = 5n: every 5th class, starting at the 3rd). Raises ``ValueError`` if fewer than ``n`` are eligible, or
    if nothing would be left to train on.
    """
    eligible = sorted(name for name, count in counts.items() if count >= min_count)
    if n <= 0:
        return []
    if n > len(eligible):
        raise ValueError(
            f"cannot hold out {n} classes: only {len(eligible)} classes have at least {min_count} samples; "
            "ask for fewer, or lower heldout_min_count"
        )
    if n >= len(counts):
        raise ValueError(f"cannot hold out {n} of {len(counts)} classes: no class would be left for training")
    return [eligible[math.floor((i + 0.5) * len(eligible) / n)] for i in range(n)]


def assign_splits(
    candidates: Sequence[Candidate], label_fields: Sequence[LabelField], options: SplitOptions
) -> tuple[dict[str, str], list[str]]:
    """Split name per candidate source, and the held-out class names (of ``options.heldout_field``).

    Stratified by the primary class: within each class, samples are ordered by :func:`split_key` and the first
    ``n_train`` go to train, the next ``n_val`` to val, the rest to test (:func:`split_counts`). Adding a file
    to a class therefore moves at most one other sample of that class across each split boundary.
    """
    field_names = [f.field for f in label_fields]
    heldout: list[str] = []
    heldout_index = None
    if options.heldout_classes is not None or options.heldout_every is not None:
        if options.heldout_field not in field_names:
            raise ValueError(
                f"heldout_field {options.heldout_field!r} is not one of this builder's {field_names}"
            )
        heldout_index = field_names.index(options.heldout_field)
        counts = Counter(c.classes[heldout_index] for c in candidates)
        if not isinstance(
            options.heldout_classes, (list, tuple)
        ):  # classes named explicitly are not filtered
            mentioned = (
                mention_counts(candidates, heldout_index, options.heldout_mention_texts)
                if options.heldout_min_mentions > 0
                else {}
            )
            too_big = options.heldout_max_count > 0
            # an ineligible class gets count -1: below any heldout_min_count
            counts = Counter(
                {
                    k: -1
                    if (too_big and v > options.heldout_max_count)
                    or mentioned.get(k, options.heldout_min_mentions) < options.heldout_min_mentions
                    else v
                    for k, v in counts.items()
                }
            )
        if options.heldout_every is not None:
            eligible = sorted(name for name, count in counts.items() if count >= options.heldout_min_count)
            heldout = eligible[options.heldout_every - 1 :: options.heldout_every]
            if not heldout:
                raise ValueError(
                    f"heldout_every={options.heldout_every} selects no class: only {len(eligible)} classes of "
                    f"{options.heldout_field!r} have at least {options.heldout_min_count} samples"
                )
        elif isinstance(options.heldout_classes, int):
            heldout = choose_heldout_classes(counts, options.heldout_classes, options.heldout_min_count)
        else:
            heldout = sorted(set(options.heldout_classes))
            unknown = [name for name in heldout if name not in counts]
            if unknown:
                raise ValueError(f"held-out classes {unknown} do not exist; the classes are {sorted(counts)}")
    heldout_set = set(heldout)
    strata: dict[str, list[Candidate]] = defaultdict(list)
    assignment: dict[str, str] = {}
    for candidate in candidates:
        if heldout_index is not None and candidate.classes[heldout_index] in heldout_set:
            assignment[candidate.source] = HELDOUT_SPLIT
        else:
            strata[candidate.classes[0] if candidate.classes else ""].append(candidate)
    for members in strata.values():
        members.sort(key=lambda c: split_key(c.source, options.seed))
        n_train, n_val, _ = split_counts(len(members), options.fractions)
        for position, candidate in enumerate(members):
            split = "train" if position < n_train else "val" if position < n_train + n_val else "test"
            assignment[candidate.source] = split
    return assignment, heldout


# ----------------------------------------------------------------------------------------------------------------
# Writing


def sample_key(source: str) -> str:
    """A readable, unique, tar-safe key: the source path slugged (60 chars at most) plus 8 hex of its sha256."""
    stem = source.rsplit(".", 1)[0] if "." in source.rsplit("/", 1)[-1] else source
    slug = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_") else "_" for ch in stem)[-60:]
    return f"{slug.strip('_') or 'sample'}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"


def drop_duplicates(candidates: Sequence[Candidate], dropped: Counter[str]) -> list[Candidate]:
    """Keep the first candidate (by source path) of each ``content_id``; count the rest as ``duplicate_image``."""
    seen: set[str] = set()
    kept: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: c.source):
        if candidate.content_id is not None:
            if candidate.content_id in seen:
                dropped["duplicate_image"] += 1
                continue
            seen.add(candidate.content_id)
        kept.append(candidate)
    return kept


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse to mix with an earlier build unless ``overwrite`` (which removes only its layout)."""
    out.mkdir(parents=True, exist_ok=True)
    existing = [out / name for name in _LAYOUT_ENTRIES if (out / name).exists()]
    if existing and not overwrite:
        raise DataError(
            f"{out} already holds a dataset ({', '.join(p.name for p in existing)}); choose an empty folder, "
            "or pass overwrite=True (--overwrite) to replace it"
        )
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


@dataclass(frozen=True)
class BuildResult:
    """A finished build: where it is and what ``build.json`` says."""

    out: Path
    info: Mapping[str, Any]

    def summary_lines(self) -> list[str]:
        """The figures a person wants after a build: kept per split, dropped per reason, classes."""
        info = self.info
        kept = info["counts"]["kept"]
        dropped = info["counts"]["dropped"]
        lines = [
            f"{info['builder']}: {info['counts']['candidates']:,} inputs -> kept {sum(kept.values()):,} "
            f"({', '.join(f'{s} {n:,}' for s, n in kept.items())}), dropped {sum(dropped.values()):,}"
        ]
        for reason, n in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  dropped {reason:<36} {n:>6,}")
        for field_name, classes in info["classes"].items():
            lines.append(f"  {field_name}: {len(classes)} classes")
        primary = info["counts"]["per_class"].get("label", {})
        largest = sorted(primary.items(), key=lambda kv: -sum(kv[1].values()))[:8]
        if largest:
            lines.append(
                "  largest classes: " + ", ".join(f"{name} {sum(c.values())}" for name, c in largest)
            )
        if info.get("heldout"):
            held = info["heldout"]
            lines.append(f"  held out ({held['field']}): {', '.join(held['classes'])}")
        lines.append(f"  written to {self.out}")
        return lines


def write_dataset(
    out: str | Path,
    builder: str,
    collected: Collected,
    image_options: ImageOptions,
    split_options: SplitOptions,
    *,
    options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_samples: int = 2000,
) -> BuildResult:
    """Split ``collected`` and write the layout described in the module docstring; returns the build record."""
    out = Path(out)
    dropped = Counter(collected.dropped)
    inputs = len(collected.candidates) + sum(dropped.values())
    candidates = drop_duplicates(collected.candidates, dropped)
    if not candidates:
        raise DataError(f"{builder}: every input was dropped ({dict(dropped)}); nothing to write to {out}")
    label_fields = collected.label_fields
    class_lists = _class_lists(builder, collected, candidates)
    indices = {name: {cls: k for k, cls in enumerate(classes)} for name, classes in class_lists.items()}
    assignment, heldout = assign_splits(candidates, label_fields, split_options)
    split_names = [*SPLITS, HELDOUT_SPLIT] if heldout else list(SPLITS)
    by_split: dict[str, list[Candidate]] = {s: [] for s in split_names}
    for candidate in candidates:
        by_split[assignment[candidate.source]].append(candidate)

    prepare_out_dir(out, overwrite)
    per_class: dict[str, dict[str, dict[str, int]]] = {f.field: {} for f in label_fields}
    manifests = {}
    for split in split_names:
        members = sorted(by_split[split], key=lambda c: split_key(c.source, split_options.seed))
        manifests[split] = _write_split(
            out, builder, split, members, collected, indices, image_options, max_shard_samples
        )
        for candidate in members:
            for i, label_field in enumerate(label_fields):
                counts = per_class[label_field.field].setdefault(
                    candidate.classes[i], dict.fromkeys(split_names, 0)
                )
                counts[split] += 1
    _write_json(out / CLASSES_NAME, class_lists)
    info: dict[str, Any] = {
        "format": "clipforge.dataset_build",
        "version": 1,
        "builder": builder,
        "layout": {
            "splits": split_names,
            "manifest": MANIFEST_NAME,
            "classes": CLASSES_NAME,
            "label_fields": {f.field: f.name_field for f in label_fields},
        },
        "counts": {
            "candidates": inputs,
            "kept": {s: len(by_split[s]) for s in split_names},
            "dropped": dict(sorted(dropped.items())),
            "per_class": {name: dict(sorted(c.items())) for name, c in per_class.items()},
        },
        "splits": manifests,
        "classes": class_lists,
        "heldout": _heldout_record(split_options, heldout, indices),
        "split_policy": {
            **asdict(split_options),
            "fractions": list(split_options.fractions),
            "stratified_by": label_fields[0].field if label_fields else None,
        },
        "image": asdict(image_options),
        "source_packages": package_versions(collected.packages),
        "python_packages": python_package_versions(collected.python_packages),
        "licence": dict(collected.licence),
        "options": dict(options or {}),
        "notes": collected.notes,
    }
    _write_json(out / BUILD_INFO_NAME, info)  # last: a folder without it is an interrupted build
    return BuildResult(out, info)


def _write_json(path: Path, data: Any) -> None:
    """``data`` as indented UTF-8 JSON, written atomically (a crash leaves the old file or none)."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _class_lists(builder: str, collected: Collected, candidates: Sequence[Candidate]) -> dict[str, list[str]]:
    """Each label field's class names by index (the builder's order, else sorted), after checking that every
    candidate has one class name per label field."""
    label_fields = collected.label_fields
    for candidate in candidates:
        if len(candidate.classes) != len(label_fields):
            raise ValueError(
                f"{builder}: {candidate.source} has {len(candidate.classes)} class names, expected "
                f"{len(label_fields)} ({[f.field for f in label_fields]})"
            )
    return {
        f.field: list(collected.class_order.get(f.field) or sorted({c.classes[i] for c in candidates}))
        for i, f in enumerate(label_fields)
    }


def _write_split(
    out: Path,
    builder: str,
    split: str,
    members: Sequence[Candidate],
    collected: Collected,
    indices: Mapping[str, Mapping[str, int]],
    image_options: ImageOptions,
    max_shard_samples: int,
) -> dict[str, int]:
    """One split's shards and manifest; returns its sample, shard and byte counts."""
    args = {"builder": builder, "split": split, "build_info": f"../{BUILD_INFO_NAME}"}
    with ShardWriter(out / split, max_samples=max_shard_samples, args=args) as writer:
        for candidate in members:
            extra: dict[str, Any] = {}
            for label_field, name in zip(collected.label_fields, candidate.classes):
                extra[label_field.field] = indices[label_field.field][name]
                extra[label_field.name_field] = name
            extra["source"] = candidate.source
            clash = sorted(set(extra) & set(candidate.extra))
            if clash:
                raise ValueError(
                    f"{builder}: {candidate.source}: extra fields {clash} clash with the label fields"
                )
            extra.update(candidate.extra)
            writer.write(
                sample_key(candidate.source), candidate.image, image_options.ext, candidate.captions, extra
            )
    manifest = writer.manifest
    return {
        "samples": manifest.num_samples,
        "shards": len(manifest.shards),
        "bytes": sum(s.num_bytes for s in manifest.shards),
    }


def _heldout_record(
    options: SplitOptions, heldout: Sequence[str], indices: Mapping[str, Mapping[str, int]]
) -> dict[str, Any] | None:
    if not heldout:
        return None
    return {
        "field": options.heldout_field,
        "classes": list(heldout),
        "indices": [indices[options.heldout_field][c] for c in heldout],
        "rule": _heldout_rule(options),
    }


def _ordinal(n: int) -> str:
    """2 -> "2nd", 3 -> "3rd", 11 -> "11th", 21 -> "21st"."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _heldout_rule(options: SplitOptions) -> str:
    among = f"those with >= {options.heldout_min_count} samples"
    if options.heldout_max_count > 0:
        among = f"those with {options.heldout_min_count} to {options.heldout_max_count} samples"
    if options.heldout_min_mentions > 0:
        among += (
            f" whose name appears in the captions of >= {options.heldout_min_mentions} samples of other classes"
            + (f" ({options.heldout_mention_note})" if options.heldout_mention_note else "")
        )
    if options.heldout_every is not None:
        return f"every {_ordinal(options.heldout_every)} class of '{options.heldout_field}' sorted by name among {among}"
    if isinstance(options.heldout_classes, int):
        return (
            f"{options.heldout_classes} classes of '{options.heldout_field}' spread evenly over {among}, "
            "sorted by name (positions floor((i + 0.5) * E / N))"
        )
    return "named explicitly"


def load_build_info(out: str | Path) -> dict[str, Any]:
    """Read ``OUT/build.json``; :class:`DataError` if the folder is not a finished build."""
    path = Path(out) / BUILD_INFO_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path}: not a finished dataset build ({exc}); run `clipforge data build` again"
        ) from exc
