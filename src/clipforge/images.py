"""Decoding images safely: every failure becomes an :class:`ImageLoadError` that names the file, and every Pillow
mode (palette, alpha, CMYK, 16-bit, float, ...) is turned into 8-bit RGB by one documented rule.

Decompression-bomb guard
------------------------
``load_image(..., max_pixels=N)`` is checked per call, by clipforge, against the size in the image header, after
``Image.open`` and before any pixel data is decoded. Pillow's own process-wide guard (``Image.MAX_IMAGE_PIXELS``,
warning above it, ``DecompressionBombError`` above twice it) still runs inside ``Image.open`` and is never
changed permanently. The two interact in three ways:

* the image is over ``max_pixels``: clipforge refuses it with an :class:`ImageLoadError` (whether or not Pillow
  refused it first), giving the pixel count and how to raise the limit;
* Pillow refuses an image that ``max_pixels`` allows (the caller raised the limit, or passed ``None``): the image
  is opened again with ``Image.MAX_IMAGE_PIXELS`` raised to exactly this image's pixel count, under a module lock,
  for the duration of that one open-and-decode, and restored afterwards (unless someone else changed it in the
  meantime). The lock keeps concurrent clipforge calls from undoing each other's restore; clipforge calls in other
  threads never rely on Pillow's global (their own check is authoritative). Pillow use outside clipforge in other
  threads of the same process sees the raised limit only during that window, and only up to this one image's
  size. DataLoader workers are processes, so they are not affected at all.
* Pillow only *warns* (between its limit and twice it) about an image ``max_pixels`` allows: the warning is
  Pillow's and is left alone, because changing warning filters is process-wide and not thread-safe before
  Python 3.14. Silence it with ``warnings.filterwarnings("ignore", category=PIL.Image.DecompressionBombWarning)``
  if you raised ``max_pixels`` on purpose.

The default, :data:`DEFAULT_MAX_PIXELS`, is Pillow's default limit as a fixed number, so clipforge's behaviour
does not depend on what other code did to Pillow's global.
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Pillow's default ``Image.MAX_IMAGE_PIXELS`` (1024**3 // 4 // 3): about 89.5 megapixels, e.g. 9459 x 9459.
DEFAULT_MAX_PIXELS = 89_478_485

_PILLOW_LIMIT_LOCK = threading.Lock()

# Modes whose alpha is composited on the fill colour, and the Pillow mode each is converted to first.
_ALPHA_MODES = {"RGBA": "RGBA", "RGBa": "RGBA", "LA": "LA", "La": "LA", "PA": "RGBA"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the file, says why, and what to do about it.

    ``reason`` is a short category for counting skipped samples: ``missing``, ``empty``, ``not_image``,
    ``corrupt``, ``too_large`` or ``unreadable``.
    """

    def __init__(self, message: str, reason: str = "unreadable") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # keep ``reason`` across processes (DataLoader workers)
        return (type(self), (str(self), self.reason))


# ----------------------------------------------------------------------------------------------------------------
# Mode conversion


def to_rgb(img: Image.Image, fill_color: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow image to 8-bit ``RGB``; returns ``img`` itself when it already is RGB.

    Rules, by mode:

    * ``RGB``: unchanged (the same object).
    * ``L``, ``1``, ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``, ``RGBX``: Pillow's ``convert("RGB")``. ``1`` maps to
      0/255; CMYK uses Pillow's naive formula (R = 255 - min(255, C + K)); embedded ICC profiles are not applied.
    * ``RGBA``, ``LA``, ``La``, ``RGBa``, ``PA``, and ``P`` with transparency (a ``transparency`` entry or an RGBA
      palette): alpha-composited on ``fill_color``, ``out = round((c * a + fill * (255 - a)) / 255)`` per channel
      on straight (not premultiplied) colour, so a fully transparent pixel becomes ``fill_color`` and a
      half-transparent one a blend. Premultiplied ``La``/``RGBa`` are un-premultiplied by Pillow first.
    * ``P`` without transparency: looked up through its palette.
    * ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit unsigned): ``round(v * 255 / 65535)``, so 65535 -> 255 and
      32768 -> 128; then grey to RGB.
    * ``I`` (32-bit signed): negative values clip to 0; if the maximum is <= 65535 the data is assumed to be
      16-bit and scaled as above (so an ``I`` image holding 8-bit values comes out dark: convert it yourself if
      that is what you have), otherwise scaled by its own maximum, ``round(v * 255 / max)``.
    * ``F`` (32-bit float): NaN and infinities become 0 and negatives clip to 0; if the maximum is <= 1 the data is
      assumed to lie in [0, 1] (``round(v * 255)``), otherwise it is scaled by its maximum.
    * any other mode: Pillow's ``convert("RGB")`` if Pillow supports it, else ``ValueError`` naming the mode.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _ALPHA_MODES or (mode == "P" and _palette_has_alpha(img)):
        return _composite(img.convert(_ALPHA_MODES.get(mode, "RGBA")), fill_color)
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_deep_to_uint8(np.asarray(img), mode)).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot convert a Pillow image of mode {mode!r} to RGB: {exc}") from exc


