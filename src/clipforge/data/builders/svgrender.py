"""SVG icons to thumbnails with resvg (the ``resvg_py`` wheel: Rust, no system library), fitted inside the
thumbnail square with a small margin, centred on white; and a process pool for many icons.

A render that fails is a drop reason, never a crash: ``render:error`` (resvg refused the SVG), ``render:empty``
(nothing drawn: every pixel transparent), ``render:all_white`` (only white drawn, invisible on white).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from PIL import Image

from clipforge.data.builders.core import ImageOptions
from clipforge.data.builders.environment import PipPackage, require_module

RESVG = PipPackage("resvg_py", "resvg_py", "0.5.0")
DEFAULT_MARGIN = 1 / 16  # of the side, on each side: 4 px at 64 px
_ROOT_TAG = re.compile(r"<svg\b", re.IGNORECASE)


class RenderError(ValueError):
    """An SVG that gives no usable image; ``reason`` is the drop reason (``render:...``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def render_svg(svg: str, size: int, margin: float = DEFAULT_MARGIN) -> Image.Image:
    """The SVG as a ``size`` x ``size`` RGB image: its viewBox fitted (aspect kept) inside the square less
    ``margin * size`` on each side, centred, composited on white. Raises :class:`RenderError`."""
    resvg_py = require_module("svg rendering", RESVG)
    inner = max(1, size - 2 * round(size * margin))
    try:
        # width and height together: resvg fits the viewBox inside the box, keeping its aspect ratio
        png = resvg_py.svg_to_bytes(svg_string=svg, width=inner, height=inner, skip_system_fonts=True)
        drawn = Image.open(io.BytesIO(bytes(png)))
        drawn.load()
    except (KeyboardInterrupt, SystemExit):
        raise
    # ValueError for a bad SVG; a Rust panic arrives as pyo3's PanicException, a BaseException
    except BaseException as exc:
        raise RenderError("render:error", f"resvg could not render the SVG: {exc}") from exc
    drawn = drawn.convert("RGBA")
    if drawn.getchannel("A").getextrema()[1] == 0:
        raise RenderError("render:empty", "the SVG draws nothing (every pixel is transparent)")
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(drawn, ((size - drawn.width) // 2, (size - drawn.height) // 2), drawn)
    if canvas.getextrema() == ((255, 255),) * 3:
        raise RenderError("render:all_white", "the SVG draws only white, invisible on the white background")
    return canvas


def with_fill(svg: str, colour: str) -> str:
    """``svg`` with ``fill="colour"`` on its root element (inherited by shapes that set no fill of their own)."""
    match = _ROOT_TAG.search(svg)
    if match is None:
        return svg  # not an SVG: resvg refuses it, counted as render:error
    return f'{svg[: match.end()]} fill="{colour}"{svg[match.end() :]}'


@dataclass(frozen=True)
class RenderJob:
    """One icon to render: the SVG text and where the result goes."""

    source: str
    svg: str


def _render_one(job: RenderJob, image_options: ImageOptions, margin: float) -> bytes | str:
    try:
        return image_options.encode(render_svg(job.svg, image_options.size, margin))
    except RenderError as exc:
        return exc.reason


def _render_chunk(jobs: Sequence[RenderJob], image_options: ImageOptions, margin: float) -> list[bytes | str]:
    return [_render_one(job, image_options, margin) for job in jobs]


def default_workers() -> int:
    """Processes for rendering: the CPUs this process may use, at most 2 (the machines this runs on)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(2, available))


def render_many(
    jobs: Sequence[RenderJob],
    image_options: ImageOptions,
    *,
    margin: float = DEFAULT_MARGIN,
    workers: int = 1,
    chunk: int = 200,
) -> Iterator[bytes | str]:
    """Encoded thumbnails (or drop reasons) of ``jobs``, in order; ``workers > 1`` renders in a process pool."""
    require_module("svg rendering", RESVG)  # fail before any worker starts
    if workers <= 1 or len(jobs) <= chunk:
        for job in jobs:
            yield _render_one(job, image_options, margin)
        return
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    # spawn, not fork: the caller may hold threads (torch, OpenMP) that a forked child would inherit locked
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for results in pool.map(_render_chunk, chunks, [image_options] * len(chunks), [margin] * len(chunks)):
            yield from results
