"""Test helper: write images (good, odd and broken) into folders.

Other tests import this module (``from imagezoo import ...``; pytest puts the
tests folder on ``sys.path``).  Everything is deterministic and small.

* :func:`pattern_array` / :func:`write_image` - one image from a pattern, in
  any Pillow mode and format.
* :func:`make_class_tree` - ``root/<class>/<i>.png`` images that a tiny CNN
  can tell apart (each class: its own hue and stripe direction, plus noise).
* :func:`photo_array` / :func:`write_photo_jpeg` - a real photo (scikit-image
  sample data) scaled to any size, for decode-speed and geometry tests.
* :func:`png_bytes` - hand-made PNG bytes (16-bit RGB, headers that lie about
  their size) for what Pillow will not write.
* :func:`write_bad_file_zoo` - the odd and broken files a loader must handle,
  each with the outcome expected from :func:`imgcls.data.decode.open_image`.
* Hostile files: :func:`write_fifo` (a named pipe that hangs a naive
  ``open``), :func:`write_extreme_aspect_png` (a real, tiny PNG of e.g.
  1 x 2,000,000 pixels), :func:`write_lying_png` (a header claiming a size
  the data does not have).
"""

from __future__ import annotations

import colorsys
import csv
import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PATTERNS = ("solid", "gradient", "checker", "stripes", "noise", "quadrants")
QUADRANT_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255))  # TL, TR, BL, BR
_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF",
            ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".ppm": "PPM", ".pgm": "PPM"}


# --------------------------------------------------------------------------- single images


