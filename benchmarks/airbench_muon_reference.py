"""airbench94_muon's training, transcribed to plain PyTorch: the yardstick for ``--recipe cifar10-quick``.

Keller Jordan's ``airbench94_muon.py`` (github.com/KellerJordan/cifar10-airbench, MIT licence) reaches
94.01% on CIFAR-10 in 8 epochs by training the 3x3 filters with Muon (momentum 0.6, lr 0.24, each
filter bank renormalised before its step) and the rest with SGD (Nesterov 0.85; head lr 0.67, bias
lr 0.053, summed loss), batch 2000, a linear decay to zero, no warm-up and no lookahead, the head
scaled by 1 / width with weights of std 1.  This file is that training on the airbench net of
``airbench_reference.py`` with three changes: fp32 on the CPU, the images from the CSV of JPEG
files, and a per-epoch input side (``--sizes``, progressive resizing as imgcls does it: a global
max-pool, batches shrunk by an antialiased bilinear resize).  No imgcls code trains here.

    python benchmarks/airbench_muon_reference.py --widths 64 128 128 --sizes 24 24 24 24 24 24 28 28 28 32 32 32 32

Measured (2 cores, fp32; docs/decisions.md, session 16), airbench93 widths, seed 0, test accuracy
plain / mirror / mirror + shifts:

- 24 x 6, 28 x 3, 32 x 4 (0.145 PFLOP): 0.8896 / 0.8994 / 0.9017;
- the same sides with airbench94's SGD, triangle and lookahead (batch 1024): 0.8831 / 0.8937 / 0.8965.

airbench95's widths, ``--widths 128 384 384`` for 11 epochs at 32 px (0.9945 PFLOP; session 18):
0.9108 / 0.9178 / 0.9192.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import airbench_reference as ar

NS = (3.4445, -4.7750, 2.0315)  # the quintic Newton-Schulz coefficients


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    x = g / (g.norm() + eps)
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    for _ in range(steps):
        gram = x @ x.T
        x = NS[0] * x + (NS[1] * gram + NS[2] * gram @ gram) @ x
    return x.T if tall else x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=Path("/tmp/data/full.csv"),
                        help="path,label,split CSV of the JPEGs (benchmarks/cifar10_data.py writes it)")
    parser.add_argument("--widths", type=int, nargs=3, default=[64, 256, 256])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32] * 8, help="input side of each epoch")
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = train_muon_reference(*ar.load_csv(args.csv, "test"), args.sizes, tuple(args.widths), args.batch_size,
                                  args.seed)
    print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **result}))


def train_muon_reference(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                         sizes: list[int], widths=(64, 256, 256), batch_size: int = 2000, seed: int = 0,
                         log=print) -> dict:
    """airbench94_muon's training on normalized NCHW float images, one epoch per entry of ``sizes`` (its input
    side); test accuracy after each epoch and at the end with TTA levels 0, 1 and 2 (as ``train_reference``)."""
    torch.manual_seed(seed)
    net = ar.make_net(tuple(widths), int(max(y_train.max(), y_test.max())) + 1)
    net[-4] = nn.AdaptiveMaxPool2d(1)
    net[-1] = ar.Mul(1 / widths[2])
    with torch.no_grad():
        net[-2].weight /= net[-2].weight.std()
    bs, per_epoch = batch_size, len(x_train) // batch_size
    total, bias_steps = per_epoch * len(sizes), 3 * per_epoch
    decay = 2e-6 * bs
    filters = [p for p in net.parameters() if p.ndim == 4 and p.requires_grad]
    norm_biases = [p for k, p in net.named_parameters() if "norm" in k and p.requires_grad]
    stem_bias, head = net[0].bias, net[-2].weight
    sgd = torch.optim.SGD([dict(params=[stem_bias], lr=0.053, weight_decay=decay / 0.053),
                           dict(params=norm_biases, lr=0.053, weight_decay=decay / 0.053),
                           dict(params=[head], lr=0.67, weight_decay=decay / 0.67)], momentum=0.85, nesterov=True)
    initial = [g["lr"] for g in sgd.param_groups]
    buffers = [torch.zeros_like(p) for p in filters]
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2, reduction="sum")
    ar.init_whitening(net[0], x_train[:5000])
    flops_at = {}

    def step_flops(side):
        if side not in flops_at:
            twin = copy.deepcopy(net)
            with FlopCounterMode(display=False) as counter:
                loss_fn(twin(torch.randn(bs, 3, side, side)), y_train[:bs]).backward()
            flops_at[side] = counter.get_total_flops()
        return flops_at[side]

    flipped = torch.where((torch.rand(len(x_train)) < 0.5).view(-1, 1, 1, 1), x_train.flip(-1), x_train)
    step, flops, curve, t0 = 0, 0, [], time.perf_counter()
    for epoch, side in enumerate(sizes):
        stem_bias.requires_grad = epoch < 3
        net.train()
        source = flipped if side == 32 else F.interpolate(flipped, size=(side, side), mode="bilinear",
                                                          antialias=True, align_corners=False)
        images = ar.batch_crop(F.pad(source, (2,) * 4, "reflect"), side)
        images = images.flip(-1) if epoch % 2 else images
        order = torch.randperm(len(images))
        for i in range(per_epoch):
            idx = order[i * bs:(i + 1) * bs]
            loss_fn(net(images[idx].contiguous(memory_format=torch.channels_last)), y_train[idx]).backward()
            left = 1 - step / total
            sgd.param_groups[0]["lr"] = initial[0] * max(0.0, 1 - step / bias_steps)
            for group, lr in zip(sgd.param_groups[1:], initial[1:]):
                group["lr"] = lr * left
            sgd.step()
            with torch.no_grad():
                for p, buf in zip(filters, buffers):
                    buf.mul_(0.6).add_(p.grad)
                    update = p.grad.add(buf, alpha=0.6)
                    p.mul_(len(p) ** 0.5 / p.norm())
                    p.add_(orthogonalize(update.reshape(len(p), -1)).view_as(p), alpha=-0.24 * left)
            net.zero_grad(set_to_none=True)
            step += 1
        flops += step_flops(side) * per_epoch
        accuracy = ar.evaluate(net, x_test, y_test, 0)
        curve.append((epoch + 1, side, flops / 1e15, accuracy))
        log(f"epoch {epoch + 1} side {side} PFLOP {flops / 1e15:.4f} test acc {accuracy:.4f}"
            f" ({time.perf_counter() - t0:.0f} s)")
    return {"curve": curve, "pflop": flops / 1e15,
            **{f"tta{level}": ar.evaluate(net, x_test, y_test, level) for level in (0, 1, 2)},
            "seconds": time.perf_counter() - t0}




if __name__ == "__main__":
    main()
