"""channels_last against the default layout for CPU training steps, per model family (not a test).

One SGD step (forward, cross-entropy, backward, update) of each model on random images, the two
layouts interleaved round by round so that load from other processes falls on both alike; prints the
median step time of each and their ratio (default / channels_last: above 1 means channels_last is
faster). ``imgcls.train.accel.CPU_CHANNELS_LAST`` lists the families whose ratio was clearly above 1.

    python benchmarks/layout.py                       # every family's representative, 2 threads
    python benchmarks/layout.py --models efficientnet_lite0 --threads 1 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from imgcls.models.registry import create_model, model_spec

# one model per family, at a size and batch that keep a step near a second on two cores
CASES = {
    "cifarnet": (32, 128),
    "resnet18": (64, 32),
    "efficientnet_lite0": (224, 16),
    "efficientnet_b0": (224, 16),
    "convnextv2_atto": (224, 16),
    "convnext_tiny": (128, 8),
    "vgg11_bn": (64, 16),
    "alexnet": (224, 16),
}


def step_seconds(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
                 steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def measure(name: str, size: int, batch: int, rounds: int, steps: int) -> dict:
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    # one model per layout, each warmed up once: switching a model's layout between rounds makes
    # oneDNN re-plan every kernel, and that is not what a training run pays
    setups = {}
    for key, fmt in {"default": torch.contiguous_format, "channels_last": torch.channels_last}.items():
        torch.manual_seed(0)
        net = create_model(name, 10).train().to(memory_format=fmt)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        setups[key] = (net, x.contiguous(memory_format=fmt), opt)
        step_seconds(net, setups[key][1], y, opt, 2)
    times = {k: [] for k in setups}
    for _ in range(rounds):
        for key, (net, xx, opt) in setups.items():
            times[key].append(step_seconds(net, xx, y, opt, steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [d / c for d, c in zip(times["default"], times["channels_last"])]
    return {"model": name, "family": model_spec(name).family, "px": size, "batch": batch,
            "default_s": med["default"], "channels_last_s": med["channels_last"],
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps timed per round and layout")
    ap.add_argument("--px", type=int, help="image side for every model (default: the table's)")
    ap.add_argument("--batch", type=int, help="batch for every model (default: the table's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds of {args.steps} steps")
    print(f"{'model':20s} {'family':12s} {'px':>4s} {'batch':>5s} {'default s':>10s} {'ch_last s':>10s} "
          f"{'ratio':>6s}  (min-max)")
    for name in args.models:
        size, batch = args.px or CASES[name][0], args.batch or CASES[name][1]
        r = measure(name, size, batch, args.rounds, args.steps)
        print(f"{r['model']:20s} {r['family']:12s} {r['px']:4d} {r['batch']:5d} {r['default_s']:10.3f} "
              f"{r['channels_last_s']:10.3f} {r['ratio']:6.2f}  ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
              flush=True)


if __name__ == "__main__":
    main()
