"""Image decoding: every Pillow mode to RGB by known pixel values, EXIF orientation, and each failure as an
ImageLoadError that names the file."""

from __future__ import annotations

import io
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, to_rgb

WHITE = (255, 255, 255)


def pixels(img: Image.Image) -> list[tuple[int, int, int]]:
    assert img.mode == "RGB"
    return [tuple(p) for p in np.asarray(img).reshape(-1, 3).tolist()]


def row(mode: str, values: list) -> Image.Image:
    """A 1-row image of ``mode`` holding ``values``."""
    img = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        img.putpixel((x, 0), value)
    return img


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


# ----------------------------------------------------------------------------------------------------------------
# to_rgb


def test_rgb_is_returned_unchanged():
    img = noise(4, 3)
    assert to_rgb(img) is img


def test_rgba_composites_on_the_fill_colour():
    img = row("RGBA", [(255, 0, 0, 0), (0, 0, 255, 128), (10, 20, 30, 255)])
    assert pixels(to_rgb(img)) == [WHITE, (127, 127, 255), (10, 20, 30)]
    assert pixels(to_rgb(img, fill_color=(0, 0, 0))) == [(0, 0, 0), (0, 0, 128), (10, 20, 30)]


def test_composite_rounds_exactly_for_every_alpha():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (256, 64, 4), dtype=np.uint8)
    rgba[:, :, 3] = np.arange(256, dtype=np.uint8)[:, None]
    fill = np.array([200, 17, 99])
    colour, alpha = rgba[..., :3].astype(np.int64), rgba[..., 3:].astype(np.int64)
    expected = np.rint((colour * alpha + fill * (255 - alpha)) / 255).astype(np.uint8)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"), tuple(fill))), expected)


def test_grey_alpha_and_premultiplied_modes():
    assert pixels(to_rgb(row("LA", [(0, 128), (200, 255), (9, 0)]))) == [(127,) * 3, (200,) * 3, WHITE]
    # premultiplied grey 64 at alpha 128 is straight grey 127; on white: (127*128 + 255*127) / 255 = 190.75
    assert pixels(to_rgb(row("La", [(64, 128)]))) == [(191,) * 3]
    assert pixels(to_rgb(row("RGBa", [(64, 0, 0, 128)]))) == [(191, 127, 127)]


def test_palette_with_and_without_transparency():
    img = Image.new("P", (3, 1))
    img.putpalette([0, 255, 0, 255, 0, 0, 0, 0, 255])
    img.putdata([0, 1, 2])
    assert pixels(to_rgb(img)) == [(0, 255, 0), (255, 0, 0), (0, 0, 255)]

    img.info["transparency"] = 0  # one transparent index (GIF style)
    assert pixels(to_rgb(img, fill_color=(1, 2, 3))) == [(1, 2, 3), (255, 0, 0), (0, 0, 255)]

    img.info["transparency"] = bytes([255, 128, 0])  # per-index alpha (PNG tRNS style)
    assert pixels(to_rgb(img)) == [(0, 255, 0), (255, 127, 127), WHITE]


def test_palette_alpha_mode():
    img = Image.new("PA", (2, 1))
    img.putpalette([0, 0, 0, 255, 0, 0])
    img.putdata([(1, 0), (1, 255)])
    assert pixels(to_rgb(img)) == [WHITE, (255, 0, 0)]


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_sixteen_bit_scales_to_eight(mode):
    values = np.array([[0, 128, 32768, 65535]], dtype=">u2" if mode == "I;16B" else "<u2")
    img = Image.frombytes(mode, (4, 1), values.tobytes())
    assert img.mode == mode
    assert pixels(to_rgb(img)) == [(0,) * 3, (0,) * 3, (128,) * 3, (255,) * 3]  # 128*255/65535 = 0.498 -> 0


def test_thirty_two_bit_integer_and_float():
    as_16_bit = Image.fromarray(np.array([[0, 32768, 65535, -5]], dtype=np.int32), "I")
    assert pixels(to_rgb(as_16_bit)) == [(0,) * 3, (128,) * 3, (255,) * 3, (0,) * 3]
    by_max = Image.fromarray(np.array([[0, 25_000, 100_000]], dtype=np.int32), "I")
    assert pixels(to_rgb(by_max)) == [(0,) * 3, (64,) * 3, (255,) * 3]  # 63.75 -> 64

    unit = Image.fromarray(np.array([[0.0, 0.25, 1.0, np.nan, -1.0]], dtype=np.float32), "F")
    assert pixels(to_rgb(unit)) == [(0,) * 3, (64,) * 3, (255,) * 3, (0,) * 3, (0,) * 3]
    by_max_f = Image.fromarray(np.array([[0.0, 1.0, 4.0]], dtype=np.float32), "F")
    assert pixels(to_rgb(by_max_f)) == [(0,) * 3, (64,) * 3, (255,) * 3]


