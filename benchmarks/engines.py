"""Model-only throughput of the engines, side by side (not a test).

    python benchmarks/engines.py                 # lite0 + resnet50, batch 32 at 224 px
    python benchmarks/engines.py --jemalloc      # also torch rows under LD_PRELOAD=libjemalloc
    python benchmarks/engines.py --models lite0 --repeats 5

For each model (timm ``tf_efficientnet_lite0`` and torchvision ``resnet50``,
random weights, 1000 classes): images/s of one batch of uint8 images through

* torch eager fp32 (contiguous NCHW), glibc malloc as it comes
* torch channels_last fp32, glibc malloc as it comes
* the same two after ``tune_cpu_allocator()`` (TorchEngine's default on CPU)
* ONNX Runtime fp32 (``export_onnx``; OnnxEngine defaults)
* ONNX Runtime int8 (``quantize_int8``: QDQ, per-channel, calibrated on random images)

Each row: one warm-up call, then the best (and median) of ``--repeats`` timed
calls.  The machine may be shared: the load average is printed with the
numbers, so compare rows of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

MODELS = {
    "lite0": "timm tf_efficientnet_lite0",
    "resnet50": "torchvision resnet50",
}
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def build(name: str):
    import timm
    import torchvision

    from imgcls.data.preprocess import Preprocess
    from imgcls.models.classifier import Classifier

    net = timm.create_model("tf_efficientnet_lite0") if name == "lite0" else torchvision.models.resnet50()
    return Classifier(net, Preprocess(input_size=224)).eval()


def timed(engine, batch, repeats: int) -> dict:
    engine(batch)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine(batch)
        times.append(time.perf_counter() - t0)
    n = len(batch)
    return {"best": n / min(times), "median": n / statistics.median(times)}


def torch_rows(name: str, batch: np.ndarray, repeats: int, tune: bool) -> dict:
    """Eager and channels_last rows (+ the same after tune_cpu_allocator when asked)."""
    import torch

    from imgcls.engines import TorchEngine, tune_cpu_allocator

    torch.manual_seed(0)
    clf = build(name)
    rows = {}
    for label, cl in (("torch eager fp32", False), ("torch channels_last", True)):
        rows[label] = timed(TorchEngine(clf, channels_last=cl, tune_allocator=False), batch, repeats)
    if tune and tune_cpu_allocator():
        for label, cl in (("torch eager + tuned malloc", False), ("torch channels_last + tuned malloc", True)):
            rows[label] = timed(TorchEngine(clf, channels_last=cl), batch, repeats)
    return rows


def ort_rows(name: str, batch: np.ndarray, repeats: int, workdir: Path, spin: bool) -> dict:
    import torch

    from imgcls.engines import OnnxEngine
    from imgcls.export import export_onnx, quantize_int8

    fp32, int8 = workdir / f"{name}.onnx", workdir / f"{name}.int8.onnx"
    if not fp32.exists():
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(build(name), [str(i) for i in range(1000)], fp32, name)
        print(f"  exported {fp32} in {time.perf_counter() - t0:.1f} s", flush=True)
    if not int8.exists():
        rng = np.random.default_rng(1)
        calib = (rng.integers(0, 256, (8, 3, 224, 224), dtype=np.uint8) for _ in range(4))
        t0 = time.perf_counter()
        quantize_int8(fp32, int8, calib)
        print(f"  quantized {int8} in {time.perf_counter() - t0:.1f} s", flush=True)
    return {
        "ORT fp32": timed(OnnxEngine(fp32, spin=spin), batch, repeats),
        "ORT int8": timed(OnnxEngine(int8, spin=spin), batch, repeats),
    }


def child(args) -> None:
    """Torch rows only, printed as JSON (runs under LD_PRELOAD=jemalloc)."""
    batch = np.random.default_rng(0).integers(0, 256, (args.batch, 3, 224, 224), dtype=np.uint8)
    print(json.dumps(torch_rows(args.child, batch, args.repeats, tune=False)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/imgcls-bench"), help="cached ONNX files")
    parser.add_argument("--jemalloc", action="store_true", help=f"also torch rows with LD_PRELOAD={JEMALLOC}")
    parser.add_argument("--spin", action="store_true", help="let ONNX Runtime threads spin (ORT's own default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import onnxruntime
    import torch

    from imgcls.engines import available_cpus

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}"
          f" ({available_cpus()} threads, spin={'on' if args.spin else 'off'}), batch {args.batch} x 224 px uint8,"
          f" best/median of {args.repeats}; load average before: {os.getloadavg()[0]:.1f}", flush=True)
    batch = np.random.default_rng(0).integers(0, 256, (args.batch, 3, 224, 224), dtype=np.uint8)
    results = {}
    for name in args.models:
        print(f"{name} ({MODELS[name]}) ...", flush=True)
        rows = {}
        # ONNX Runtime first: the glibc tuning below is process-wide (ORT has its own arena anyway)
        rows.update(ort_rows(name, batch, args.repeats, args.workdir, args.spin))
        rows.update(torch_rows(name, batch, args.repeats, tune=False))
        if args.jemalloc and Path(JEMALLOC).exists():
            env = dict(os.environ, LD_PRELOAD=JEMALLOC)
            out = subprocess.run([sys.executable, __file__, "--child", name, "--batch", str(args.batch),
                                  "--repeats", str(args.repeats)], env=env, capture_output=True, text=True)
            if out.returncode == 0:
                for label, value in json.loads(out.stdout.strip().splitlines()[-1]).items():
                    rows[label.replace("torch", "torch+jemalloc", 1)] = value
            else:
                print(f"  jemalloc run failed: {out.stderr.strip()[-300:]}")
        results[name] = rows

    # tuned-malloc rows last, in one go (the tuning cannot be undone)
    from imgcls.engines import tune_cpu_allocator

    if tune_cpu_allocator():
        for name in args.models:
            for label, value in torch_rows(name, batch, args.repeats, tune=True).items():
                if "tuned" in label:
                    results[name][label] = value

    order = ["torch eager fp32", "torch channels_last", "torch eager + tuned malloc",
             "torch channels_last + tuned malloc", "torch+jemalloc eager fp32", "torch+jemalloc channels_last",
             "ORT fp32", "ORT int8"]
    print(f"\nimages/s (best, median); ratio = best / torch eager fp32 best; load average after: {os.getloadavg()[0]:.1f}")
    for name, rows in results.items():
        base = rows["torch eager fp32"]["best"]
        print(f"\n{name}")
        for label in order:
            if label in rows:
                r = rows[label]
                print(f"  {label:38s} {r['best']:7.1f} {r['median']:7.1f}   x{r['best'] / base:5.2f}")
        print(f"  ORT int8 / ORT fp32: x{rows['ORT int8']['best'] / rows['ORT fp32']['best']:.2f};"
              f" ORT fp32 / torch channels_last: x{rows['ORT fp32']['best'] / rows['torch channels_last']['best']:.2f}")


if __name__ == "__main__":
    main()
