"""Opening training data by spec (shards, patterns, tables, image folders) as a :class:`Source` of units, and
:func:`write_shards`, which turns any source into size-bounded webdataset shards.

A source is a list of units read independently: a **shard** (its samples in stored order) or a table **row**
(one sample). The stream layer shuffles, partitions and resumes by unit index; sources never shuffle.
"""

from __future__ import annotations

import bisect
import functools
import glob
import io
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from PIL import Image, ImageOps
from tqdm import tqdm

from clipforge.data.folders import ImageFolderSource
from clipforge.data.raw import DataError, DataNotFoundError, RawSample, UnitError
from clipforge.data.remote import RemoteOptions, is_url, iter_remote_shard, open_remote_shards, url_name
from clipforge.data.shards import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_SAMPLES,
    MANIFEST_NAME,
    Manifest,
    ShardWriter,
    is_member_suffix,
    iter_shard,
)
from clipforge.data.tables import TABLE_SUFFIXES, TableSource
from clipforge.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

log = logging.getLogger("clipforge.data")

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_SHARD_OPTIONS = {"allow_missing", "use_manifest", "remote_retries", "remote_backoff_s", "storage_options"}
_TABLE_OPTIONS = {
    "image_column",
    "caption_column",
    "caption_separator",
    "root",
    "columns",
    "encoding",
    "on_bad_row",
}
_FOLDER_OPTIONS = {"caption_separator"}
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


@runtime_checkable
class Source(Protocol):
    """Units of raw samples: shards (many samples each, in stored order) or table rows (one sample each)."""

    name: str
    unit_kind: Literal["shard", "row"]

    def num_units(self) -> int: ...

    def iter_unit(self, index: int) -> Iterator[RawSample | UnitError]: ...

    def num_samples(self) -> int | None: ...


class ShardSource:
    """A list of tar shards: local paths, or URLs (str) read through fsspec with ``remote``'s retries.
    ``counts`` (per shard, from manifests) makes :meth:`num_samples` known."""

    unit_kind: Literal["shard"] = "shard"

    def __init__(
        self,
        name: str,
        paths: Sequence[Path | str],
        counts: Sequence[int] | None = None,
        notes: Sequence[str] = (),
        remote: RemoteOptions | None = None,
    ) -> None:
        self.name = name
        self.paths: list[Path | str] = [p if is_url(p) else Path(p) for p in paths]
        self.counts = list(counts) if counts is not None else None
        names = [url_name(p) if isinstance(p, str) else p.name for p in self.paths]
        unique = len(set(names)) == len(names)
        self.labels = names if unique else [str(p) for p in self.paths]  # sample keys stay unique
        self.notes: tuple[str, ...] = tuple(notes)
        self.remote = remote or RemoteOptions()

    def num_units(self) -> int:
        return len(self.paths)

    def iter_unit(self, index: int) -> Iterator[RawSample | UnitError]:
        """Shard ``index``'s samples; a missing, unreadable, unreachable or damaged shard ends with a
        :class:`UnitError`."""
        path = self.paths[index]
        if isinstance(path, str):
            return iter_remote_shard(path, label=self.labels[index], options=self.remote)
        return iter_shard(path, label=self.labels[index])

    def num_samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


class ConcatSource:
    """Several sources of one unit kind, one after another (unit indices run through them in order)."""

    def __init__(self, name: str, parts: Sequence[Source]) -> None:
        kinds = {p.unit_kind for p in parts}
        if len(kinds) != 1:
            listing = ", ".join(f"{p.name} ({p.unit_kind}s)" for p in parts)
            raise DataError(
                f"{name!r}: cannot join shard and table/folder sources with '::' ({listing}); pass them as "
                "separate sources (they can still be mixed by weight)"
            )
        self.name = name
        self.unit_kind = kinds.pop()
        self.parts = list(parts)
        self._offsets = [0]
        for part in parts:
            self._offsets.append(self._offsets[-1] + part.num_units())
        self.notes = tuple(note for p in parts for note in getattr(p, "notes", ()))

    def num_units(self) -> int:
        return self._offsets[-1]

    def iter_unit(self, index: int) -> Iterator[RawSample | UnitError]:
        if not 0 <= index < self._offsets[-1]:
            raise IndexError(f"unit {index} out of range ({self._offsets[-1]} units)")
        part = bisect.bisect_right(self._offsets, index) - 1
        return self.parts[part].iter_unit(index - self._offsets[part])

    def num_samples(self) -> int | None:
        counts = [p.num_samples() for p in self.parts]
        return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)


