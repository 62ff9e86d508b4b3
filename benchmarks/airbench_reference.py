"""airbench94 as published, transcribed to plain PyTorch: the yardstick for imgcls's airbench net and its SGD
training (``--recipe cifar10-speed`` trained this way until session 16; it is airbench94_muon's training now,
whose transcription is ``airbench_muon_reference.py``).

Keller Jordan's ``airbench94.py`` (github.com/KellerJordan/cifar10-airbench, MIT licence; "94% on
CIFAR-10 in 3.29 Seconds on a Single GPU", 2024) reaches 94.0% on CIFAR-10 in 9.9 epochs (about 0.36
PFLOP).  This file is that script's network, optimizer, schedule, lookahead, data augmentation and
test-time augmentation, line for line, with two changes only: fp32 on the CPU instead of fp16 on a
GPU, and the images come from a CSV of JPEG files (the ones ``imgcls`` trains on) instead of the
PNG-derived tensors of torchvision's CIFAR-10.  Nothing of imgcls is used in the training, so the
figures say what the recipe itself gives on these images: where ``imgcls train --recipe
cifar10-speed`` lands beside it shows whether imgcls reproduces the recipe; where both land beside
94.0% shows what the data costs.

``benchmarks/cifar10.py --recipe NAME --reference`` runs it beside imgcls, with the same images and
epochs, in one run.  Alone::

    python benchmarks/airbench_reference.py --epochs 4                  # 50,000 / 10,000 images
    python benchmarks/airbench_reference.py --epochs 1 --train-images 2000 --test-images 1000 --batch-size 128

Measured (2 cores, fp32, CIFAR-10 as JPEG; details in docs/decisions.md, session 11): at 4 epochs,
0.8619 plain / 0.8672 flip / 0.8692 flip-shift, against imgcls's 0.862 / 0.867 / 0.869; at the
published 9.9 epochs, 0.8973 / 0.9020 / 0.9048, against ``cifar10-speed``'s 10 epochs 0.896 / 0.902 / 0.9035
(airbench94's paper: 94.0% on the PNG originals).
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

HYP = {"lr": 11.5, "momentum": 0.85, "weight_decay": 0.0153, "bias_scaler": 64.0, "label_smoothing": 0.2,
       "whiten_bias_epochs": 3, "batch_size": 1024, "widths": (64, 256, 256), "bn_momentum": 0.6,
       "scaling": 1 / 9}
CIFAR_MEAN = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor((0.2470, 0.2435, 0.2616)).view(1, 3, 1, 1)


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, n, momentum, eps=1e-12):
        super().__init__(n, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class Conv(nn.Conv2d):
    def __init__(self, cin, cout):
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[:w.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, cin, cout, momentum):
        super().__init__()
        self.conv1, self.pool, self.norm1 = Conv(cin, cout), nn.MaxPool2d(2), BatchNorm(cout, momentum)
        self.conv2, self.norm2, self.activ = Conv(cout, cout), BatchNorm(cout, momentum), nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class Mul(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


def make_net(widths, classes: int) -> nn.Sequential:
    w1, w2, w3 = widths
    m = HYP["bn_momentum"]
    net = nn.Sequential(nn.Conv2d(3, 24, 2, padding=0, bias=True), nn.GELU(), ConvGroup(24, w1, m),
                        ConvGroup(w1, w2, m), ConvGroup(w2, w3, m), nn.MaxPool2d(3), nn.Flatten(),
                        nn.Linear(w3, classes, bias=False), Mul(HYP["scaling"]))
    net[0].weight.requires_grad = False
    return net.to(memory_format=torch.channels_last)


def init_whitening(layer: nn.Conv2d, x: torch.Tensor, eps: float = 5e-4) -> None:
    c, (h, w) = x.shape[1], layer.weight.shape[2:]
    patches = x.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c, h, w).float()
    flat = patches.view(len(patches), -1)
    eigenvalues, eigenvectors = torch.linalg.eigh(flat.T @ flat / len(flat), UPLO="U")
    eigenvalues = eigenvalues.flip(0).view(-1, 1, 1, 1)
    eigenvectors = eigenvectors.T.reshape(c * h * w, c, h, w).flip(0)
    scaled = eigenvectors / torch.sqrt(eigenvalues + eps)
    layer.weight.data[:] = torch.cat((scaled, -scaled))


def batch_crop(images: torch.Tensor, crop: int) -> torch.Tensor:
    r = (images.size(-1) - crop) // 2
    shifts = torch.randint(-r, r + 1, size=(len(images), 2))
    out = torch.empty((len(images), images.size(1), crop, crop))
    for sx in range(-r, r + 1):
        for sy in range(-r, r + 1):
            mask = (shifts[:, 0] == sx) & (shifts[:, 1] == sy)
            out[mask] = images[mask, :, r + sx:r + sx + crop, r + sy:r + sy + crop]
    return out


@torch.no_grad()
def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, tta_level: int) -> float:
    net.eval()

    def mirror(z):
        return 0.5 * net(z) + 0.5 * net(z.flip(-1))

    outs = []
    for i in range(0, len(x), 2000):
        z = x[i:i + 2000].contiguous(memory_format=torch.channels_last)
        if tta_level == 0:
            outs.append(net(z))
        elif tta_level == 1:
            outs.append(mirror(z))
        else:
            pad = F.pad(z, (1,) * 4, "reflect")
            shifted = torch.stack([mirror(pad[:, :, 0:32, 0:32]), mirror(pad[:, :, 2:34, 2:34])]).mean(0)
            outs.append(0.5 * mirror(z) + 0.5 * shifted)
    return (torch.cat(outs).argmax(1) == y).float().mean().item()


def train_reference(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                    epochs: float, widths=HYP["widths"], batch_size: int = HYP["batch_size"], seed: int = 0,
                    log=print) -> dict:
    """airbench94's training on normalized NCHW float images; test accuracy after each epoch and at the end
    with TTA levels 0 (none), 1 (mirror) and 2 (mirror + two one-pixel shifts: imgcls's flip-shift)."""
    torch.manual_seed(seed)
    classes = int(max(y_train.max(), y_test.max())) + 1
    net = make_net(widths, classes)
    momentum = HYP["momentum"]
    kilostep_scale = 1024 * (1 + 1 / (1 - momentum))
    lr = HYP["lr"] / kilostep_scale  # for a loss summed over the batch
    wd = HYP["weight_decay"] * batch_size / kilostep_scale
    lr_biases = lr * HYP["bias_scaler"]
    steps_per_epoch = len(x_train) // batch_size
    total = math.ceil(steps_per_epoch * epochs)
    norm_biases = [p for k, p in net.named_parameters() if "norm" in k and p.requires_grad]
    other = [p for k, p in net.named_parameters() if "norm" not in k and p.requires_grad]
    optimizer = torch.optim.SGD([{"params": norm_biases, "lr": lr_biases, "weight_decay": wd / lr_biases},
                                 {"params": other, "lr": lr, "weight_decay": wd / lr}], momentum=momentum,
                                nesterov=True)

    def get_lr(step):
        warmup = int(total * 0.23)
        if step < warmup:
            frac = step / warmup
            return 0.2 * (1 - frac) + frac
        frac = (step - warmup) / (total - warmup)
        return (1 - frac) + 0.07 * frac

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, get_lr)
    alpha = 0.95 ** 5 * (torch.arange(total + 1) / total) ** 3
    slow = {k: v.clone() for k, v in net.state_dict().items()}

    def lookahead(decay):
        for s, p in zip(slow.values(), net.state_dict().values()):
            if p.dtype == torch.float:
                s.lerp_(p, 1 - decay)
                p.copy_(s)

    loss_fn = nn.CrossEntropyLoss(label_smoothing=HYP["label_smoothing"], reduction="none")
    init_whitening(net[0], x_train[:5000])
    flipped = torch.where((torch.rand(len(x_train)) < 0.5).view(-1, 1, 1, 1), x_train.flip(-1), x_train)
    padded = F.pad(flipped, (2,) * 4, "reflect")
    step, t0, curve = 0, time.perf_counter(), []
    for epoch in range(math.ceil(epochs)):
        net[0].bias.requires_grad = epoch < HYP["whiten_bias_epochs"]
        net.train()
        images = batch_crop(padded, x_train.size(-1))
        if epoch % 2 == 1:
            images = images.flip(-1)
        order = torch.randperm(len(images))
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = loss_fn(net(images[idx].contiguous(memory_format=torch.channels_last)), y_train[idx]).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 5 == 0:
                lookahead(alpha[step].item())
            if step >= total:
                lookahead(1.0)
                break
        curve.append((epoch + 1, evaluate(net, x_test, y_test, 0)))
        log(f"reference epoch {epoch + 1}: test accuracy {curve[-1][1]:.4f} ({time.perf_counter() - t0:.0f} s)")
    return {"curve": curve, "seconds": time.perf_counter() - t0,
            **{f"tta{level}": evaluate(net, x_test, y_test, level) for level in (0, 1, 2)}}


