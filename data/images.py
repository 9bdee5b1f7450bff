"""Image bytes -> RGB PIL images, with every failure mapped to a skip reason and every fix counted."""

from __future__ import annotations

import hashlib

import io
import warnings

from PIL import Image

from .schema import BadSample

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000; larger is far beyond AnyRes and a decompression-bomb risk


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str | None]:
    """Decode ``data`` fully and return (RGB image, conversion name or None).

    Raises :class:`BadSample` ``corrupt_image`` for bytes PIL cannot decode and ``image_too_large`` when the
    header announces more than ``max_pixels`` pixels (checked before the pixels are decoded).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadSample("image_too_large", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
            img.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    if w < 1 or h < 1:
        raise BadSample("corrupt_image", f"empty image {w}x{h}")
    return to_rgb(img)


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Grayscale, alpha and palette images become RGB (alpha composited on white); says which fix it made."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("L", "1", "I", "I;16", "F"):
        kind = "converted_grayscale"
    elif mode in ("RGBA", "LA", "PA"):
        kind = "converted_rgba"
    elif mode == "P":
        kind = "converted_palette"
    else:
        kind = "converted_other"
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), kind
    if img.mode in ("I", "I;16", "F"):
        img = img.point(lambda v: v * (255.0 / 65535.0)) if img.mode != "F" else img
        img = img.convert("L")
    return img.convert("RGB"), kind


def image_bytes(img: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG" if fmt == "png" else "JPEG", **({} if fmt == "png" else {"quality": 95}))
    return buf.getvalue()


def sniff_ext(data: bytes) -> str:
    """Shard member extension for encoded image bytes (PNG/JPEG/WebP), else ``png`` after re-encoding."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return ""


def image_fingerprint(img: Image.Image) -> str:
    """Pixel identity of an RGB image (what a PNG round trip keeps): swapped-image control, excluded images."""
    return hashlib.sha1(img.tobytes() + repr(img.size).encode()).hexdigest()
