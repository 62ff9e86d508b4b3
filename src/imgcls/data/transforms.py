"""Training augmentation and the torchvision form of the eval transform, both
built only from a :class:`Preprocess` spec (plus an :class:`Augment` recipe).

Images are uint8 tensors (C, H, W) from decoding to the model's input; the
model wrapper scales and normalizes (see ``models/classifier.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torchvision.transforms import InterpolationMode, v2

from .preprocess import Preprocess

_MODES = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
          "bicubic": InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation.  ``Augment.off()`` turns it all off."""

    crop_scale: tuple[float, float] = (0.08, 1.0)   # RandomResizedCrop area range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    color_jitter: float = 0.2                       # brightness/contrast/saturation; 0 = off
    enabled: bool = True

    @classmethod
    def off(cls) -> "Augment":
        return cls(enabled=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["crop_scale"] = list(self.crop_scale)
        data["crop_ratio"] = list(self.crop_ratio)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Augment":
        data = dict(data)
        for key in ("crop_scale", "crop_ratio"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def train_transform(spec: Preprocess, augment: Augment) -> v2.Transform:
    """uint8 (C,H,W) of any size -> augmented uint8 (C,S,S)."""
    if not augment.enabled:
        return eval_transform(spec)
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(spec.input_size, scale=augment.crop_scale, ratio=augment.crop_ratio,
                             interpolation=_MODES[spec.interpolation], antialias=True),
    ]
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.color_jitter > 0:
        j = augment.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    return v2.Compose(steps)


def eval_transform(spec: Preprocess) -> v2.Transform:
    """The eval geometry as torchvision transforms (resize, center crop).

    Prediction uses the Pillow implementation
    :func:`imgcls.data.preprocess.resize_and_crop`; a test checks both agree.
    """
    mode = _MODES[spec.interpolation]
    if spec.resize == "squash":
        return v2.Resize((spec.input_size, spec.input_size), interpolation=mode, antialias=True)
    return v2.Compose([v2.Resize(spec.resize_size, interpolation=mode, antialias=True),
                       v2.CenterCrop(spec.input_size)])

