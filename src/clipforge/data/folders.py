"""Folders of images as data sources: images with sidecar ``.txt`` captions (:class:`ImageFolderSource`, for
training and retrieval) and class-per-folder trees (:class:`ClassFolderSource`, whose labels are the folder
names, for evaluation). Like tables, each image is one unit and is read only when asked for.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from clipforge.data.raw import (
    BAD_CAPTION_ENCODING,
    IMAGE_EXTENSIONS,
    MISSING_CAPTION,
    MISSING_IMAGE,
    UNREADABLE_CAPTION_FILE,
    DataError,
    RawSample,
    read_image_file,
)
from clipforge.data.tables import split_captions


class ImageFolderSource:
    """A folder of images with sidecar captions (``cat.jpg`` + ``cat.txt``), searched recursively; one unit
    per image, in sorted order of relative path.

    An image without a caption file reads as ``error="missing_caption"`` (with its bytes); a caption file
    without an image as ``error="missing_image"``; a caption that is not UTF-8 as ``bad_caption_encoding``.
    The whole caption file is one caption (a leading BOM dropped), or it is split on ``caption_separator``
    (e.g. ``"\\n"`` for one caption per line). Hidden files and folders (".name") and files that are neither
    images nor ``.txt`` are not read; ``notes`` counts them. Keys are ``f"{label}/{relative path}"``.
    """

    unit_kind: Literal["row"] = "row"

    def __init__(
        self, root: str | Path, *, caption_separator: str | None = None, label: str | None = None
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory of images")
        self.name = str(root)
        self.label = label if label is not None else (self.root.resolve().name or str(self.root))
        self.caption_separator = caption_separator
        images: list[str] = []
        captions: dict[str, str] = {}  # relative path without suffix -> relative .txt path
        spare_captions: list[str] = []
        ignored: Counter[str] = Counter()
        for directory, subdirectories, files in os.walk(self.root):
            hidden = [d for d in subdirectories if d.startswith(".")]
            ignored["hidden"] += len(hidden)
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            relative_dir = Path(directory).relative_to(self.root)
            for file_name in sorted(files):
                relative = (relative_dir / file_name).as_posix()
                suffix = Path(file_name).suffix.lower().lstrip(".")
                if file_name.startswith("."):
                    ignored["hidden"] += 1
                elif suffix in IMAGE_EXTENSIONS:
                    images.append(relative)
                elif suffix == "txt":
                    stem = relative[: -len(".txt")]
                    if stem in captions:  # cat.txt and cat.TXT: the first (sorted) is the caption
                        spare_captions.append(relative)
                    else:
                        captions[stem] = relative
                else:
                    ignored[f".{suffix}" if suffix else "no extension"] += 1
        used: set[str] = set()
        units: list[tuple[str, str | None]] = []  # (image or orphan caption path, caption path)
        for image in images:
            stem = image.rsplit(".", 1)[0]
            caption = captions.get(stem)
            if caption is not None:
                used.add(caption)
            units.append((image, caption))
        orphans = [(c, c) for c in [*captions.values(), *spare_captions] if c not in used]
        self._units = sorted(units + orphans)
        self._orphans = {c for c, _ in orphans}
        if not self._units:
            raise DataError(f"{self.root}: no images (.{', .'.join(sorted(IMAGE_EXTENSIONS))}) found")
        notes = []
        if ignored:
            counts = ", ".join(f"{what}: {n}" for what, n in sorted(ignored.items()) if n)
            if counts:
                notes.append(f"{self.root}: files not read (neither images nor .txt captions): {counts}")
        if orphans:
            notes.append(f"{self.root}: {len(orphans)} .txt files have no image; each reads as missing_image")
        self.notes: tuple[str, ...] = tuple(notes)

    def num_units(self) -> int:
        return len(self._units)

    def num_samples(self) -> int | None:
        return len(self._units)

    def iter_unit(self, index: int) -> Iterator[RawSample]:
        yield self.row(index)

    def row(self, index: int) -> RawSample:
        """Unit ``index`` as a sample; the image and caption files are read here."""
        relative, caption_file = self._units[index]
        key = f"{self.label}/{relative}"
        captions: tuple[str, ...] = ()
        error = None
        if caption_file is None:
            error = MISSING_CAPTION
        else:
            caption_bytes, caption_error = read_image_file(self.root / caption_file)
            if caption_bytes is None:
                error = MISSING_CAPTION if caption_error == MISSING_IMAGE else UNREADABLE_CAPTION_FILE
            else:
                try:
                    captions = split_captions(caption_bytes.decode("utf-8-sig"), self.caption_separator)
                except UnicodeDecodeError:
                    error = BAD_CAPTION_ENCODING
        if relative in self._orphans:
            return RawSample(key, None, captions, str(self.root / relative), MISSING_IMAGE)
        image, image_error = read_image_file(self.root / relative)
        return RawSample(key, image, captions, str(self.root / relative), image_error or error)


@dataclass(frozen=True)
class ClassFolderEntry:
    """One image of a class-folder tree: its key (the path relative to the root), file and label."""

    key: str
    path: Path
    label: int


class ClassFolderSource:
    """A class-per-folder tree ``ROOT/<class>/**/<image>``: one unit per image, labelled by its class folder.

    The class folders are ROOT's subfolders that are not hidden, sorted by name; label ``i`` is the ``i``-th
    (:attr:`classnames`). Images are found recursively in sorted order; hidden files and folders are skipped,
    and ``notes`` counts what is not read (images directly in ROOT, files that are not images, empty class
    folders). Samples have no captions; ``extra`` holds ``label`` and ``class``. Keys are the relative path
    (``"cat/001.png"``), so the key's first part is the class.
    """

    unit_kind: Literal["row"] = "row"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory of class folders")
        self.name = str(root)
        entries = [p for p in self.root.iterdir() if not p.name.startswith(".")]
        folders = sorted(p for p in entries if p.is_dir())
        loose = [p for p in entries if p.is_file() and _is_image(p)]
        self.classnames = [p.name for p in folders]
        self._entries: list[ClassFolderEntry] = []
        empty: list[str] = []
        ignored: Counter[str] = Counter()
        for label, folder in enumerate(folders):
            before = len(self._entries)
            for directory, subdirs, names in os.walk(folder):
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
                for file_name in sorted(names):
                    file_path = Path(directory) / file_name
                    if file_name.startswith("."):
                        continue
                    if not _is_image(file_path):
                        ignored[file_path.suffix.lower() or "no extension"] += 1
                        continue
                    key = file_path.relative_to(self.root).as_posix()
                    self._entries.append(ClassFolderEntry(key, file_path, label))
            if len(self._entries) == before:
                empty.append(folder.name)
        notes = []
        if loose:
            notes.append(f"{self.root}: {len(loose)} images outside the class folders were not read")
        if ignored:
            notes.append(f"{self.root}: files that are not images were not read: {_format_counts(ignored)}")
        if empty:
            notes.append(f"{self.root}: {len(empty)} class folders hold no images: {', '.join(empty[:10])}")
        self.notes: tuple[str, ...] = tuple(notes)
        if not folders:
            raise DataError(f"{self.root}: no class folders (subfolders named by class) found")
        if not self._entries:
            raise DataError(f"{self.root}: the class folders hold no images")

    def entries(self) -> list[ClassFolderEntry]:
        """Every image's key, path and label, in stored order; no file is read."""
        return list(self._entries)

    def num_units(self) -> int:
        return len(self._entries)

    def num_samples(self) -> int | None:
        return len(self._entries)

    def iter_unit(self, index: int) -> Iterator[RawSample]:
        yield self.row(index)

    def row(self, index: int) -> RawSample:
        """Image ``index`` as a sample (no captions; ``extra``: its ``label`` and ``class``); read here."""
        entry = self._entries[index]
        image, error = read_image_file(entry.path)
        extra = {"label": entry.label, "class": self.classnames[entry.label]}
        return RawSample(entry.key, image, (), str(entry.path), error, extra)


def _is_image(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def _format_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())) or "nothing"
