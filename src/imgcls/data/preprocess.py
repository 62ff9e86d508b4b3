"""The preprocessing spec that travels with a model's weights.

Every model carries one :class:`Preprocess`.  It is stored in each run
directory (``preprocess.json``), in the safetensors metadata and in exported
ONNX files, and it is the only input from which train, eval and predict
transforms are built, so the three never disagree.

Only Pillow and NumPy are imported here: the prediction runtime uses this
module without torch.

Conventions (the same as timm's eval transform):

* ``resize="shorter"``: resize the shorter side to ``floor(input_size / crop_pct)``
  keeping the aspect ratio, then center-crop ``input_size`` x ``input_size``.
* ``resize="squash"``: resize straight to ``input_size`` x ``input_size``
  (no crop; used for tiny images such as CIFAR or digits).
* Scaling to [0, 1] and per-channel normalization ``(x - mean) / std`` happen
  inside the model wrapper (:class:`imgcls.models.classifier.Classifier`), so
  images travel as uint8 until the last moment.

A spec that does not make sense (non-numeric sizes, a mean of two values, an
unknown mode) raises :class:`SpecError`, a :class:`UserError` that is also a
``ValueError``, so loaders of stored specs (``imgcls.rundir.preprocess_from``)
name the file it came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_RESIZE_MODES = ("shorter", "squash")

#: The largest image a shorter-side resize may produce (64 Mpx, 192 MB of RGB).
#: :func:`imgcls.data.decode.open_image` refuses larger targets from the header.
MAX_RESIZED_PIXELS = 64 * 1024 * 1024


class SpecError(UserError, ValueError):
    """A preprocessing spec that does not make sense (a ValueError too, for loaders naming the file)."""


def _finite(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SpecError(f"{name} must be a number, not {value!r}") from None
    if not math.isfinite(number) or isinstance(value, bool):
        raise SpecError(f"{name} must be a finite number, not {value!r}")
    return number


def _triple(name: str, values) -> tuple[float, float, float]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != 3:
        raise SpecError(f"{name} needs three values (R, G, B), not {values!r}")
    return tuple(_finite(f"{name}[{i}]", v) for i, v in enumerate(values))


def resized_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    """(W, H) after resizing the shorter side to ``short``; the long side is truncated, as
    torchvision's Resize(int) does, so both eval paths agree to the pixel."""
    w, h = size
    if w <= h:
        return short, int(h * short / w)
    return int(w * short / h), short