def test_grey_bilevel_and_colour_spaces():
    assert pixels(to_rgb(row("L", [0, 77, 255]))) == [(0,) * 3, (77,) * 3, (255,) * 3]
    assert pixels(to_rgb(row("1", [0, 1]))) == [(0,) * 3, WHITE]
    cmyk = row("CMYK", [(0, 0, 0, 0), (0, 0, 0, 255), (255, 0, 0, 0), (0, 255, 255, 0)])
    assert pixels(to_rgb(cmyk)) == [WHITE, (0, 0, 0), (0, 255, 255), (255, 0, 0)]
    assert pixels(to_rgb(row("YCbCr", [(255, 128, 128), (0, 128, 128)]))) == [WHITE, (0, 0, 0)]
    assert pixels(to_rgb(row("HSV", [(0, 255, 255)]))) == [(255, 0, 0)]
    lab_white, lab_black = pixels(to_rgb(row("LAB", [(255, 128, 128), (0, 128, 128)])))
    assert min(lab_white) >= 253 and max(lab_black) <= 2


# ----------------------------------------------------------------------------------------------------------------
# load_image: good files


def test_loads_png_jpeg_bytes_and_streams(tmp_path):
    img = noise(30, 20)
    png = save(img, tmp_path / "a.png")
    loaded = load_image(png)
    assert loaded.mode == "RGB" and loaded.size == (30, 20)
    assert np.array_equal(np.asarray(loaded), np.asarray(img))
    assert load_image(str(save(img, tmp_path / "a.jpg", quality=95))).size == (30, 20)
    data = png.read_bytes()
    assert np.array_equal(np.asarray(load_image(data)), np.asarray(img))
    assert np.array_equal(np.asarray(load_image(io.BytesIO(data))), np.asarray(img))
    with open(png, "rb") as file:
        assert load_image(file).size == (30, 20)


def test_non_seekable_stream(tmp_path):
    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def readinto(self, buffer) -> int:
            chunk = self._data.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    data = save(noise(8, 6), tmp_path / "p.png").read_bytes()
    assert load_image(io.BufferedReader(Pipe(data))).size == (8, 6)