def with_remote_options(source: Source, options: RemoteOptions) -> Source:
    """``source`` reading its remote shards with ``options`` (a source without shards is returned as it is)."""
    if not isinstance(source, ShardSource):
        return source
    return ShardSource(source.name, source.paths, source.counts, source.notes, options)


def source_notes(source: Source) -> tuple[str, ...]:
    """Things a source noticed while opening (files it does not read, malformed rows reported), for logs."""
    return tuple(getattr(source, "notes", ()))


# ----------------------------------------------------------------------------------------------------------------
# open_source


def open_source(spec: str | Path, **options: Any) -> Source:
    """Open training data from a spec; see the accepted forms below. Raises :class:`DataError` (a
    ``ValueError``) naming the spec and the fix; :class:`DataNotFoundError` (also a ``FileNotFoundError``)
    when nothing matches.

    * a directory of ``.tar`` shards (its ``manifest.json``, if any, gives the shard list and sample counts;
      ``use_manifest=False`` ignores it); a single ``.tar`` (or ``.tar.gz``); a brace pattern
      ``data/shard-{000000..000009}.tar`` (also ``{a,b}``); a glob ``data/*.tar``;
    * a ``.csv`` / ``.tsv`` / ``.jsonl`` table (options: see :class:`~clipforge.data.tables.TableSource`);
    * a directory of images with sidecar ``.txt`` captions (no ``.tar`` files in it);
    * several of these joined with ``::`` (all shards, or all tables/folders);
    * shard URLs read through fsspec (``https://``, ``s3://``, ``gs://``...: :mod:`clipforge.data.remote`): one
      ``.tar`` URL, or a brace pattern (a ``manifest.json`` beside the shards gives their sample counts unless
      ``use_manifest=False``); a folder URL or a ``.../manifest.json`` URL reads the manifest's shard list. Remote
      shards are not checked at opening; one that cannot be read gives ``UnitError("unreachable_shard")``.
      Options ``remote_retries`` (3) and ``remote_backoff_s`` (1.0) set the retries (waits of backoff x 2^k),
      ``storage_options`` (a dict) goes to fsspec (e.g. credentials).

    A brace pattern naming files that do not exist is an error (listing how many exist) unless
    ``allow_missing=True``, which keeps them as units that read as ``UnitError("missing_shard")``. Options
    that apply to none of the parts are an error, so a misspelt option is never ignored.
    """
    text = str(spec)
    valid = _SHARD_OPTIONS | _TABLE_OPTIONS | _FOLDER_OPTIONS
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(f"open_source got unknown options {unknown}; valid options: {sorted(valid)}")
    pieces = [p.strip() for p in text.split("::")]
    if not text.strip() or any(not p for p in pieces):
        raise DataError(f"{text!r}: empty data spec (or an empty part between '::')")
    shard_paths: list[Path | str] = []
    shard_counts: list[int] | None = []
    shard_notes: list[str] = []
    row_sources: list[Source] = []
    used: set[str] = set()
    for piece in pieces:
        opened = _open_piece(piece, options, used)
        if isinstance(opened, ShardSource):
            shard_paths += opened.paths
            shard_notes += opened.notes
            if shard_counts is not None and opened.counts is not None:
                shard_counts += opened.counts
            else:
                shard_counts = None
        else:
            row_sources.append(opened)
    leftover = sorted(set(options) - used)
    if leftover:
        raise DataError(f"{text!r}: option(s) {leftover} do not apply to this data (nothing here reads them)")
    if shard_paths and row_sources:
        parts: list[Source] = [ShardSource(text, shard_paths), *row_sources]
        ConcatSource(text, parts)  # raises the explanatory error
    if shard_paths:
        return ShardSource(text, shard_paths, shard_counts, shard_notes, _remote_options(options))
    labels = [getattr(r, "label", None) for r in row_sources]
    for source, label in zip(row_sources, labels):
        if labels.count(label) > 1:  # e.g. a/train.csv::b/train.csv: keep sample keys unique
            source.label = source.name  # type: ignore[attr-defined]
    if len(row_sources) == 1:
        return row_sources[0]
    return ConcatSource(text, row_sources)


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` lists and ``{000..123}`` numeric ranges (zero-padded when either end is), in order."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.fullmatch(body)
    if numeric:
        first, last = numeric.group(1), numeric.group(2)
        if int(first) > int(last):
            raise DataError(f"{pattern!r}: the range {{{body}}} runs backwards; write it low..high")
        padded = any(n.lstrip("-").startswith("0") and len(n.lstrip("-")) > 1 for n in (first, last))
        width = max(len(first), len(last)) if padded else 0
        items = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DataError(f"{pattern!r}: cannot expand {{{body}}}: use {{a,b,c}} or {{000..099}}")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for item in items for expanded in expand_braces(head + item + tail)]


def _is_shard(path: Path) -> bool:
    return path.name.lower().endswith(SHARD_SUFFIXES)


def _take(options: Mapping[str, Any], names: set[str], used: set[str]) -> dict[str, Any]:
    taken = {k: v for k, v in options.items() if k in names}
    used.update(taken)
    return taken


def _remote_options(options: Mapping[str, Any]) -> RemoteOptions:
    defaults = RemoteOptions()
    retries = options.get("remote_retries", defaults.retries)
    backoff = options.get("remote_backoff_s", defaults.backoff_s)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise DataError(f"remote_retries: must be a whole number >= 0 (e.g. 3), got {retries!r}")
    if not isinstance(backoff, (int, float)) or isinstance(backoff, bool) or backoff < 0:
        raise DataError(f"remote_backoff_s: must be a number of seconds >= 0 (e.g. 1.0), got {backoff!r}")
    return RemoteOptions(retries, float(backoff), dict(options.get("storage_options") or {}))


def _open_url(piece: str, options: Mapping[str, Any], used: set[str]) -> ShardSource:
    """A URL part of a spec: remote shards (see :func:`open_source`)."""
    if any(c in piece for c in "*["):
        raise DataError(
            f"{piece!r}: globs are not read for URLs (a remote folder cannot be listed everywhere); name the "
            "shards with a brace pattern such as shard-{000000..000099}.tar, or give the folder's manifest.json"
        )
    shard_options = _take(options, _SHARD_OPTIONS, used)
    urls = expand_braces(piece) if _BRACE.search(piece) else [piece]
    opened = open_remote_shards(
        urls, piece, _remote_options(options), shard_options.get("use_manifest", True)
    )
    return ShardSource(piece, opened.urls, opened.counts, opened.notes)


def _open_piece(piece: str, options: Mapping[str, Any], used: set[str]) -> Source:
    """One ``::``-separated part of a spec."""
    if is_url(piece):
        return _open_url(piece, options, used)
    has_glob = any(c in piece for c in "*?[")
    expanded = expand_braces(piece) if _BRACE.search(piece) else [piece]
    if has_glob:
        paths = [Path(p) for pattern in expanded for p in sorted(glob.glob(pattern, recursive=True))]
        if not paths:
            raise DataNotFoundError(f"{piece!r}: no files match this pattern; check the path and the pattern")
    else:
        paths = [Path(p) for p in expanded]
    if len(expanded) > 1 or has_glob:
        if not all(_is_shard(p) for p in paths):
            others = [str(p) for p in paths if not _is_shard(p)][:3]
            raise DataError(f"{piece!r}: a pattern must name only .tar shards; it also names {others}")
        shard_options = _take(options, _SHARD_OPTIONS, used)
        missing = [p for p in paths if not p.exists()]
        if len(missing) == len(paths):
            raise DataNotFoundError(f"{piece!r}: none of the {len(paths)} files this pattern names exist")
        if missing and not shard_options.get("allow_missing", False):
            shown = ", ".join(str(p) for p in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DataError(
                f"{piece!r}: the pattern names {len(paths)} shards but only {len(paths) - len(missing)} exist; "
                f"missing: {shown}; fix the pattern's range, or pass allow_missing=True to read the ones that "
                "exist and report each missing one as a 'missing_shard' error"
            )
        return ShardSource(piece, paths)
    path = paths[0]
    if not path.exists():
        raise DataNotFoundError(f"{piece!r}: no such file or directory")
    if path.is_dir():
        return _open_directory(path, options, used)
    if _is_shard(path):
        _take(options, _SHARD_OPTIONS, used)
        return ShardSource(piece, [path])
    if path.suffix.lower() in TABLE_SUFFIXES:
        return TableSource(path, **_take(options, _TABLE_OPTIONS, used))
    hint = " (convert it to CSV or JSONL)" if path.suffix.lower() in (".parquet", ".arrow", ".xlsx") else ""
    raise DataError(
        f"{piece!r}: cannot read this kind of file{hint}; expected .tar shards, a directory, or a "
        f"{'/'.join(sorted(TABLE_SUFFIXES))} table"
    )


def _open_directory(path: Path, options: Mapping[str, Any], used: set[str]) -> Source:
    shards = sorted(p for p in path.iterdir() if p.is_file() and _is_shard(p))
    manifest_path = path / MANIFEST_NAME
    if not shards and not manifest_path.exists():
        return ImageFolderSource(path, **_take(options, _FOLDER_OPTIONS, used))
    shard_options = _take(options, _SHARD_OPTIONS, used)
    if not manifest_path.exists() or not shard_options.get("use_manifest", True):
        return ShardSource(str(path), shards)
    manifest = Manifest.load(manifest_path)
    listed = [path / s.name for s in manifest.shards]
    missing = [p for p in listed if not p.exists()]
    unlisted = sorted(set(shards) - set(listed))
    if unlisted:
        shown = ", ".join(p.name for p in unlisted[:5])
        raise DataError(
            f"{manifest_path}: lists {len(listed)} shards but the directory also holds {len(unlisted)} other "
            f"shard files ({shown}); remove them, or pass use_manifest=False to read every .tar in {path}"
        )
    if missing and not shard_options.get("allow_missing", False):
        shown = ", ".join(p.name for p in missing[:5])
        raise DataError(
            f"{manifest_path}: {len(missing)} of its {len(listed)} shards are missing ({shown}); restore them, or "
            "pass allow_missing=True to read the rest and report each missing one as a 'missing_shard' error"
        )
    notes = [
        f"{manifest_path}: {n} inputs were dropped when writing ({r})" for r, n in manifest.dropped.items()
    ]
    return ShardSource(str(path), listed, [s.num_samples for s in manifest.shards], notes)


# ----------------------------------------------------------------------------------------------------------------
# write_shards

_FORMAT_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
_FORMAT_EXTENSIONS["TIFF"] = "tif"
_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}


@dataclass(frozen=True)
class _Prepared:
    image: bytes
    ext: str
    captions: tuple[str, ...]
    removed_captions: int


def write_shards(
    source: Source,
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    resize: int | None = None,
    jpeg_quality: int = 90,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Read every unit of ``source`` in order and write its usable samples to shards; returns the manifest.

    Each image is decoded with :func:`clipforge.images.load_image` to check it. Kept as stored (bytes
    unchanged) unless ``resize=S`` and its shorter side exceeds S, or its format has no webdataset extension:
    then it is downscaled (aspect kept, bicubic, shorter side S) and re-encoded, as PNG when it has
    transparency (alpha kept) and as JPEG (``jpeg_quality``) otherwise. Skipped and counted by reason in
    ``manifest.dropped``: samples with an error from the source (``missing_image``, ...), images that fail to
    decode (``image_<reason>`` from :class:`ImageLoadError`), samples whose captions are all empty or blank
    (``empty_caption``), and failed units (their ``UnitError.reason``; messages in ``unit_errors``). Empty
    captions beside non-empty ones are removed (counted as ``empty_caption_text``).

    Output keys are the sample's position among the written samples (``000000042``); the source key is kept
    in the sample's json as ``source_key``, with the source's extra fields. ``num_workers > 0`` decodes in
    that many processes; the output is identical either way.
    """
    args = {"source": source.name, "resize": resize, "jpeg_quality": jpeg_quality, "max_pixels": max_pixels}
    writer = ShardWriter(out_dir, prefix, max_bytes, max_samples, overwrite=overwrite, args=args)
    prepare = functools.partial(_prepare, resize=resize, jpeg_quality=jpeg_quality, max_pixels=max_pixels)
    total = source.num_samples()
    executor = ProcessPoolExecutor(num_workers) if num_workers > 0 else None
    window = max(1, num_workers) * 32  # bounded memory: decode this many samples at a time
    written = 0
    try:
        with tqdm(total=total, unit="sample", desc=f"sharding {source.name}", disable=not progress) as bar:
            for batch in _batched(_iter_all(source), window):
                samples = [item for item in batch if isinstance(item, RawSample)]
                results = executor.map(prepare, samples, chunksize=4) if executor else map(prepare, samples)
                results_iter = iter(results)
                for item in batch:
                    if isinstance(item, UnitError):
                        log.warning("%s", item.message)
                        writer.record_unit_error(item)
                        continue
                    result = next(results_iter)
                    bar.update(1)
                    if isinstance(result, str):
                        log.debug("skipped %s: %s", item.key, result)
                        writer.record_dropped(result)
                        continue
                    if result.removed_captions:
                        writer.record_dropped("empty_caption_text", result.removed_captions)
                    extra = _shard_extra(item)
                    writer.write(f"{written:09d}", result.image, result.ext, result.captions, extra)
                    written += 1
    except BaseException:
        writer.abort()
        raise
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    return writer.close()


def _iter_all(source: Source) -> Iterator[RawSample | UnitError]:
    for index in range(source.num_units()):
        yield from source.iter_unit(index)


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _shard_extra(sample: RawSample) -> dict[str, Any]:
    """The sample's extra fields in a form the shard writer stores: bytes under member-safe names."""
    extra: dict[str, Any] = {"source_key": sample.key}
    for name, value in sample.extra.items():
        if isinstance(value, (bytes, bytearray)) and not is_member_suffix(name):
            name = "x_" + re.sub(r"[^a-z0-9_.-]", "_", name.lower()).lstrip(".")
        elif name in ("captions", "source_key"):
            name = f"source_{name}"
        extra[name] = value
    return extra


def _prepare(
    sample: RawSample, resize: int | None, jpeg_quality: int, max_pixels: int | None
) -> _Prepared | str:
    """A sample's image bytes and captions for writing, or the reason it is skipped."""
    if sample.error is not None:
        return sample.error
    captions = tuple(c for c in sample.captions if c.strip())
    if not captions:
        return "empty_caption"
    if sample.image is None:
        return "missing_image"
    try:
        image, ext = encode_for_shard(sample.image, sample.image_name, resize, jpeg_quality, max_pixels)
    except ImageLoadError as exc:
        log.debug("%s", exc)
        return f"image_{exc.reason}"
    return _Prepared(image, ext, captions, len(sample.captions) - len(captions))


def encode_for_shard(
    data: bytes,
    name: str,
    resize: int | None = None,
    jpeg_quality: int = 90,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[bytes, str]:
    """Check that ``data`` decodes; return (bytes, extension), downscaled and re-encoded when needed (see
    :func:`write_shards`). Raises :class:`ImageLoadError` for an image that cannot be used."""
    rgb = load_image(data, name=name, max_pixels=max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            ext = _FORMAT_EXTENSIONS.get(probe.format or "")
            alpha = probe.mode in _ALPHA_MODES or "transparency" in probe.info
    except Image.DecompressionBombError:  # over Pillow's global limit, which load_image lifted for this image
        ext, alpha = None, False
    width, height = rgb.size
    shrink = resize is not None and min(width, height) > resize
    if not shrink and ext is not None:
        return data, ext
    image = rgb
    if alpha:
        try:
            with Image.open(io.BytesIO(data)) as original:
                image = ImageOps.exif_transpose(original).convert("RGBA")
        except Exception:  # an exotic mode Pillow cannot give as RGBA: keep load_image's composited RGB
            image, alpha = rgb, False
    if shrink:
        assert resize is not None
        scale = resize / min(width, height)
        size = (
            (resize, max(1, round(height * scale)))
            if width <= height
            else (max(1, round(width * scale)), resize)
        )
        image = image.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    if alpha:
        image.save(out, format="PNG")
        return out.getvalue(), "png"
    image.save(out, format="JPEG", quality=jpeg_quality)
    return out.getvalue(), "jpg"
