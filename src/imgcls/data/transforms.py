"""Training augmentation (per image; :mod:`imgcls.data.batch_augment` is its batched form on the
device for the array cache) and the torchvision form of the eval transform, both
built only from a :class:`Preprocess` spec (plus an :class:`Augment` recipe).

Images are uint8 tensors (C, H, W) from decoding to the model's input; the
model wrapper scales and normalizes (see ``models/classifier.py``).
"""

from __future__ import annotations

from torchvision.transforms import InterpolationMode, v2

from .batch_augment import Cutout
from .preprocess import Augment, Preprocess

_MODES = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
          "bicubic": InterpolationMode.BICUBIC}


def train_transform(spec: Preprocess, augment: Augment) -> v2.Transform:
    """uint8 (C,H,W) of any size -> augmented uint8 (C,S,S)."""
    if not augment.enabled:
        return eval_transform(spec)
    if augment.crop_padding:
        crop = v2.RandomCrop(spec.input_size, padding=augment.crop_padding, pad_if_needed=True,
                             padding_mode="reflect" if augment.pad_mode == "reflect" else "constant")
    else:
        crop = v2.RandomResizedCrop(spec.input_size, scale=augment.crop_scale, ratio=augment.crop_ratio,
                                    interpolation=_MODES[spec.interpolation], antialias=True)
    steps: list = [crop]
    if augment.hflip:  # alternate_flip needs each image's row and the epoch: only data.batch_augment has them
        steps.append(v2.RandomHorizontalFlip())
    if any(augment.jitter):
        brightness, contrast, saturation = augment.jitter
        steps.append(v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation))
    if augment.cutout:
        steps.append(Cutout(augment.cutout, spec.mean))
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