def test_sixteen_bit_png_from_disk(tmp_path):
    values = np.array([[0, 32768], [65535, 257]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # decoded as 16-bit, not pre-reduced
    assert pixels(load_image(path)) == [(0,) * 3, (128,) * 3, (255,) * 3, (1,) * 3]


def test_transparent_png_and_gif_are_composited(tmp_path):
    rgba = row("RGBA", [(255, 0, 0, 0), (0, 0, 255, 128)])
    assert pixels(load_image(save(rgba, tmp_path / "t.png"))) == [WHITE, (127, 127, 255)]
    assert pixels(load_image(save(rgba, tmp_path / "t.png"), fill_color=(0, 0, 0))) == [
        (0, 0, 0),
        (0, 0, 128),
    ]
    gif = Image.new("P", (2, 1))
    gif.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    gif.putdata([0, 1])
    assert pixels(load_image(save(gif, tmp_path / "t.gif", transparency=0))) == [WHITE, (255, 0, 0)]


@pytest.mark.parametrize(
    ("orientation", "top", "bottom"), [(6, "red", "blue"), (8, "blue", "red"), (1, None, None)]
)
def test_exif_orientation_is_applied(tmp_path, orientation, top, bottom):
    # Stored 40x20: left half red, right half blue. Orientation 6 = rotate 90° clockwise for display (left edge
    # to the top), 8 = counter-clockwise (left edge to the bottom).
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(Image.fromarray(stored), tmp_path / "o.jpg", exif=exif, quality=95)
    loaded = np.asarray(load_image(path)).astype(int)
    if orientation == 1:
        assert loaded.shape == (20, 40, 3)
        return
    assert loaded.shape == (40, 20, 3)
    colour = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    assert np.abs(loaded[5, 10] - colour[top]).max() < 40
    assert np.abs(loaded[35, 10] - colour[bottom]).max() < 40


# ----------------------------------------------------------------------------------------------------------------
# load_image: failures


def expect_error(source, *fragments: str, **kwargs) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert isinstance(info.value, ValueError)
    return message


def test_missing_empty_directory_and_text_files(tmp_path):
    expect_error(tmp_path / "missing.jpg", str(tmp_path / "missing.jpg"), "not found", "check the path")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    expect_error(empty, str(empty), "empty", "0 bytes")
    expect_error(tmp_path, str(tmp_path), "directory")
    text = tmp_path / "notes.jpg"
    text.write_text("<html>404 not found</html>\n")
    expect_error(text, str(text), "not an image", "drop it")


@pytest.mark.parametrize(("suffix", "keep"), [(".png", 0.5), (".jpg", 0.6), (".png", 0.05)])
def test_truncated_files(tmp_path, suffix, keep):
    path = save(noise(64, 64), tmp_path / f"cut{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    message = expect_error(path, str(path))
    assert "truncated or corrupt" in message or "not an image" in message  # a cut header is unrecognisable
    if keep >= 0.5:
        assert "truncated or corrupt" in message


def test_bytes_and_streams_are_named(tmp_path):
    expect_error(b"", "<bytes>", "0 bytes")
    expect_error(b"plain text", "shard-7/000123.jpg", "not an image", name="shard-7/000123.jpg")
    expect_error(io.BytesIO(b"plain text"), "<stream>")
    expect_error(io.BytesIO(b""), "<stream>", "empty")
    text = tmp_path / "named.bin"
    text.write_bytes(b"not an image at all")
    with open(text, "rb") as file:
        expect_error(file, str(text))
    with pytest.raises(TypeError, match="to_rgb"):
        load_image(Image.new("RGB", (2, 2)))


def test_decompression_bomb_over_max_pixels(tmp_path):
    path = save(noise(20, 20), tmp_path / "bomb.png")
    message = expect_error(
        path, str(path), "20x20 = 400 pixels", "max_pixels=100", "max_pixels=None", max_pixels=100
    )
    assert "decompression" in message
    assert load_image(path, max_pixels=400).size == (20, 20)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit grey) with almost no pixel data: cheap to refuse."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def test_real_over_limit_header_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(
        png_header_only(13_400, 13_400)
    )  # 179.6 MP: over twice Pillow's limit, so Pillow refuses too
    expect_error(path, str(path), "179,560,000 pixels", f"max_pixels={DEFAULT_MAX_PIXELS:,}")
    expect_error(path, "179,560,000 pixels", "max_pixels=1,000", max_pixels=1000)


def test_max_pixels_overrides_pillows_global_guard_per_call(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses > 200 pixels, warns > 100
    path = save(noise(20, 20), tmp_path / "big.png")
    assert load_image(path, max_pixels=None).size == (20, 20)
    assert load_image(path).size == (
        20,
        20,
    )  # clipforge's default is its own fixed number, not Pillow's global
    assert Image.MAX_IMAGE_PIXELS == 100  # restored
    expect_error(path, "400 pixels", "max_pixels=300", max_pixels=300)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.warns(
        Image.DecompressionBombWarning
    ):  # between Pillow's limit and twice it: Pillow only warns
        assert load_image(save(noise(15, 10), tmp_path / "warn.png")).size == (15, 10)


def test_bomb_guard_override_is_thread_safe(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    big = save(noise(20, 20), tmp_path / "big.png")
    small = save(noise(8, 8), tmp_path / "small.png")
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for _ in range(10):
                assert load_image(big if index % 2 else small, max_pixels=None).size in {(20, 20), (8, 8)}
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert Image.MAX_IMAGE_PIXELS == 100


def test_load_errors_carry_a_reason_for_skip_counts(tmp_path):
    import pickle

    from clipforge.images import ImageLoadError, load_image

    cases = {
        "missing": tmp_path / "nope.png",
        "empty": tmp_path / "empty.png",
        "not_image": tmp_path / "page.html",
        "corrupt": tmp_path / "cut.png",
    }
    cases["empty"].write_bytes(b"")
    cases["not_image"].write_text("<html>404</html>")
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    cases["corrupt"].write_bytes(good.read_bytes()[:60])
    for reason, path in cases.items():
        with pytest.raises(ImageLoadError) as err:
            load_image(path)
        assert err.value.reason == reason, path
        assert pickle.loads(pickle.dumps(err.value)).reason == reason
    with pytest.raises(ImageLoadError) as err:
        load_image(good, max_pixels=100)
    assert err.value.reason == "too_large"
