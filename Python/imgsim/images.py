"""Image decoding and the one preprocessing used everywhere.

Preprocessing, the same for every backbone, step and compute context:

1. decode with Pillow, formats ``FORMATS`` only (not TIFF, whose layout alone can make
   opening it costly; BMP uncompressed only: its run-length decoder is Python that a
   crafted file keeps busy); refuse images over ``MAX_PIXELS`` before
   decoding pixels, files whose parts would decode more than they declare (a tile
   outside the image, a JPEG of more than ``MAX_JPEG_SCANS`` scans, a PNG of more than
   ``MAX_PNG_CHUNKS`` chunks or colour profiles, a JPEG or GIF of more than
   ``MAX_HEADER_PARTS`` parts before its image: Pillow parses those in Python, deaf to
   cancels), and images
   whose decoded pixels would not fit the memory allowed (``max_decode_bytes``);
   decode only as many pixels as the result needs: a JPEG is decoded reduced by its
   DCT scaling (1/2, 1/4 or 1/8, the smallest whose shorter side stays at least 288 px),
   an image more than twice as long as wide keeps only its central square (with a margin
   for the resize filter) before anything else, and other formats are box-reduced right
   after decoding, by the factor the final resize would reduce by anyway
   (``reducing_gap`` 3), before any conversion copies them;
2. apply the EXIF orientation (from an EXIF block of at most ``MAX_EXIF_BYTES``);
3. convert to 8-bit RGB: transparency (RGBA, LA, palette with transparency) is
   composited on white, 16-bit and 32-bit grayscale is scaled to 8 bits, CMYK and
   YCbCr are converted by Pillow;
4. resize so the shorter side is 288 px (bilinear, antialiased), then crop the
   central 288 x 288 square (288 rather than ImageNet's 224: textures keep more of
   their detail, worth 2 points of test accuracy on the reference set);
5. inside the backbone's ONNX graph, which takes these uint8 pixels (batch, height,
   width, channel): normalise per channel, ``(x - mean) / std``, with the backbone's
   constants, and lay out channels-first.

Anything Pillow cannot decode raises :class:`ImageError` with the reason.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000
SIZE = 288
# The formats decoded (by content, whatever the file's name): a file of any other format,
# such as an icon that Pillow would decode while merely opening it, is not an image here.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # JPEG includes MPO (phones' JPEGs)
# A progressive JPEG is decoded scan by scan over the whole image, in C, where a cancel
# waits: a file repeating scans could keep a process busy for hours. Encoders write 1 to
# about 20; 32 scans of 40 megapixels take about a second.
MAX_JPEG_SCANS = 32
# Pillow walks a PNG's chunks one by one in Python, before and while decoding: a file of
# millions of empty chunks keeps it busy for a minute, deaf to cancels. Encoders write a
# handful besides IDAT, and IDAT in pieces of 8 KB or more; 100,000 cost ~0.3 s.
MAX_PNG_CHUNKS = 100_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Likewise the segments of a JPEG before its first scan (encoders write some 10 to 30) and
# the blocks of a GIF before its first image (a handful): Pillow parses them in Python.
MAX_HEADER_PARTS = 10_000
# An EXIF block larger than a JPEG can hold is not read (its orientation is not applied):
# Pillow would unpack every value of it.
MAX_EXIF_BYTES = 65_536
REDUCING_GAP = 3.0
# Modes Image.reduce cannot average (palette indices, bilevel, 16-bit): converted first.
CONVERT_FIRST = {"1", "P", "PA", "I;16", "I;16B", "I;16L", "I;16N"}


class ImageError(ValueError):
    """An image that cannot be used; the message is the reason recorded in image_errors.
    ``too_large``: over a limit of size; ``transient``: it could be used with more memory
    (tried again by the next featurize)."""

    def __init__(self, message: str, *, too_large: bool = False, transient: bool = False):
        super().__init__(message)
        self.too_large = too_large or transient
        self.transient = transient


def decode_bytes(image: Image.Image, declared: tuple[int, int]) -> int:
    """Memory that decoding ``image`` (opened, maybe drafted smaller than its ``declared``
    size) takes at its peak, as measured: Pillow keeps 4 bytes a pixel; modes converted
    before reducing need a second copy, a palette with transparency three (the RGBA
    composite); libwebp needs 16 bytes a pixel; a progressive JPEG keeps every DCT
    coefficient of the full-size image, 2 bytes a pixel a component, whatever the draft."""
    width, height = image.size
    per_pixel = 4
    if image.mode in CONVERT_FIRST:
        per_pixel = 12 if "transparency" in image.info else 8
    if image.format == "WEBP":
        per_pixel = 16
    need = width * height * per_pixel
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        need += declared[0] * declared[1] * 2 * len(image.getbands())
    return need


def load_rgb(data: bytes, max_pixels: int = MAX_PIXELS, size: int = SIZE,
             max_decode_bytes: int | None = None, square: bool = False) -> Image.Image:
    """Decode ``data`` to an 8-bit RGB image whose shorter side is at least ``size`` (or
    the image's own, when smaller), or raise ImageError saying why not. ``square``: only
    the central square will be used (keep no more of a very long image)."""
    if not data:
        raise ImageError("empty file")
    if data.startswith(PNG_SIGNATURE):
        _check_png_chunks(data)
    elif data.startswith(b"\xff\xd8"):
        _check_jpeg_header(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        _check_gif_header(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"{width}x{height} pixels is over the limit of {max_pixels}",
                                 too_large=True)
            _check_layout(image, data)
            if image.format == "JPEG" and min(width, height) > size:
                scale = min(width, height) / size
                image.draft("RGB", (int(width / scale), int(height / scale)))
            need = decode_bytes(image, (width, height))
            if max_decode_bytes is not None and need > max_decode_bytes:
                raise ImageError(
                    f"{width}x{height} pixels needs {need >> 20} MB to decode, more than the "
                    f"{max_decode_bytes >> 20} MB the memory setting allows", transient=True)
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            raise ImageError("TIFF files are not decoded: save them as PNG or JPEG") from None
        raise ImageError("not an image (format not recognised)") from None
    except MemoryError:
        raise ImageError("decoding it needs more memory than the memory setting allows",
                         transient=True) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode: {exc}") from None
    exif = _orientation_exif(image)
    if square:
        image = central_band(image, size)
    if image.mode in CONVERT_FIRST:
        image = to_rgb(image)
    factor = int(min(image.size) / size / REDUCING_GAP)
    if factor > 1:
        image = image.reduce(factor)
    if exif is not None:
        try:
            image = ImageOps.exif_transpose(_with_exif(image, exif))
        except Exception:  # a broken EXIF block must not lose an otherwise good image
            pass
    return to_rgb(image)


def _orientation_exif(image: Image.Image):
    """The image's EXIF block, unless there is none or it is too large to unpack."""
    raw = image.info.get("exif")
    if not raw or len(raw) > MAX_EXIF_BYTES:
        return None
    try:
        return image.getexif()
    except Exception:
        return None


def _check_png_chunks(data: bytes) -> None:
    """Refuse, before Pillow reads it, a PNG of more than ``MAX_PNG_CHUNKS`` chunks, or of
    more than one colour profile (each is decompressed, up to 1 MB, in one C call)."""
    position, chunks, profiles = len(PNG_SIGNATURE), 0, 0
    while position + 8 <= len(data):
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise ImageError(f"a PNG of more than {MAX_PNG_CHUNKS} chunks is over the limit")
        length = int.from_bytes(data[position:position + 4], "big")
        kind = data[position + 4:position + 8]
        if kind == b"IEND":
            return
        profiles += kind == b"iCCP"
        if profiles > 1:
            raise ImageError("malformed: a PNG of more than one colour profile (iCCP)")
        position += 12 + length


def _check_jpeg_header(data: bytes) -> None:
    """Refuse, before Pillow reads it, a JPEG of more than ``MAX_HEADER_PARTS`` segments
    (or fill bytes) before its first scan."""
    position, parts = 2, 0
    while position + 4 <= len(data):
        parts += 1
        if parts > MAX_HEADER_PARTS:
            raise ImageError(f"a JPEG of more than {MAX_HEADER_PARTS} segments before its "
                             "image is over the limit")
        if data[position] != 0xFF:
            return  # not a marker: Pillow says what is wrong
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte
            position += 1
        elif marker == 0xDA or 0xD0 <= marker <= 0xD9 or marker == 0x01:
            return  # the first scan (or a marker without a length): the header ends
        else:
            position += 2 + int.from_bytes(data[position + 2:position + 4], "big")


def _check_gif_header(data: bytes) -> None:
    """Refuse, before Pillow reads it, a GIF of more than ``MAX_HEADER_PARTS`` blocks and
    sub-blocks before its first image."""
    position, parts = 13, 0
    if len(data) > 10 and data[10] & 0x80:  # a global colour table
        position += 3 << ((data[10] & 0x07) + 1)
    while position < len(data) and data[position] == 0x21:  # an extension
        position += 2
        while position < len(data) and data[position]:  # its sub-blocks
            parts += 1
            if parts > MAX_HEADER_PARTS:
                raise ImageError(f"a GIF of more than {MAX_HEADER_PARTS} blocks before its "
                                 "image is over the limit")
            position += 1 + data[position]
        position += 1


def _check_layout(image: Image.Image, data: bytes) -> None:
    """Refuse, before decoding, a file whose parts would decode more than it declares: a
    tile reaching outside the image, or a JPEG of more than ``MAX_JPEG_SCANS`` scans."""
    width, height = image.size
    for tile in image.tile or ():
        x0, y0, x1, y1 = tile[1]
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ImageError(f"malformed: a part of {x1 - x0}x{y1 - y0} pixels reaches outside "
                             f"the {width}x{height} image")
    if image.format in ("JPEG", "MPO"):
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise ImageError(f"a JPEG of {scans} scans is over the limit of {MAX_JPEG_SCANS}")
    if image.format == "BMP" and image.info.get("compression") not in (0, 3):
        raise ImageError("a run-length compressed BMP is not decoded: save it as PNG")


def central_band(image: Image.Image, size: int = SIZE) -> Image.Image:
    """Of an image more than twice as long as wide (or tall as wide), the central square
    with a margin wide enough for resizing it to ``size``; other images as they are."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long <= 2 * short:
        return image
    keep = min(long, short + 2 * (math.ceil(2 * short / size) + 2))
    start = (long - keep) // 2
    box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
    return image.crop(box)


def _with_exif(image: Image.Image, exif) -> Image.Image:
    """``image`` carrying ``exif`` (a converted or reduced copy loses the original's)."""
    if exif and not image.getexif():
        image.info["exif"] = exif.tobytes()
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (transparency on white, 16-bit scaled)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        peak = float(array.max()) if array.size else 0.0
        if image.mode.startswith("I;16"):
            top = 65535.0
        else:
            top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
        gray = np.clip(array * np.float32(255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def center_square(image: Image.Image, size: int = SIZE) -> Image.Image:
    """Resize the shorter side to ``size`` and crop the central square."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new, Image.BILINEAR, reducing_gap=3.0)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess(data: bytes, max_pixels: int = MAX_PIXELS,
               max_decode_bytes: int | None = None) -> np.ndarray:
    """Bytes of one image to its ``(SIZE, SIZE, 3)`` uint8 pixels, ready for a backbone
    graph (which normalises them itself)."""
    return np.asarray(center_square(load_rgb(data, max_pixels, SIZE, max_decode_bytes,
                                             square=True)))


def thumbnail(data: bytes, size: int = 96) -> bytes:
    """A small JPEG of the image for reports."""
    image = center_square(load_rgb(data, size=size, square=True), size)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80)
    return out.getvalue()
