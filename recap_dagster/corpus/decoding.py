"""Robust decoding of web images (LAION-style bytes) into RGB PIL images.

``decode_image`` never raises for bad input: every outcome is a ``DecodeResult`` with a
status from a small vocabulary, so a corpus pipeline can keep a row for every sample.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

STATUS_OK = "ok"
STATUS_DECODE_ERROR = "decode_error"
STATUS_TOO_LARGE = "too_large"
STATUS_MISSING = "missing"

# Pillow's own decompression-bomb warning threshold (~89.5 MP). Keeping ours equal means an
# image we accept never trips Pillow's warning; above 2x this Pillow refuses at open time
# regardless of ``max_pixels`` (reported as "too_large" too).
DEFAULT_MAX_PIXELS = 89_478_485

_TRUNCATION_LOCK = threading.Lock()
# PostScript is decoded by running Ghostscript on the bytes: never for untrusted input.
_REFUSED_FORMATS = frozenset({"EPS"})


@dataclass(frozen=True)
class DecodeResult:
    """Outcome of ``decode_image``; ``image`` is RGB when ``status == "ok"``, else None.

    ``width``/``height`` are the post-EXIF-rotation size when decoded, the header size when
    the header was readable but decoding was refused or failed, else None.
    """

    image: Image.Image | None
    status: str
    error: str | None
    width: int | None
    height: int | None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


@contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make truncated files raise even if someone set LOAD_TRUNCATED_IMAGES globally.

    The flag is a module global, so the override is serialised with a lock; the common path
    (flag already False) takes no lock and keeps decoding parallel across threads.
    """
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _TRUNCATION_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


# PIL names the in-memory file it could not read, address and all ("<_io.BytesIO object at
# 0x7f...>"): the same bytes would give another message in every process.
_OBJECT_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


def _describe(exc: BaseException) -> str:
    return _OBJECT_ADDRESS.sub(">", f"{type(exc).__name__}: {exc}")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale single-channel 16/32-bit integer or float images to 8-bit L by value range."""
    arr = np.asarray(image)
    if image.mode.startswith("I;16"):
        # Full 16-bit range: 65535 / 257 == 255 exactly, so scaling is exact at both ends.
        scaled = np.rint(arr.astype(np.float64) / 257.0)
    elif image.mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        # Pillow (and older versions for 16-bit PNG) store 16-bit samples in 32-bit "I".
        scaled = np.rint(arr.astype(np.float64) / 257.0)
    elif image.mode == "F" and arr.size and np.nanmin(arr) >= 0.0 and np.nanmax(arr) <= 1.0:
        scaled = np.rint(np.nan_to_num(arr) * 255.0)
    else:
        # Unknown range (signed 32-bit, HDR floats): stretch min..max onto 0..255.
        arr = np.nan_to_num(arr.astype(np.float64))
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        scaled = np.zeros_like(arr) if hi <= lo else np.rint((arr - lo) * (255.0 / (hi - lo)))
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB; transparency is composited onto white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _to_8bit(image).convert("RGB")
    has_alpha = mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (
        mode in {"P", "L", "RGB"} and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _allowed_formats() -> list[str]:
    # Computed per call so plugins registered later (e.g. pillow-heif) are honoured.
    Image.init()
    return [fmt for fmt in Image.ID if fmt not in _REFUSED_FORMATS]


def decode_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodeResult:
    """Decode encoded image bytes into an RGB image, never raising for bad bytes.

    The header size is checked against ``max_pixels`` before any pixel data is decoded, so
    a decompression bomb costs only a header parse. EXIF orientation is applied. PostScript
    (EPS) is refused, as Pillow would hand it to Ghostscript.
    """
    if not data:
        return DecodeResult(None, STATUS_MISSING, "no image bytes", None, None)
    width = height = None
    formats = _allowed_formats()
    try:
        with _strict_truncation(), Image.open(io.BytesIO(data), formats=formats) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                return DecodeResult(
                    None,
                    STATUS_TOO_LARGE,
                    f"{width}x{height} = {width * height} pixels exceeds max_pixels {max_pixels}",
                    width,
                    height,
                )
            # load() inside the strict context: a truncated stream raises here instead
            # of returning a half-grey image.
            opened.load()
            image: Image.Image = opened
            try:
                image = ImageOps.exif_transpose(opened) or opened
            except Exception:  # a broken EXIF block must not lose the image
                image = opened
            rgb = _to_rgb(image)
            if rgb is opened:
                # Detach from the file object closed by the ``with`` block.
                rgb = rgb.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (or its warning escalated to an error by a warnings filter).
        return DecodeResult(None, STATUS_TOO_LARGE, _describe(exc), width, height)
    except Exception as exc:  # the contract: never raise for bad bytes
        return DecodeResult(None, STATUS_DECODE_ERROR, _describe(exc), width, height)
    return DecodeResult(rgb, STATUS_OK, None, rgb.width, rgb.height)
