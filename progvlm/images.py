"""Image input: anything Pillow reads becomes a correct RGB frame, or a clear error.

Two ways in, kept apart so that their costs are not confused:
  * load_image: an image FILE (PNG, JPEG, … as bytes, a path or a file object) → RGB frame.
    Container decoding is host work: a camera delivers pixels, not files.
  * raw_frame: pixels as a camera delivers them (an H×W×3 uint8 array, or RGB24 bytes with
    their width and height) → RGB frame, validated, nothing decoded. The device's stages
    start here.

load_image handles alpha (composited over white), palettes, greyscale, 16-bit and 32-bit
integer or float greyscale (rescaled, not clipped), CMYK, and EXIF orientation. Size is checked
from the header (raw_frame: from the dimensions), before any pixel is decoded or read, against
a configured pixel limit.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = int(os.environ.get("PROGVLM_MAX_PIXELS", 40_000_000))


class ImageInputError(ValueError):
    """The input is not a usable image; the message names the problem."""


def load_image(source, max_pixels: int | None = None) -> Image.Image:
    """bytes, a path, a file object or a PIL image → an RGB PIL image (EXIF-upright).

    Every way untrusted data can make Pillow fail (unidentified format, truncated or corrupt
    data, a decompression bomb, a PNG text chunk that inflates past Pillow's limit, zlib or
    struct errors in a plugin, …) becomes ImageInputError with the reason."""
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise ImageInputError("not an image: the upload is empty (0 bytes)")
            fp = io.BytesIO(bytes(source))
        elif isinstance(source, (str, Path)):
            if not Path(source).is_file():
                raise ImageInputError(f"no such image file: {source}")
            if Path(source).stat().st_size == 0:
                raise ImageInputError("not an image: the file is empty (0 bytes)")
            fp = source
        else:
            fp = source
        try:
            img = Image.open(fp)
        except UnidentifiedImageError:
            if _empty(fp):
                raise ImageInputError("not an image: the data is empty (0 bytes)") from None
            raise ImageInputError("not an image: Pillow cannot identify this data as any image "
                                  "format") from None
        except Image.DecompressionBombError as e:
            raise ImageInputError(f"image too large: {e}") from None
        except Exception as e:  # noqa: BLE001 - any failure to parse untrusted bytes
            raise ImageInputError(f"unreadable image: {_reason(e)}") from None
    try:
        w, h = img.size
    except Exception as e:  # noqa: BLE001
        raise ImageInputError(f"unreadable image: {_reason(e)}") from None
    if w * h > max_pixels:
        raise ImageInputError(f"image too large: {w}×{h} = {w * h:,} pixels, over the limit of "
                              f"{max_pixels:,} pixels")
    if w == 0 or h == 0:
        raise ImageInputError(f"image has no pixels ({w}×{h})")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"image too large: {e}") from None
    except Exception as e:  # noqa: BLE001 - ValueError, OSError, SyntaxError, EOFError, zlib, struct …
        raise ImageInputError(f"corrupt or truncated image ({getattr(img, 'format', None) or 'unknown'}): "
                              f"{_reason(e)}") from None


def raw_frame(pixels, width: int | None = None, height: int | None = None,
              max_pixels: int | None = None) -> Image.Image:
    """A camera frame → an RGB PIL image, with no container to decode.

    `pixels`: an H×W×3 uint8 NumPy array (RGB, rows top to bottom), or RGB24 bytes (3 bytes per
    pixel, row-major, no padding) with `width` and `height`. Given with an array, `width` and
    `height` must match its shape. Raises ImageInputError naming what is wrong: not RGB24 or
    H×W×3 uint8, a zero or negative dimension, more pixels than `max_pixels`, or a byte count
    that is not width × height × 3."""
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(pixels, np.ndarray):
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ImageInputError(f"a raw frame is an H×W×3 RGB array; got shape {pixels.shape}")
        if pixels.dtype != np.uint8:
            raise ImageInputError(f"a raw frame holds uint8 RGB values (0..255); got {pixels.dtype}")
        h, w = pixels.shape[:2]
        for name, given, actual in (("width", width, w), ("height", height, h)):
            if given is not None and given != actual:
                raise ImageInputError(f"frame {name} {given} does not match the array's {actual} "
                                      f"(shape {pixels.shape}: height × width × 3)")
        _check_frame_size(w, h, max_pixels)
        return Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    if not isinstance(pixels, (bytes, bytearray, memoryview)):
        raise ImageInputError(f"a raw frame is RGB24 bytes or an H×W×3 uint8 array; got "
                              f"{type(pixels).__name__}")
    if width is None or height is None:
        raise ImageInputError("raw RGB24 bytes need the frame's width and height")
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ImageInputError(f"frame {name} must be an integer, got {value!r}")
    _check_frame_size(int(width), int(height), max_pixels)
    expected = int(width) * int(height) * 3
    if len(memoryview(pixels).cast("B")) != expected:
        raise ImageInputError(f"an RGB24 frame of {width}×{height} is {expected:,} bytes (3 per "
                              f"pixel); got {len(memoryview(pixels).cast('B')):,}")
    return Image.frombuffer("RGB", (int(width), int(height)), bytes(pixels), "raw", "RGB", 0, 1)


def _check_frame_size(width: int, height: int, max_pixels: int):
    if width <= 0 or height <= 0:
        raise ImageInputError(f"frame has no pixels ({width}×{height}): width and height must be "
                              "at least 1")
    if width * height > max_pixels:
        raise ImageInputError(f"frame too large: {width}×{height} = {width * height:,} pixels, "
                              f"over the limit of {max_pixels:,} pixels")


def _empty(fp) -> bool:
    try:
        return fp.seek(0, io.SEEK_END) == 0
    except Exception:  # noqa: BLE001 - not seekable: cannot tell
        return False


def _reason(e: Exception) -> str:
    return str(e) or type(e).__name__


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16/32-bit greyscale: rescale the value range to 8 bits instead of clipping to 255
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or (mode == "I" and a.max() > 255) else 255.0
        if mode == "F":
            lo, hi = float(a.min()), float(a.max())
            a, top = (a - lo), (hi - lo) or 1.0
        if mode == "I" and a.max() > 65535:
            top = float(a.max())
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def resize_for_model(img: Image.Image, size: int) -> Image.Image:
    """The one resize used in training and at inference (square, bilinear, antialiased)."""
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.BILINEAR, reducing_gap=2.0)


JPEG_MAX_SIDE = 65_500  # libjpeg's limit on either side of a JPEG


def fit_jpeg(img: Image.Image) -> Image.Image:
    """`img`, or where a side is over JPEG's limit (JPEG_MAX_SIDE) the image downscaled to fit,
    aspect kept: what a camera sending JPEG has to do with such a frame."""
    w, h = img.size
    if max(w, h) <= JPEG_MAX_SIDE:
        return img
    scale = JPEG_MAX_SIDE / max(w, h)
    return img.resize((max(1, min(JPEG_MAX_SIDE, round(w * scale))),
                       max(1, min(JPEG_MAX_SIDE, round(h * scale)))), Image.BILINEAR)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """The one JPEG encoder (full-cloud's frame, the baselines, the bench): an RGB image →
    JPEG bytes at `quality`, fitted to JPEG's side limit first (fit_jpeg)."""
    buf = io.BytesIO()
    fit_jpeg(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# The bundled VLM's pixel normalisation. NumPy only: the edge runtime without PyTorch uses it too.
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25


def normalise_frames(frames: np.ndarray) -> np.ndarray:
    """(B, S, S, 3) uint8 → normalised (B, 3, S, S) float32, the bundled VLM's input."""
    x = np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
    return (x - PIXEL_MEAN) / PIXEL_STD


def model_input(img: Image.Image, size: int) -> np.ndarray:
    """One RGB image → the bundled VLM's input (1, 3, size, size) float32."""
    return normalise_frames(np.asarray(resize_for_model(to_rgb(img), size))[None])

