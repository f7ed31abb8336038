"""decode_image on every kind of bad or unusual input a web corpus holds."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from recap_dagster.corpus.decoding import (
    DEFAULT_MAX_PIXELS,
    STATUS_DECODE_ERROR,
    STATUS_MISSING,
    STATUS_OK,
    STATUS_TOO_LARGE,
    decode_image,
)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def png_claiming_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR is rewritten (with a valid CRC) to claim width x height."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr_start = 8 + 8  # signature, then chunk length + type
    data[ihdr_start : ihdr_start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr_start + 13]))
    data[ihdr_start + 13 : ihdr_start + 17] = struct.pack(">I", crc)
    return bytes(data)


def assert_ok(result, size: tuple[int, int]) -> Image.Image:
    assert result.status == STATUS_OK, result.error
    assert result.error is None
    assert result.image is not None and result.image.mode == "RGB"
    assert result.image.size == size
    assert (result.width, result.height) == size
    return result.image


@pytest.mark.parametrize("data", [None, b""])
def test_missing(data):
    result = decode_image(data)
    assert (result.status, result.image, result.width, result.height) == (
        STATUS_MISSING,
        None,
        None,
        None,
    )
    assert result.error == "no image bytes"


def test_plain_jpeg():
    image = assert_ok(decode_image(encode(noise_rgb(48, 32), "JPEG")), (48, 32))
    assert image.getpixel((0, 0)) is not None


def test_not_an_image():
    result = decode_image(b"<html><body>404 Not Found</body></html>")
    assert result.status == STATUS_DECODE_ERROR
    assert result.image is None and result.width is None and result.height is None
    assert result.error.startswith("UnidentifiedImageError")


def test_postscript_is_refused():
    data = encode(Image.new("RGB", (8, 8), "red"), "EPS")
    assert data.startswith(b"%!PS")
    result = decode_image(data)
    assert result.status == STATUS_DECODE_ERROR
    assert result.error.startswith("UnidentifiedImageError")


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_jpeg_is_an_error(keep):
    data = encode(noise_rgb(64, 64), "JPEG", quality=95)
    result = decode_image(data[: int(len(data) * keep)])
    assert result.status == STATUS_DECODE_ERROR
    assert result.image is None
    assert "truncated" in result.error
    # the header was readable, so its size is reported
    assert (result.width, result.height) == (64, 64)


def test_truncated_jpeg_is_an_error_even_if_pillow_was_told_to_load_truncated(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(noise_rgb(64, 64), "JPEG")
    result = decode_image(data[: len(data) // 2])
    assert result.status == STATUS_DECODE_ERROR
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_truncated_png_is_an_error():
    data = encode(noise_rgb(64, 64), "PNG")
    result = decode_image(data[: len(data) // 2])
    assert result.status == STATUS_DECODE_ERROR
    assert result.image is None


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_header_is_refused_before_decoding():
    # 10000 x 9000 = 90 MP: over DEFAULT_MAX_PIXELS, under Pillow's own hard limit (2x). The
    # body is a single pixel, so decoding would fail: too_large proves the check came first.
    assert DEFAULT_MAX_PIXELS < 10_000 * 9_000
    result = decode_image(png_claiming_size(10_000, 9_000))
    assert result.status == STATUS_TOO_LARGE
    assert result.image is None
    assert (result.width, result.height) == (10_000, 9_000)
    assert result.error == f"10000x9000 = 90000000 pixels exceeds max_pixels {DEFAULT_MAX_PIXELS}"


def test_real_image_over_small_max_pixels():
    data = encode(noise_rgb(40, 30), "JPEG")
    result = decode_image(data, max_pixels=40 * 30 - 1)
    assert result.status == STATUS_TOO_LARGE
    assert (result.width, result.height) == (40, 30)
    assert_ok(decode_image(data, max_pixels=40 * 30), (40, 30))


def test_pillow_bomb_warning_escalated_to_error_is_too_large():
    # Someone ran with warnings as errors and a max_pixels above Pillow's threshold.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        result = decode_image(png_claiming_size(10_000, 9_000), max_pixels=10**9)
    assert result.status == STATUS_TOO_LARGE
    assert result.error.startswith("DecompressionBombWarning")


@pytest.mark.parametrize("max_pixels", [DEFAULT_MAX_PIXELS, 10**12])
def test_pillow_hard_limit_is_too_large(max_pixels):
    # 400 MP is over Pillow's hard limit, which refuses at open time whatever max_pixels says;
    # the size is then unknown.
    result = decode_image(png_claiming_size(20_000, 20_000), max_pixels=max_pixels)
    assert (result.status, result.image, result.width, result.height) == (
        STATUS_TOO_LARGE,
        None,
        None,
        None,
    )
    assert result.error.startswith("DecompressionBombError")


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (20, 10), (0, 255, 255, 0))  # pure red in CMYK
    image = assert_ok(decode_image(encode(cmyk, "JPEG", quality=100)), (20, 10))
    r, g, b = image.getpixel((10, 5))
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize(
    ("mode", "fmt", "value", "expected"),
    [
        ("L", "PNG", 77, (77, 77, 77)),
        ("L", "JPEG", 128, (128, 128, 128)),
        ("1", "PNG", 1, (255, 255, 255)),
        ("1", "PNG", 0, (0, 0, 0)),
    ],
)
def test_grayscale(mode, fmt, value, expected):
    image = assert_ok(decode_image(encode(Image.new(mode, (9, 7), value), fmt)), (9, 7))
    assert np.abs(np.array(image.getpixel((4, 3))) - expected).max() <= 1


def test_rgba_composited_onto_white():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    image = assert_ok(decode_image(encode(rgba, "PNG")), (10, 10))
    assert image.getpixel((5, 5)) == (255, 255, 255)
    assert image.getpixel((0, 0)) == (0, 0, 255)
    assert all(abs(channel - 127) <= 1 for channel in image.getpixel((1, 0)))


def test_la_composited_onto_white():
    la = Image.new("LA", (6, 6), (0, 0))
    la.putpixel((2, 2), (50, 255))
    image = assert_ok(decode_image(encode(la, "PNG")), (6, 6))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((2, 2)) == (50, 50, 50)


def test_palette_with_transparency():
    palette_image = Image.new("P", (8, 8), 0)
    palette_image.putpalette([0, 255, 0] + [255, 0, 0] * 255)  # index 0 green, others red
    palette_image.putpixel((3, 3), 1)
    data = encode(palette_image, "PNG", transparency=0)  # green is transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    image = assert_ok(decode_image(data), (8, 8))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((3, 3)) == (255, 0, 0)


def test_palette_without_transparency_gif():
    palette_image = Image.new("P", (5, 4), 0)
    palette_image.putpalette([10, 20, 30] * 256)
    image = assert_ok(decode_image(encode(palette_image, "GIF")), (5, 4))
    assert image.getpixel((0, 0)) == (10, 20, 30)


def test_16bit_png_scaled_not_clipped():
    ramp = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(3, axis=0)
    sixteen = Image.fromarray(ramp)
    assert sixteen.mode == "I;16"
    data = encode(sixteen, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image = assert_ok(decode_image(data), (4, 3))
    row = [image.getpixel((x, 0))[0] for x in range(4)]
    # clipping would give [0, 255, 255, 255]
    assert row == [0, 1, 128, 255]


def test_32bit_int_image_scaled():
    data = encode(Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32), "I"), "TIFF")
    image = assert_ok(decode_image(data), (3, 1))
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 4, 255]


def test_exif_rotated_jpeg():
    source = Image.new("RGB", (40, 20), (255, 255, 255))
    source.paste((255, 0, 0), (0, 0, 10, 10))  # red block at top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(source, "JPEG", exif=exif.tobytes(), quality=100)
    image = assert_ok(decode_image(data), (20, 40))  # width/height are post-rotation
    r, g, b = image.getpixel((15, 5))  # the stored top-left ends up at the top-right
    assert r > 200 and g < 60 and b < 60
    assert image.getpixel((5, 35))[1] > 200  # bottom-left stays white


def test_broken_exif_keeps_the_image():
    data = encode(noise_rgb(10, 10), "JPEG", exif=b"Exif\x00\x00garbage-not-tiff")
    assert_ok(decode_image(data), (10, 10))


def test_webp():
    assert_ok(decode_image(encode(noise_rgb(12, 8), "WEBP")), (12, 8))


def test_decoded_image_is_independent_of_input_bytes():
    data = bytearray(encode(noise_rgb(8, 8), "PNG"))
    image = assert_ok(decode_image(bytes(data)), (8, 8))
    before = image.tobytes()
    data[:] = b"\x00" * len(data)
    assert image.tobytes() == before
