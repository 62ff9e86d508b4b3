"""The one image loader: a file -> an 8-bit RGB Pillow image, or an :class:`ImageError`.

Every reader in imgcls (training, evaluation, prediction, the scan, the web
page) opens images through :func:`open_image`, so they all agree on:

* **Orientation**: the EXIF orientation tag is applied (the picture comes out
  the way a photo viewer shows it).
* **Modes**: grayscale, bilevel, palette, CMYK, YCbCr, 16-bit, ... all become
  8-bit RGB.  Transparent images (RGBA, LA, PA, palette with a transparent
  colour) are composited **on white**, which is what people see in a browser
  or file viewer; dropping alpha instead would show whatever colour happens to
  be stored under fully transparent pixels (often black).
  16-bit grayscale (``I;16*``, and ``I``, which Pillow uses for 16-bit PGM)
  is scaled 0..65535 -> 0..255 with rounding (``65535 -> 255``,
  ``32768 -> 128``), not clipped.  16-bit RGB(A) PNGs reach us already reduced
  to 8 bits by Pillow (high byte), which differs from rounding by at most 1.
  Floating-point images (mode ``F``) have no agreed range and are refused.
* **Size limit**: images with more than :data:`MAX_PIXELS` pixels are refused
  from the header alone, before any pixel memory is allocated.  So are images
  whose *resized* size would be too large: an aspect ratio beyond
  :data:`MAX_ASPECT`, or (with ``min_size``, the shorter side every caller
  resizes to) more than :data:`imgcls.data.preprocess.MAX_RESIZED_PIXELS`
  after that resize.  A 4 KB PNG of 1 x 2,000,000 pixels passes the pixel
  limit but would need gigabytes once its shorter side is scaled up.
* **Regular files only**: :func:`open_regular` opens without blocking and
  refuses FIFOs, sockets and devices ("not a regular file (a FIFO)"), so a
  named pipe in a CSV never hangs a reader.  Readers of other files (CSV
  lists) use it too.
* **Failures**: every way a file can fail to decode (missing, zero bytes, not
  an image, truncated, corrupt, unsupported format, too large) becomes an
  :class:`ImageError` with a short human reason.  Truncated files are always
  detected: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone (False; code
  that sets it globally would blind Pillow, though not the simplejpeg path)
  and the image is fully loaded here, never lazily later.

Reduced-size decoding: with ``min_size``, a JPEG at least twice as large as
needed is decoded by libjpeg's DCT scaling at 1/2, 1/4 or 1/8 so that its
shorter side stays ``>= min_size``.  The scale is chosen exactly as Pillow's
``Image.draft`` chooses it, and it is decoded with simplejpeg when available
(fallback: Pillow's draft mode, also for CMYK JPEGs and whenever simplejpeg
complains).  Both paths run libjpeg-turbo with the same settings and give the
same pixels, so results do not depend on whether simplejpeg is installed
(``tests/test_decode.py`` checks this).  See ``benchmarks/decode.py`` for
speed.

Only Pillow and NumPy (and optionally simplejpeg) are imported here: the
prediction runtime uses this module without torch.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from .preprocess import MAX_RESIZED_PIXELS, Preprocess, resize_and_crop, resized_size

try:  # optional fast path; Pillow does the same job a little slower
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a core dependency
    _simplejpeg = None

__all__ = ["ImageError", "NotRegularFileError", "MAX_PIXELS", "MAX_ASPECT", "open_image", "open_regular",
           "load_uint8", "jpeg_draft_scale", "open_image_bytes", "load_uint8_bytes"]

#: Images with more pixels than this are refused (decompression bombs).  The
#: default is the size at which Pillow itself raises ``DecompressionBombError``
#: (2 x ``Image.MAX_IMAGE_PIXELS``).  Lowering it works as is; raising it
#: further also needs ``PIL.Image.MAX_IMAGE_PIXELS`` raised, because Pillow
#: refuses such files in ``Image.open`` before we see them.
MAX_PIXELS = 2 * 89_478_485  # 178,956,970

#: Longer side / shorter side beyond which an image is refused whatever it is
#: resized to: at the default 256 px shorter side this is the same bound as
#: MAX_RESIZED_PIXELS (64 Mpx), so the scan, training and prediction agree.
MAX_ASPECT = 1000

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> transpose; the same table as PIL.ImageOps.exif_transpose,
# which we cannot call on the simplejpeg path (a bare array has no EXIF).
# tests/test_decode.py checks the two agree for all eight orientations.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

# File signatures, used only to explain a file Pillow could not identify.
_UNSUPPORTED_SIGNATURES = (
    (4, b"ftypheic", "HEIC"), (4, b"ftypheix", "HEIC"), (4, b"ftyphevc", "HEIC"),
    (4, b"ftypheim", "HEIC"), (4, b"ftypheis", "HEIC"), (4, b"ftypmif1", "HEIF"),
    (4, b"ftypmsf1", "HEIF"), (4, b"ftypavif", "AVIF"), (4, b"ftypavis", "AVIF"),
    (0, b"\xff\x0a", "JPEG XL"), (0, b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (0, b"%PDF", "PDF"),
)
_IMAGE_SIGNATURES = (
    (0, b"\xff\xd8\xff", "JPEG"), (0, b"\x89PNG\r\n\x1a\n", "PNG"), (0, b"GIF8", "GIF"),
    (0, b"BM", "BMP"), (8, b"WEBP", "WebP"), (0, b"II*\x00", "TIFF"), (0, b"MM\x00*", "TIFF"),
)


class NotRegularFileError(OSError):
    """:func:`open_regular` met a FIFO, socket or device; ``strerror`` says which."""


class ImageError(Exception):
    """A file that cannot be used as an image, with a short reason.

    ``reason`` is a short phrase for tables and logs ("zero bytes",
    "truncated image", "not an image", "unsupported format HEIC",
    "too large: 100000x100000 pixels > limit 178956970", ...); ``path`` is the
    file.  Readers turn it into a row with an ``error`` column rather than
    letting it escape a batch.
    """

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        super().__init__(reason, path)  # both in args, so it pickles (process pools)
        self.reason = reason
        self.path = Path(path) if path is not None else None

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path is not None else self.reason


def jpeg_draft_scale(size: tuple[int, int], min_size: int) -> int:
    """The DCT reduction (1, 2, 4 or 8) for a ``size`` JPEG whose shorter side must stay >= ``min_size``.

    The same rule as ``PIL.JpegImagePlugin.JpegImageFile.draft`` with
    ``size=(min_size, min_size)``: the largest power of two <= 8 that divides
    the shorter side into at least ``min_size``.  Output size is
    ``ceil(W / s) x ceil(H / s)``.
    """
    ratio = min(size[0], size[1]) // max(1, int(min_size))
    for scale in (8, 4, 2):
        if ratio >= scale:
            return scale
    return 1


def open_image(path: str | os.PathLike, min_size: int | None = None) -> Image.Image:
    """Decode ``path`` into an 8-bit RGB image, upright (EXIF applied).

    ``min_size``: the caller needs the shorter side to be at least this long;
    JPEGs at least twice that size are decoded at reduced scale (1/2, 1/4,
    1/8), which is several times faster.  Other formats are decoded in full.

    Raises :class:`ImageError` for any file that cannot be decoded.
    """
    path = Path(path)
    try:
        fp = open_regular(path)
    except FileNotFoundError:
        raise ImageError("file not found", path) from None
    except IsADirectoryError:
        raise ImageError("not a file (a directory)", path) from None
    except PermissionError:
        raise ImageError("permission denied", path) from None
    except NotRegularFileError as exc:
        raise ImageError(exc.strerror, path) from None
    except OSError as exc:
        raise ImageError(f"cannot read file ({exc.strerror or exc})", path) from None
    with fp:
        return _decode_or_reason(fp, path, min_size)


def _decode_or_reason(fp, name, min_size: int | None) -> Image.Image:
    """:func:`_decode` with every failure turned into an :class:`ImageError` naming ``name``."""
    try:
        return _decode(fp, name, min_size)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(_too_large_reason(fp), name) from None
    except MemoryError:
        raise ImageError("out of memory while decoding", name) from None
    except Exception as exc:  # noqa: BLE001 - every decode failure becomes a reason
        raise ImageError(_failure_reason(exc, fp), name) from None


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file.

    Opened non-blocking where the platform allows, so a FIFO with no writer
    cannot hang the caller, then checked with ``fstat`` (no race with a file
    swapped after a ``stat``).  Raises ``FileNotFoundError``,
    ``IsADirectoryError``, ``PermissionError``, :class:`NotRegularFileError`
    ("not a regular file (a FIFO)") or another ``OSError``.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "Is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(0, f"not a regular file ({_file_kind(mode)})", str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file: ordinary reads from here on
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def load_uint8(path: str | os.PathLike, spec: Preprocess) -> np.ndarray:
    """The eval/predict loader: ``path`` -> uint8 array (3, S, S) per ``spec``.

    Decodes at reduced size where that keeps the shorter side >=
    ``spec.resize_size``, then applies :func:`imgcls.data.preprocess.resize_and_crop`.
    """
    return resize_and_crop(open_image(path, min_size=spec.resize_size), spec)


def open_image_bytes(data: bytes, min_size: int | None = None, name: str | None = None) -> Image.Image:
    """:func:`open_image` for an image held in memory (an upload): the same checks, orientation and modes.

    ``name`` (the upload's file name) is what an :class:`ImageError` names.  Nothing is written to disk.
    """
    return _decode_or_reason(io.BytesIO(data), name, min_size)


def load_uint8_bytes(data: bytes, spec: Preprocess, name: str | None = None) -> np.ndarray:
    """:func:`load_uint8` for an image held in memory: bytes -> uint8 array (3, S, S) per ``spec``."""
    return resize_and_crop(open_image_bytes(data, min_size=spec.resize_size, name=name), spec)


# --------------------------------------------------------------------------- internals


def _decode(fp, path: Path, min_size: int | None) -> Image.Image:
    head = fp.read(32)
    if not head:
        raise ImageError("zero bytes", path)
    fp.seek(0)
    image = Image.open(fp)  # header only; Pillow refuses > 2 x MAX_IMAGE_PIXELS here
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(_too_large(width, height), path)
    _check_resizable(width, height, min_size, path)

    scale = 1
    if min_size and isinstance(image, JpegImageFile):
        scale = jpeg_draft_scale(image.size, min_size)
    if scale > 1 and _simplejpeg is not None and image.mode in ("RGB", "L"):
        fast = _decode_simplejpeg(fp, image, scale)
        if fast is not None:
            return _apply_orientation(fast, _orientation(image))
    if scale > 1:
        image.draft(None, (min_size, min_size))  # same scale as jpeg_draft_scale
    image.load()  # full load now: truncation is an error here, not later
    orientation = _orientation(image)  # PNG/WebP may carry EXIF after the pixel data
    return _apply_orientation(_to_rgb(image, path), orientation)


def _decode_simplejpeg(fp, image: Image.Image, scale: int) -> Image.Image | None:
    """Decode the JPEG in ``fp`` at 1/``scale`` with simplejpeg; None: let Pillow do it."""
    fp.seek(0)
    data = fp.read()
    width, height = image.size
    out_w, out_h = -(-width // scale), -(-height // scale)
    try:
        # libjpeg-turbo picks the smallest M/8 scale giving at least this size:
        # exactly 1/scale, the scale Pillow's draft would use.
        array = _simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_height=out_h, min_width=out_w, strict=True
        )
    except (ValueError, RuntimeError):
        # Truncated or slightly corrupt streams (simplejpeg is strict about
        # libjpeg warnings) and odd colour spaces: Pillow is the arbiter.
        return None
    finally:
        fp.seek(0)
    if array.shape[:2] != (out_h, out_w):  # pragma: no cover - defensive
        return None
    return Image.fromarray(array, "RGB")


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the pixels unusable
        return 1
    return value if isinstance(value, int) else 1


def _apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    method = _TRANSPOSE.get(orientation)
    return image if method is None else image.transpose(method)


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        if mode == "I":
            values = np.clip(values, 0, 65535)
        gray = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    if mode == "F":
        raise ImageError("unsupported pixel mode F (floating point)", path)
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise ImageError(f"unsupported pixel mode {mode}", path) from None


def _check_resizable(width: int, height: int, min_size: int | None, path: Path) -> None:
    """Refuse, from the header, an image whose resize would need far more memory than its decode."""
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        raise ImageError(f"extreme aspect ratio: {width}x{height} pixels (limit {MAX_ASPECT}:1)", path)
    if min_size:
        new_w, new_h = resized_size((width, height), min_size)
        if new_w * new_h > MAX_RESIZED_PIXELS:
            raise ImageError(f"extreme aspect ratio: {width}x{height} pixels would be {new_w}x{new_h} once"
                             f" resized to a shorter side of {min_size} (limit {MAX_RESIZED_PIXELS} pixels)", path)


def _too_large(width: int, height: int) -> str:
    return f"too large: {width}x{height} pixels > limit {MAX_PIXELS}"


def _too_large_reason(fp) -> str:
    """Pillow refused the header as a bomb; read the size without its check to say how large."""
    for format_id in Image.ID:
        factory, accept = Image.OPEN[format_id]
        try:
            fp.seek(0)
            if accept is not None and not accept(fp.read(16)):
                continue
            fp.seek(0)
            width, height = factory(fp, "").size  # header parsing only, no pixels
            return _too_large(width, height)
        except Exception:  # noqa: BLE001
            continue
    return f"too large: more than {MAX_PIXELS} pixels"


def _failure_reason(exc: Exception, fp) -> str:
    message = str(exc)
    if isinstance(exc, UnidentifiedImageError):
        return _unidentified_reason(fp)
    if isinstance(exc, EOFError) or "truncated" in message.lower():
        return "truncated image"
    if "decoder" in message and "not available" in message:
        return f"unsupported format ({message})"
    message = message.replace(repr(fp), "").strip()
    if len(message) > 80:
        message = message[:77] + "..."
    return f"corrupt image ({type(exc).__name__}: {message})" if message else f"corrupt image ({type(exc).__name__})"


def _unidentified_reason(fp) -> str:
    try:
        fp.seek(0)
        head = fp.read(64)
    except OSError:
        head = b""
    for offset, magic, name in _UNSUPPORTED_SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return f"unsupported format {name}"
    if b"<svg" in _peek(fp, 1024).lower():
        return "unsupported format SVG"
    for offset, magic, name in _IMAGE_SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return f"corrupt or truncated {name} header"
    return "not an image"


def _peek(fp, n: int) -> bytes:
    try:
        fp.seek(0)
        return fp.read(n)
    except OSError:
        return b""