def _palette_has_alpha(img: Image.Image) -> bool:
    return "transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA")


def _composite(img: Image.Image, fill_color: tuple[int, int, int]) -> Image.Image:
    """``img`` is ``RGBA`` or ``LA``; Pillow's masked paste rounds exactly: round((c*a + f*(255-a)) / 255)."""
    background = Image.new("RGB", img.size, tuple(fill_color))
    colour = img.convert("RGB") if img.mode == "LA" else img
    background.paste(colour, mask=img.getchannel("A"))
    return background


def _deep_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16/32-bit integer or float pixels (H, W) to uint8 by the rules in :func:`to_rgb`."""
    if mode == "F":
        values = np.where(np.isfinite(values), values, 0.0).clip(min=0.0).astype(np.float64)
        peak = float(values.max(initial=0.0))
        scale = 255.0 if peak <= 1.0 else 255.0 / peak
        return np.rint(values * scale).clip(0, 255).astype(np.uint8)
    values = values.astype(np.int64).clip(min=0)
    peak = int(values.max(initial=0))
    if peak <= 65535:  # 16-bit data; integer rounding is exact (65535 is odd, so there are no ties)
        return ((values * 255 + 32767) // 65535).astype(np.uint8)
    return np.rint(values * (255.0 / peak)).clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_image(
    source: str | Path | bytes | BinaryIO,
    *,
    name: str | None = None,
    fill_color: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Open, fully decode, orient and convert an image to 8-bit RGB.

    ``source`` is a path, the encoded bytes, or a binary file object (read from its start). ``name`` is used in
    error messages (default: the path, the file object's ``name``, or ``<bytes>``). The image is decoded here
    (``load()``), so truncated or corrupt files fail here rather than later in a DataLoader worker; EXIF
    orientation is applied (``ImageOps.exif_transpose``); then :func:`to_rgb` converts the mode, compositing
    transparency on ``fill_color``. Multi-frame files (GIF, TIFF, MPO) give their first frame.

    ``max_pixels`` (width * height) refuses larger images before decoding them; ``None`` turns the check off.
    See the module docstring for how this per-call limit interacts with Pillow's process-wide one.

    Raises :class:`ImageLoadError` (a ``ValueError``) for a missing or unreadable file, an empty file, data that
    is not an image Pillow can read, a truncated or corrupt image, or one over ``max_pixels``.
    """
    label = _label(source, name)
    if isinstance(source, (str, Path)):
        file = _open_file(Path(source), label)
        with file:
            return _decode(file, label, fill_color, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(
                f"{label}: no data (0 bytes); the download or read that produced it failed", reason="empty"
            )
        return _decode(io.BytesIO(source), label, fill_color, max_pixels)
    if hasattr(source, "read"):
        seekable = getattr(source, "seekable", None)
        if seekable is None or not seekable():  # Pillow and the bomb-guard retry both need to seek
            source = io.BytesIO(source.read())
        return _decode(source, label, fill_color, max_pixels)
    raise TypeError(
        f"load_image expects a path, bytes or a binary file object, got {type(source).__name__}; "
        "for an in-memory PIL image use clipforge.images.to_rgb"
    )


def _label(source: object, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    stream_name = getattr(source, "name", None)
    return os.fsdecode(stream_name) if isinstance(stream_name, (str, bytes, os.PathLike)) else "<stream>"


def _open_file(path: Path, label: str) -> BinaryIO:
    if "\x00" in str(path):  # the OS cannot name such a file; open() would raise a bare ValueError
        raise ImageLoadError(
            f"{label!r}: the path contains a NUL character, so no such file can exist; check where the path "
            "came from (a damaged table or shard field)",
            reason="missing",
        )
    try:
        if path.is_dir():
            raise ImageLoadError(
                f"{label}: is a directory, not an image file; pass the path of an image file"
            )
        file = open(path, "rb")  # noqa: SIM115 - closed by the caller's with-block
    except FileNotFoundError:
        raise ImageLoadError(
            f"{label}: file not found; check the path (and the working directory)", reason="missing"
        ) from None
    except OSError as exc:
        raise ImageLoadError(
            f"{label}: cannot open the file ({exc.strerror or exc}); check that it exists and is readable",
            reason="unreadable",
        ) from exc
    if os.fstat(file.fileno()).st_size == 0:
        file.close()
        raise ImageLoadError(
            f"{label}: file is empty (0 bytes); re-create or re-download it, or drop it from the dataset",
            reason="empty",
        )
    return file


def _decode(
    file: BinaryIO, label: str, fill_color: tuple[int, int, int], max_pixels: int | None
) -> Image.Image:
    try:
        return _open_and_convert(file, label, fill_color, max_pixels)
    except Image.DecompressionBombError as exc:
        pixels = _pixels_from_pillow_message(str(exc))
        if pixels is not None and (max_pixels is None or pixels <= max_pixels):
            return _open_with_pillow_limit(file, label, fill_color, max_pixels, pixels)
        raise ImageLoadError(_too_large_message(label, pixels, max_pixels), reason="too_large") from None


def _open_and_convert(
    file: BinaryIO, label: str, fill_color: tuple[int, int, int], max_pixels: int | None
) -> Image.Image:
    """Open, check the size, decode, orient, convert. Pillow's bomb error passes through for :func:`_decode`."""
    try:
        image = Image.open(file)
    except UnidentifiedImageError:
        if _stream_is_empty(file):
            raise ImageLoadError(
                f"{label}: file is empty (0 bytes); re-create or re-download it", reason="empty"
            ) from None
        raise ImageLoadError(
            f"{label}: not an image Pillow can read (unknown format, or a damaged header); check that the file "
            "really is an image (not an HTML error page or text), or drop it from the dataset",
            reason="not_image",
        ) from None
    except _PASS_THROUGH:
        raise
    except Exception as exc:  # decoders of untrusted data raise many types; all of them mean "corrupt file"
        raise _corrupt(label, "header", exc) from exc
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageLoadError(
                _too_large_message(label, width * height, max_pixels, (width, height)), reason="too_large"
            )
        try:
            image.load()
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            raise _corrupt(label, "data", exc) from exc
        image = _apply_exif_orientation(image, label)
        try:
            return to_rgb(image, fill_color)
        except (OSError, ValueError) as exc:
            raise ImageLoadError(
                f"{label}: decoded as mode {image.mode!r} but could not be converted to RGB ({exc}); "
                "convert it to a common format (PNG/JPEG) first",
                reason="unreadable",
            ) from exc


# Not "this file is corrupt": handled by the caller (bomb guard) or not about the file at all (out of memory).
_PASS_THROUGH = (Image.DecompressionBombError, MemoryError)


def _corrupt(label: str, part: str, exc: Exception) -> ImageLoadError:
    return ImageLoadError(
        f"{label}: the image {part} is truncated or corrupt ({type(exc).__name__}: {exc}); re-download or "
        "re-encode the file, or drop it from the dataset",
        reason="corrupt",
    )


def _apply_exif_orientation(image: Image.Image, label: str) -> Image.Image:
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the (common) unrotated image
    except Exception as exc:  # a damaged EXIF block should not cost the image: keep it as stored, but say so
        warnings.warn(
            f"{label}: EXIF orientation could not be read ({type(exc).__name__}: {exc}); "
            "the image is used as stored, unrotated",
            stacklevel=5,
        )
    return image


def _open_with_pillow_limit(
    file: BinaryIO, label: str, fill_color: tuple[int, int, int], max_pixels: int | None, pixels: int
) -> Image.Image:
    """Decode an image Pillow's global guard refuses but ``max_pixels`` allows (see the module docstring)."""
    with _PILLOW_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = pixels
        try:
            file.seek(0)
            return _open_and_convert(file, label, fill_color, max_pixels)
        except Image.DecompressionBombError as exc:  # e.g. a later GIF/TIFF frame larger than the header says
            raise ImageLoadError(
                _too_large_message(label, _pixels_from_pillow_message(str(exc)), max_pixels),
                reason="too_large",
            ) from None
        finally:
            if pixels == Image.MAX_IMAGE_PIXELS:
                Image.MAX_IMAGE_PIXELS = previous


def _pixels_from_pillow_message(message: str) -> int | None:
    match = re.search(r"\((\d+) pixels\)", message)
    return int(match.group(1)) if match else None


def _too_large_message(
    label: str, pixels: int | None, max_pixels: int | None, size: tuple[int, int] | None = None
) -> str:
    if pixels is None:  # Pillow refused it and its message format changed: say what we know
        what, fix = "too large", "max_pixels=None"
    else:
        what = f"{size[0]}x{size[1]} = {pixels:,} pixels" if size else f"{pixels:,} pixels"
        fix = f"a larger max_pixels (e.g. max_pixels={pixels:_}) or max_pixels=None"
    limit = f"max_pixels={max_pixels:,}" if max_pixels is not None else "Pillow's Image.MAX_IMAGE_PIXELS"
    return (
        f"{label}: image is {what}, over the limit {limit} (a decompression-bomb guard); "
        f"if the file is trusted, pass {fix} to load_image"
    )


def _stream_is_empty(file: BinaryIO) -> bool:
    try:
        position = file.tell()
        end = file.seek(0, io.SEEK_END)
        file.seek(position)
    except (OSError, AttributeError, ValueError):
        return False
    return end == 0