def load_csv(csv_path: Path, test_split: str) -> tuple[torch.Tensor, ...]:
    """Train and test images of a path,label,split CSV, decoded with PIL and normalized as airbench does."""
    rows = list(csv.DictReader(csv_path.open()))
    index = {c: i for i, c in enumerate(sorted({r["label"] for r in rows}))}

    def split(name):
        part = [r for r in rows if r["split"] == name]
        pixels = np.stack([np.asarray(Image.open(r["path"]).convert("RGB")) for r in part])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        return (x - CIFAR_MEAN) / CIFAR_STD, torch.tensor([index[r["label"]] for r in part])

    return (*split("train"), *split(test_split))


def main() -> None:
    from cifar10_data import ARCHIVE, ensure_data, subset_csv

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/data"))
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--epochs", type=float, default=9.9, help="airbench94: 9.9")
    parser.add_argument("--train-images", type=int, default=50000)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=HYP["batch_size"])
    parser.add_argument("--widths", type=int, nargs=3, default=list(HYP["widths"]))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/airbench-reference"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    csv_path = subset_csv(ensure_data(args.data, args.archive), args.train_images, args.test_images,
                          args.work / "cifar.csv")
    result = train_reference(*load_csv(csv_path, "test"), args.epochs, tuple(args.widths), args.batch_size, args.seed)
    print(f"airbench94 reference, {args.epochs} epochs: test accuracy {result['tta0']:.4f}, mirror"
          f" {result['tta1']:.4f}, mirror + shifts {result['tta2']:.4f} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
