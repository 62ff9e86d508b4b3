"""Model-only throughput of the engines, side by side (not a test).

    python benchmarks/engines.py                   # lite0 + resnet50, batch 32 at 224 px
    python benchmarks/engines.py --no-jemalloc     # skip the LD_PRELOAD=jemalloc rows
    python benchmarks/engines.py --models lite0 --repeats 5

For each model (timm ``tf_efficientnet_lite0`` and torchvision ``resnet50``,
random weights, 1000 classes): images/s of one uint8 batch through

* torch eager fp32 (contiguous NCHW) and torch channels_last fp32, each under
  three allocators: glibc malloc as it comes, glibc after
  ``imgcls.prediction.engines.tune_cpu_allocator()`` (TorchEngine's default on CPU), and
  jemalloc via ``LD_PRELOAD`` (when libjemalloc2 is installed);
* ONNX Runtime fp32 (``export_onnx``; OnnxEngine defaults) and int8
  (``quantize_int8``: QDQ, per-channel, calibrated on random images).

Every allocator needs its own process (an allocator cannot be changed inside
a running one), so the torch rows run in worker processes, one per allocator,
and ONNX Runtime in this one.  The machine may be shared with others, so the
rows are measured round-robin (one call of each row per round, ``--repeats``
rounds after a warm-up round, order reversed every round, a short pause before
each call): a burst of someone else's load hits every row alike instead of the
rows that happened to run during it, and no row runs beside the still-spinning
threads of the row before it.  Reported: best and
median images/s; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from worker_process import WorkerProcess, refuse, serve

MODELS = {"lite0": "timm tf_efficientnet_lite0", "resnet50": "torchvision resnet50"}
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
ALLOCATORS = {"glibc": "", "tuned malloc": "", "jemalloc": JEMALLOC}


def build(name: str):
    import timm
    import torchvision

    from imgcls.data.preprocess import Preprocess
    from imgcls.models.classifier import Classifier

    net = timm.create_model("tf_efficientnet_lite0") if name == "lite0" else torchvision.models.resnet50()
    return Classifier(net, Preprocess(input_size=224)).eval()


def batch_of(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 3, 224, 224), dtype=np.uint8)


def time_call(engine, batch) -> float:
    t0 = time.perf_counter()
    engine(batch)
    return len(batch) / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- torch worker


def worker(allocator: str, batch_size: int) -> None:
    """Answers 'model layout' lines with the images/s of one call (see worker_process)."""
    import torch

    from imgcls.prediction.engines import TorchEngine, tune_cpu_allocator

    if allocator == "tuned malloc" and not tune_cpu_allocator():
        return refuse("tune_cpu_allocator() is not available here")
    batch = batch_of(batch_size)
    models, engines = {}, {}

    def handle(line: str) -> dict:
        name, layout = line.split()
        key = (name, layout)
        if key not in engines:
            if name not in models:
                torch.manual_seed(0)
                models[name] = build(name)
            # tune_allocator=False: the allocator is this process's fixed setting
            engines[key] = TorchEngine(models[name], channels_last=layout == "channels_last", tune_allocator=False)
        return {"ips": time_call(engines[key], batch)}

    serve(handle, ready=torch.get_num_threads())


def start_worker(allocator: str, batch_size: int) -> WorkerProcess:
    env = dict(os.environ)
    if ALLOCATORS[allocator]:
        env["LD_PRELOAD"] = ALLOCATORS[allocator]
    return WorkerProcess([sys.executable, __file__, "--worker", allocator, "--batch", str(batch_size)], env=env)


# ----------------------------------------------------------------------------- ONNX Runtime


def onnx_files(name: str, workdir: Path) -> tuple[Path, Path]:
    import torch

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
        t0 = time.perf_counter()
        quantize_int8(fp32, int8, (rng.integers(0, 256, (8, 3, 224, 224), dtype=np.uint8) for _ in range(4)))
        print(f"  quantized {int8} in {time.perf_counter() - t0:.1f} s", flush=True)
    return fp32, int8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/imgcls-bench"), help="cached ONNX files")
    parser.add_argument("--no-jemalloc", action="store_true", help="skip the LD_PRELOAD=jemalloc rows")
    parser.add_argument("--spin", action="store_true", help="let ONNX Runtime threads spin (ORT's own default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.batch)

    import onnxruntime
    import torch

    from imgcls.prediction.engines import OnnxEngine, available_cpus

    args.workdir.mkdir(parents=True, exist_ok=True)
    files = {name: onnx_files(name, args.workdir) for name in args.models}

    allocators = ["glibc", "tuned malloc"]
    if not args.no_jemalloc:
        if Path(JEMALLOC).exists():
            allocators.append("jemalloc")
        else:
            print(f"(no {JEMALLOC}: apt-get install libjemalloc2 for the jemalloc rows)")
    workers = {a: start_worker(a, args.batch) for a in allocators}

    batch = batch_of(args.batch)
    rows: dict[str, dict[str, object]] = {}  # model -> label -> callable
    for name in args.models:
        fp32, int8 = files[name]
        rows[name] = {}
        for alloc in allocators:
            for layout in ("eager", "channels_last"):
                label = f"torch {'eager fp32' if layout == 'eager' else 'channels_last'} [{alloc}]"
                rows[name][label] = (lambda w=workers[alloc], n=name, lay=layout: w.ask(f"{n} {lay}")["ips"])
        for label, path in (("ORT fp32", fp32), ("ORT int8", int8)):
            engine = OnnxEngine(path, spin=args.spin)
            rows[name][label] = (lambda e=engine: time_call(e, batch))

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}"
          f" ({available_cpus()} threads, spin {'on' if args.spin else 'off'}); batch {args.batch} x 224 px uint8;"
          f" {args.repeats} rounds after a warm-up; load average before: {os.getloadavg()[0]:.1f}", flush=True)
    samples = {name: {label: [] for label in r} for name, r in rows.items()}
    for round_ in range(args.repeats + 1):
        for name, r in rows.items():
            # order reversed every round and a pause before each call: threads that spin
            # after their call (ORT's default, OpenMP's) would otherwise slow the next row
            for label, run in (list(r.items()) if round_ % 2 else list(r.items())[::-1]):
                time.sleep(0.2)
                ips = run()
                if round_:  # round 0 is the warm-up
                    samples[name][label].append(ips)
        print(f"  round {round_}/{args.repeats} done, load {os.getloadavg()[0]:.1f}", flush=True)
    for w in workers.values():
        w.close()

    print(f"\nimages/s: best, median; x = best / best of torch eager fp32 [glibc];"
          f" load average after: {os.getloadavg()[0]:.1f}")
    for name, by_label in samples.items():
        best = {label: max(v) for label, v in by_label.items()}
        base = best["torch eager fp32 [glibc]"]
        print(f"\n{name} ({MODELS[name]})")
        for label, values in by_label.items():
            print(f"  {label:38s} {best[label]:7.1f} {statistics.median(values):7.1f}   x{best[label] / base:5.2f}")
        torch_best = max(v for k, v in best.items() if k.startswith("torch"))
        print(f"  ORT int8 / ORT fp32 x{best['ORT int8'] / best['ORT fp32']:.2f};"
              f" ORT fp32 / fastest torch row x{best['ORT fp32'] / torch_best:.2f};"
              f" channels_last / eager [glibc] x{best['torch channels_last [glibc]'] / base:.2f}")


if __name__ == "__main__":
    main()