@dataclass(frozen=True)
class Preprocess:
    """How raw pixels become model input (see module docstring)."""

    input_size: int = 224
    resize: str = "shorter"
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not isinstance(self.resize, str) or self.resize not in _RESIZE_MODES:
            raise SpecError(f"unknown resize mode {self.resize!r}; use one of {', '.join(_RESIZE_MODES)}")
        if not isinstance(self.interpolation, str) or self.interpolation not in _INTERPOLATIONS:
            raise SpecError(
                f"unknown interpolation {self.interpolation!r}; use one of {', '.join(_INTERPOLATIONS)}"
            )
        input_size = _finite("input_size", self.input_size)
        if input_size != int(input_size) or not 8 <= input_size <= 2048:
            raise SpecError(f"input size {self.input_size!r} is out of range (a whole number, 8..2048 pixels)")
        crop_pct = _finite("crop_pct", self.crop_pct)
        if not 0.1 <= crop_pct <= 1.0:
            raise SpecError(f"crop_pct {self.crop_pct!r} must lie in [0.1, 1.0]")
        object.__setattr__(self, "input_size", int(input_size))
        object.__setattr__(self, "crop_pct", crop_pct)
        object.__setattr__(self, "mean", _triple("mean", self.mean))
        object.__setattr__(self, "std", _triple("std", self.std))
        if min(self.std) <= 0:
            raise SpecError(f"std must be > 0 for each of R, G, B, not {list(self.std)}")
        if not isinstance(self.extra, dict):
            raise SpecError(f"extra must be a mapping, not {self.extra!r}")

    @property
    def resize_size(self) -> int:
        """Shorter-side length before the center crop."""
        if self.resize == "squash":
            return self.input_size
        return int(math.floor(self.input_size / self.crop_pct))

    @property
    def pil_interpolation(self) -> Image.Resampling:
        return _INTERPOLATIONS[self.interpolation]

    def replace(self, **changes) -> "Preprocess":
        data = self.to_dict()
        data.update({k: v for k, v in changes.items() if v is not None})
        return Preprocess.from_dict(data)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        if not data["extra"]:
            del data["extra"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        if not isinstance(data, dict):
            raise SpecError(f"a preprocessing spec is a mapping of options, not {type(data).__name__}")
        known = {k: data[k] for k in ("input_size", "resize", "crop_pct", "mean", "std", "interpolation", "extra") if k in data}
        return cls(**known)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Preprocess":
        return cls.from_dict(json.loads(Path(path).read_text()))


def resize_and_crop(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """Eval-time geometry: an RGB PIL image -> uint8 array (3, S, S).

    This is the single definition of eval/predict geometry; the torchvision
    eval transform in :mod:`imgcls.data.transforms` is tested to agree with it.
    """
    size = spec.input_size
    if spec.resize == "squash":
        image = image.resize((size, size), spec.pil_interpolation)
    else:
        new_w, new_h = resized_size(image.size, spec.resize_size)
        if new_w * new_h > MAX_RESIZED_PIXELS:  # open_image refuses these from the header; a caller's own image
            raise ValueError(f"a {image.size[0]}x{image.size[1]} image would be {new_w}x{new_h} once resized"
                            f" (limit {MAX_RESIZED_PIXELS} pixels); crop it first")
        left = int(round((new_w - size) / 2.0))
        top = int(round((new_h - size) / 2.0))
        if (new_w, new_h) == image.size:
            image = image.crop((left, top, left + size, top + size))
        elif spec.interpolation in _SUPPORT:
            image = _resize_center(image, (new_w, new_h), (left, top), spec)
        else:
            image = image.resize((new_w, new_h), spec.pil_interpolation).crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _resize_center(image: Image.Image, new_size: tuple[int, int], corner: tuple[int, int], spec: Preprocess) -> Image.Image:
    """The ``input_size`` square at ``corner`` of ``image`` resized to ``new_size``, resampling only its pixels.

    Pillow resamples along rows first, then along columns; doing the same with boxes keeps each output
    pixel's place and filter, so this is the crop of the whole resize up to float rounding (Pillow keeps
    box corners in 32-bit floats: +-1 on a few values), for about two thirds of the work.  The first pass
    reads only the rows the second needs.
    """
    size, (width, height), (left, top) = spec.input_size, image.size, corner
    sx, sy = width / new_size[0], height / new_size[1]
    reach = _SUPPORT[spec.interpolation] * max(sy, 1.0) + 1  # source rows a filter window reaches
    first = max(0, math.floor(top * sy - reach))
    last = min(height, math.ceil((top + size) * sy + reach))
    rows = image.crop((0, first, width, last)) if (first, last) != (0, height) else image
    rows = rows.resize((size, last - first), spec.pil_interpolation, box=(left * sx, 0, (left + size) * sx, last - first))
    return rows.resize((size, size), spec.pil_interpolation, box=(0, top * sy - first, size, (top + size) * sy - first))


# Pillow's filter support (in output pixels) of the interpolations whose resize is separable
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}
PAD_MODES = ("reflect", "zero")


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation.  ``Augment.off()`` turns it all off."""

    crop_scale: tuple[float, float] = (0.08, 1.0)   # RandomResizedCrop area range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    # brightness, contrast, saturation factors in [1 - j, 1 + j]: one j for all three, or three; 0 = off
    color_jitter: float | tuple[float, float, float] = 0.2
    enabled: bool = True
    crop_padding: int = 0        # > 0: a random crop of the padded image instead of the resized crop (CIFAR style)
    pad_mode: str = "reflect"    # how that padding is filled: reflect or zero
    cutout: int = 0              # side of one square set to the mean colour per image; 0 = off
    alternate_flip: bool = False  # hflip: a fixed half of the images in even epochs, the other half in odd ones

    def __post_init__(self):
        jitter = self.color_jitter
        if isinstance(jitter, (list, tuple)):
            object.__setattr__(self, "color_jitter", jitter := tuple(jitter))
        values = jitter if isinstance(jitter, tuple) else (jitter,)
        if (len(values) not in (1, 3) or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                                             for v in values)):
            raise SpecError(f"color_jitter must be a number >= 0 or three of them (brightness, contrast,"
                            f" saturation), not {jitter!r}")
        if self.pad_mode not in PAD_MODES:
            raise SpecError(f"unknown pad mode {self.pad_mode!r}; use one of {', '.join(PAD_MODES)}")
        for name in ("crop_padding", "cutout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"{name} must be a whole number of pixels >= 0, not {value!r}")

    @classmethod
    def off(cls) -> "Augment":
        return cls(enabled=False)

    @classmethod
    def merged(cls, changes: dict, given: dict | None) -> dict:
        """The defaults with ``changes`` (a recipe's or a strategy's), then the settings ``given`` changes from
        the defaults: an augmentation flag arrives as a whole dict with its own setting changed, so a given
        setting equal to its default cannot be told from one not given."""
        default = cls().to_dict()
        out = {**default, **changes}
        if given:
            out.update({k: v for k, v in given.items() if default.get(k) != v})
        return out

    @property
    def jitter(self) -> tuple[float, float, float]:
        """(brightness, contrast, saturation) strengths."""
        j = self.color_jitter
        return tuple(map(float, j)) if isinstance(j, tuple) else (float(j),) * 3

    def to_dict(self) -> dict:
        data = asdict(self)
        data["crop_scale"] = list(self.crop_scale)
        data["crop_ratio"] = list(self.crop_ratio)
        if isinstance(self.color_jitter, tuple):
            data["color_jitter"] = list(self.color_jitter)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Augment":
        data = dict(data)
        for key in ("crop_scale", "crop_ratio"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)