def pattern_array(size=(32, 32), pattern="solid", color=(200, 60, 40), seed=0) -> np.ndarray:
    """An (H, W, 3) uint8 image. ``size`` is (W, H) as in Pillow.

    ``quadrants``: top-left red, top-right green, bottom-left blue,
    bottom-right white (``color`` is ignored) - for checking orientation.
    """
    width, height = size
    base = np.array(color, dtype=np.float64)
    yy, xx = np.mgrid[0:height, 0:width]
    if pattern == "solid":
        out = np.broadcast_to(base, (height, width, 3)).copy()
    elif pattern == "gradient":
        ramp = (xx / max(1, width - 1) + yy / max(1, height - 1)) / 2
        out = base * (0.25 + 0.75 * ramp[..., None])
    elif pattern == "checker":
        cells = ((xx // 8 + yy // 8) % 2)[..., None]
        out = np.where(cells, base, 255 - base)
    elif pattern == "stripes":
        out = base * (0.6 + 0.4 * ((xx // 4) % 2))[..., None]
    elif pattern == "noise":
        rng = np.random.default_rng(seed)
        out = base + rng.normal(0, 40, (height, width, 3))
    elif pattern == "quadrants":
        out = np.empty((height, width, 3))
        top, left = yy < height // 2, xx < width // 2
        for mask, col in zip((top & left, top & ~left, ~top & left, ~top & ~left), QUADRANT_COLORS):
            out[mask] = col
    else:
        raise ValueError(f"unknown pattern {pattern!r}; use one of {PATTERNS}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_image(path, size=(32, 32), color=(200, 60, 40), pattern="solid", mode="RGB", fmt=None,
                seed=0, array=None, exif_orientation=None, **save_kwargs) -> Path:
    """Write one image and return its path.

    ``array``: an (H, W, 3) uint8 image to write instead of a pattern.
    ``mode``: any Pillow mode the format can hold ("RGB", "L", "1", "P",
    "RGBA", "LA", "CMYK", "I;16", ...); RGB pixels are converted with Pillow
    ("RGBA"/"LA" get a left-to-right alpha ramp 0..255; "I;16" scales gray
    x257).  ``fmt`` defaults from the suffix.  ``exif_orientation``: JPEG/PNG/
    WebP/TIFF EXIF orientation tag value (1..8).  ``save_kwargs`` go to
    ``Image.save`` (quality=..., subsampling=...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = pattern_array(size, pattern, color, seed) if array is None else np.asarray(array, np.uint8)
    image = to_mode(rgb, mode)
    fmt = fmt or _FORMATS.get(path.suffix.lower(), "PNG")
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = int(exif_orientation)
        save_kwargs["exif"] = exif.tobytes()
    image.save(path, fmt, **save_kwargs)
    return path


def to_mode(rgb: np.ndarray, mode: str) -> Image.Image:
    """An RGB uint8 array as a Pillow image in ``mode`` (see :func:`write_image`)."""
    image = Image.fromarray(rgb, "RGB")
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA"):
        alpha = np.broadcast_to(np.linspace(0, 255, rgb.shape[1]).round().astype(np.uint8), rgb.shape[:2])
        out = image.convert(mode[:-1])
        out.putalpha(Image.fromarray(np.ascontiguousarray(alpha), "L"))
        return out
    if mode == "I;16":
        gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        return Image.fromarray(gray)  # mode I;16
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    return image.convert(mode)


# --------------------------------------------------------------------------- photos


def photo_array(size=(2048, 1536), which="chelsea") -> np.ndarray:
    """A real photo from scikit-image's sample data resized (bicubic) to ``size`` = (W, H)."""
    from skimage import data

    image = Image.fromarray(getattr(data, which)())
    return np.asarray(image.convert("RGB").resize(size, Image.Resampling.BICUBIC))


def write_photo_jpeg(path, size=(2048, 1536), which="chelsea", quality=90, **save_kwargs) -> Path:
    return write_image(path, array=photo_array(size, which), fmt="JPEG", quality=quality, **save_kwargs)


# --------------------------------------------------------------------------- class trees


def class_color(index: int, n_classes: int) -> tuple[int, int, int]:
    """Well-separated saturated colours: hues evenly spaced around the wheel."""
    r, g, b = colorsys.hsv_to_rgb(index / max(1, n_classes), 0.85, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def class_array(index: int, n_classes: int, size=(32, 32), rng=None) -> np.ndarray:
    """One image of class ``index``: its hue, stripes at its own angle, random phase, brightness and noise."""
    rng = rng if rng is not None else np.random.default_rng(0)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = np.pi * index / max(1, n_classes)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / 8) + phase)
    color = np.array(class_color(index, n_classes), dtype=np.float64)
    out = color * (rng.uniform(0.85, 1.1) + 0.2 * stripes[..., None])
    out += rng.normal(0, 12, out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_class_tree(root, classes=None, size=(32, 32), seed=0, suffix=".png") -> dict[str, list[Path]]:
    """Write ``root/<class>/<class>_<i><suffix>`` for ``classes = {name: count}``.

    Class ``i`` of ``n`` has hue ``i/n`` and stripes at angle ``pi*i/n``; each
    image gets its own stripe phase, brightness and pixel noise, so a tiny CNN
    separates the classes within an epoch or two but images are not copies.
    Returns ``{class: [paths]}`` in the order given.
    """
    classes = {"cat": 4, "dog": 4} if classes is None else dict(classes)
    rng = np.random.default_rng(seed)
    root = Path(root)
    written: dict[str, list[Path]] = {}
    for index, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        written[name] = []
        for i in range(count):
            path = folder / f"{name}_{i:04d}{suffix}"
            write_image(path, array=class_array(index, len(classes), size, rng))
            written[name].append(path)
    return written


# --------------------------------------------------------------------------- hand-made PNGs


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bytes(width: int, height: int, bit_depth: int = 8, color_type: int = 2,
              raw: bytes | None = None) -> bytes:
    """A PNG file with a correct IHDR (CRCs included).

    ``raw``: the unfiltered pixel rows, big-endian samples, without filter
    bytes (they are added).  ``None`` writes a tiny IDAT only, for headers
    that claim a size the data does not have (nothing is ever allocated).
    """
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    if raw is None:
        idat = zlib.compress(b"\x00" * 16)
    else:
        row = len(raw) // height
        idat = zlib.compress(b"".join(b"\x00" + raw[y * row:(y + 1) * row] for y in range(height)))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


# --------------------------------------------------------------------------- the zoo


@dataclass(frozen=True)
class ZooEntry:
    """One zoo file and what ``open_image`` must make of it.

    ``reason``: expected start of ``ImageError.reason`` (None: readable).
    ``expected``: for readable files, the (H, W, 3) uint8 result (upright, RGB);
    ``atol``: allowed per-pixel difference (JPEG is lossy).
    """

    path: Path
    reason: str | None = None
    expected: np.ndarray | None = None
    atol: int = 0

    @property
    def ok(self) -> bool:
        return self.reason is None


# 16-bit samples where rounding (v*255/65535) and Pillow's high-byte reduction agree.
PNG16_VALUES = (0, 257, 32768, 65535, 257 * 100, 257 * 200)


def write_bad_file_zoo(folder) -> dict[str, ZooEntry]:
    """Write the zoo into ``folder`` and return ``{name: ZooEntry}``.

    Readable: plain JPEG/PNG/WebP/BMP/GIF, grayscale, bilevel, palette (with and
    without a transparent colour), RGBA, LA (composited on white), CMYK JPEG,
    16-bit gray and 16-bit RGB PNG, EXIF orientation 6 and 8 JPEGs.
    Refused: truncated JPEG and PNG, zero bytes, text named .jpg, a PNG
    header claiming 100000 x 100000, HEIC bytes named .jpg, a JPEG with a
    broken header.  Every file name ends in one of
    ``imgcls.data.records.IMAGE_SUFFIXES`` and is unique, so the zoo can be
    dropped into a class folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    zoo: dict[str, ZooEntry] = {}
    quads = pattern_array((64, 32), "quadrants")  # 32x16 blocks: aligned to JPEG MCUs, little ringing
    grad = pattern_array((40, 30), "gradient", (250, 180, 90))

    def good(name, filename, expected, atol=0, **kwargs):
        path = write_image(folder / filename, **kwargs)
        zoo[name] = ZooEntry(path, None, expected, atol)

    good("ok_jpeg", "ok.jpg", quads, 8, array=quads, quality=95, subsampling=0)
    good("ok_png", "ok.png", grad, array=grad)
    good("ok_webp", "ok.webp", grad, array=grad, lossless=True)
    good("ok_bmp", "ok.bmp", grad, array=grad)
    good("ok_gif", "ok.gif", quads, array=quads)
    gray = np.asarray(Image.fromarray(grad).convert("L"))
    good("gray_png", "gray.png", np.repeat(gray[..., None], 3, 2), array=grad, mode="L")
    checker = pattern_array((32, 24), "checker", (255, 255, 255))
    good("bilevel_png", "bilevel.png", checker, array=checker, mode="1")
    good("palette_png", "palette.png", quads, array=quads, mode="P")

    # palette with a transparent colour: the blue quadrant becomes white
    pal = Image.fromarray(quads).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    blue_index = int(np.asarray(pal)[-1, 0])
    pal.save(folder / "palette_transparent.png", transparency=blue_index)
    expected = quads.copy()
    expected[16:, :32] = 255
    zoo["palette_transparent_png"] = ZooEntry(folder / "palette_transparent.png", None, expected)

    # RGBA / LA: alpha ramp 0..255 left to right, composited on white
    alpha = np.linspace(0, 255, grad.shape[1]).round()[None, :, None]
    on_white = np.rint((grad * alpha + 255.0 * (255 - alpha)) / 255).astype(np.uint8)
    good("rgba_png", "rgba.png", on_white, 1, array=grad, mode="RGBA")
    gray3 = np.repeat(gray[..., None], 3, 2).astype(np.float64)
    good("la_png", "la.png", np.rint((gray3 * alpha + 255.0 * (255 - alpha)) / 255).astype(np.uint8), 1,
         array=grad, mode="LA")

    # CMYK JPEG (k = 0, so every CMYK->RGB formula agrees): quadrants red, green, blue, white
    cmyk = np.zeros((32, 64, 4), np.uint8)
    cmyk[:16, :32, 1:3] = 255          # M+Y = red
    cmyk[:16, 32:, 0] = 255            # C+Y = green
    cmyk[:16, 32:, 2] = 255
    cmyk[16:, :32, 0:2] = 255          # C+M = blue
    Image.fromarray(cmyk, "CMYK").save(folder / "cmyk.jpg", quality=95)
    zoo["cmyk_jpeg"] = ZooEntry(folder / "cmyk.jpg", None, quads, 10)

    # 16-bit grayscale PNG (Pillow writes I;16): 0..65535 scales to 0..255
    values = np.array(PNG16_VALUES, dtype=np.uint16)
    ramp16 = np.tile(values, (4, 1))
    Image.fromarray(ramp16).save(folder / "gray16.png")
    expected8 = ((ramp16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    zoo["png16_gray"] = ZooEntry(folder / "gray16.png", None, np.repeat(expected8[..., None], 3, 2))

    # 16-bit RGB PNG (hand-made; Pillow cannot write it)
    rgb16 = np.stack([ramp16, ramp16[:, ::-1], np.full_like(ramp16, 32768)], axis=2)
    (folder / "rgb16.png").write_bytes(png_bytes(rgb16.shape[1], rgb16.shape[0], 16, 2, rgb16.astype(">u2").tobytes()))
    zoo["png16_rgb"] = ZooEntry(folder / "rgb16.png", None,
                                ((rgb16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))

    # EXIF orientation: 6 = rotate 90 clockwise to display, 8 = 90 counter-clockwise
    good("exif_rot6_jpeg", "exif6.jpg", np.rot90(quads, k=-1), 8, array=quads, exif_orientation=6,
         quality=95, subsampling=0)
    good("exif_rot8_jpeg", "exif8.jpg", np.rot90(quads, k=1), 8, array=quads, exif_orientation=8,
         quality=95, subsampling=0)

    # ---- refused
    def bad(name, filename, data, reason):
        (folder / filename).write_bytes(data)
        zoo[name] = ZooEntry(folder / filename, reason)

    noise = pattern_array((256, 256), "noise", (128, 128, 128), seed=1)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=90)
    bad("truncated_jpeg", "truncated.jpg", buf.getvalue()[: len(buf.getvalue()) * 6 // 10], "truncated image")
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    bad("truncated_png", "truncated.png", buf.getvalue()[: len(buf.getvalue()) // 2], "truncated image")
    bad("zero_bytes", "zero.jpg", b"", "zero bytes")
    bad("text_as_jpg", "text.jpg", b"this is not an image, just some text\n" * 4, "not an image")
    bad("huge_png_header", "huge.png", png_bytes(100_000, 100_000), "too large: 100000x100000 pixels")
    # an iPhone HEIC renamed .jpg (suffixes stay in IMAGE_SUFFIXES so folder readers pick every file up)
    bad("heic_as_jpg", "heic_photo.jpg", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
        "unsupported format HEIC")
    bad("broken_jpeg_header", "broken_header.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x13" * 40,
        "corrupt or truncated JPEG header")
    return zoo


# --------------------------------------------------------------------------- hostile files


def write_fifo(path) -> Path:
    """A named pipe (POSIX): opening it for reading blocks until a writer appears."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def write_extreme_aspect_png(path, width: int, height: int, value: int = 128) -> Path:
    """A valid, fully decodable 8-bit gray PNG of ``width`` x ``height``; a few KB even for 1 x 2,000,000
    (every row the same, so it compresses to almost nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = (b"\x00" + bytes([value]) * width) * height  # filter byte 0 + samples, row after row
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows, 9))
                     + png_chunk(b"IEND", b""))
    return path


def write_lying_png(path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` with almost no pixel data (nothing is ever allocated
    by a loader that checks the header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(width, height, 8, 0))
    return path


def write_csv(path, header, rows) -> Path:
    """A CSV of ``header`` and ``rows`` at ``path``; returns the path."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path
