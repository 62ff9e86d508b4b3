"""Preprocessing: one spec drives train, eval and predict; the torchvision and
Pillow forms of the eval geometry agree."""

import numpy as np
import pytest
import torch
from imagezoo import photo_array
from PIL import Image

from imgcls.data.preprocess import Preprocess, resize_and_crop, resized_size
from imgcls.data.preprocess import Augment
from imgcls.data.transforms import eval_transform, train_transform
from imgcls.errors import UserError
from imgcls.models.classifier import Classifier


@pytest.mark.parametrize("spec", [
    Preprocess(input_size=224, crop_pct=0.875, interpolation="bilinear"),
    Preprocess(input_size=240, crop_pct=0.882, interpolation="bicubic"),
    Preprocess(input_size=32, resize="squash", crop_pct=1.0),
])
@pytest.mark.parametrize("size", [(640, 480), (300, 500)])
def test_pil_eval_path_matches_torchvision(spec, size):
    image = Image.fromarray(photo_array(size))
    ours = resize_and_crop(image, spec)
    reference = eval_transform(spec)(torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())).numpy()
    assert ours.shape == reference.shape == (3, spec.input_size, spec.input_size)
    diff = np.abs(ours.astype(int) - reference.astype(int))
    assert diff.mean() < 0.05 and diff.max() <= 3  # rounding differences only


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size", [(640, 480), (333, 500), (1000, 301), (150, 200)])
def test_center_resize_is_the_crop_of_the_whole_resize(interpolation, size):
    """resize_and_crop resamples only the pixels of the center crop; Pillow's whole resize, then the
    crop, gives the same values up to float rounding (Pillow keeps box corners in 32-bit floats)."""
    spec = Preprocess(input_size=224, crop_pct=0.875, interpolation=interpolation)
    image = Image.fromarray(photo_array(size))
    new_w, new_h = resized_size(size, spec.resize_size)
    left, top = int(round((new_w - 224) / 2.0)), int(round((new_h - 224) / 2.0))
    whole = image.resize((new_w, new_h), spec.pil_interpolation).crop((left, top, left + 224, top + 224))
    diff = np.abs(resize_and_crop(image, spec).astype(int) - np.asarray(whole).transpose(2, 0, 1))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), (diff > 0).mean())  # rounding differences only


def test_train_transform_shapes_and_randomness():
    spec = Preprocess(input_size=64)
    x = torch.from_numpy(photo_array((120, 90)).transpose(2, 0, 1).copy())
    t = train_transform(spec, Augment())
    a, b = t(x), t(x)
    assert a.shape == b.shape == (3, 64, 64) and a.dtype == torch.uint8
    assert not torch.equal(a, b)
    off = train_transform(spec, Augment.off())
    assert torch.equal(off(x), off(x))


def test_classifier_normalizes_like_the_formula():
    spec = Preprocess(input_size=8, resize="squash", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    model = Classifier(torch.nn.Identity(), spec)
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), (x.float() / 255 - mean) / std)


def test_spec_round_trip_and_validation(tmp_path):
    spec = Preprocess(input_size=260, crop_pct=0.89, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
    spec.save(tmp_path / "p.json")
    assert Preprocess.load(tmp_path / "p.json") == spec
    assert spec.resize_size == 292
    with pytest.raises(UserError, match="interpolation"):
        Preprocess(interpolation="lanczos7")
    with pytest.raises(UserError, match="std"):
        Preprocess(std=(0.1, 0.0, 0.1))


def test_colour_jitter_takes_one_strength_or_three_and_both_forms_jitter_alike():
    """One number jitters brightness, contrast and saturation alike; three set each (timm's convention). The
    per-image transform and the batched one on tensors draw from the same ranges: with saturation alone, a
    grey image comes back unchanged from both, and with brightness alone each image is one factor of itself."""
    from imgcls.data.batch_augment import jitter

    assert Augment(color_jitter=0.3).jitter == (0.3, 0.3, 0.3)
    three = Augment(color_jitter=[0.5, 0.5, 0.1])
    assert three.color_jitter == (0.5, 0.5, 0.1) and three.jitter == (0.5, 0.5, 0.1)
    assert three.to_dict()["color_jitter"] == [0.5, 0.5, 0.1] and Augment.from_dict(three.to_dict()) == three
    for bad in (-0.1, (0.1, 0.2), (0.1, -1, 0.1), "0.2", True):
        with pytest.raises(UserError, match="color_jitter"):
            Augment(color_jitter=bad)

    rng = np.random.default_rng(0)
    grey = np.repeat(rng.integers(0, 256, (1, 40, 40), dtype=np.uint8), 3, axis=0)
    spec = Preprocess(input_size=40, resize="squash", crop_pct=1.0)
    only_saturation = Augment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False, color_jitter=(0, 0, 0.9))
    colour_jitters = [t for t in train_transform(spec, only_saturation).transforms if "ColorJitter" in type(t).__name__]
    assert [(j.brightness, j.contrast, j.saturation) for j in colour_jitters] == [(None, None, pytest.approx((0.1, 1.9)))]
    out = train_transform(spec, only_saturation)(torch.from_numpy(grey)).int()
    assert (out - torch.from_numpy(grey).int()).abs().max() <= 1  # torchvision's uint8 grey rounds down

    batch = torch.from_numpy(np.stack([grey, rng.integers(0, 256, (3, 40, 40), dtype=np.uint8)])).float()
    generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(jitter(batch[:1], (0.0, 0.0, 0.9), generator), batch[:1])
    brighter = jitter(batch, (0.4, 0.0, 0.0), generator)
    for image, out in zip(batch, brighter):
        unclipped = out < 255
        factor = (out[unclipped] / image[unclipped].clamp(min=1e-6))[image[unclipped] > 0]
        assert 0.6 <= factor.min() and factor.max() <= 1.4 and factor.max() - factor.min() < 1e-4
