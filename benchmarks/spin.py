"""Should ONNX Runtime's idle threads spin?  The figures behind OnnxEngine's choice (not a test).

    python benchmarks/spin.py                    # model-only rows, then the predict pipeline
    python benchmarks/spin.py --busy 3           # the same with 3 busy-looping processes beside it
    python benchmarks/spin.py --batch 1          # latency-sized batches

Model: ``<root>/run-lite0/model.onnx`` (EfficientNet-Lite0, built by
``benchmarks/make_run.py``); images: ``<root>/big/`` (see benchmarks/predict.py).

Rows, each an ONNX Runtime session on the same file, 2 intra-op threads:

* ``ORT defaults``: ``InferenceSession(path)`` as it comes (threads spin);
* ``spin off``: ``OnnxEngine``'s setting, ``session.intra_op.allow_spinning=0``;
* ``spin on``: spinning allowed, as ORT's default;
* ``spin on, stop after run``: spinning inside a run only (``session.force_spinning_stop``).

Model-only: images/s of ``--batch`` random uint8 images, round-robin over
``--rounds`` rounds after a warm-up, the order reversed every round and a
0.2 s pause before each call (spinning threads outlive ``run()`` and would
slow whichever row came next), every row in its own process.  Pipeline: ``Predictor.iter_probs`` over
``--images`` real JPEGs (decode threads beside the engine), the same rows
except ORT defaults (same as spin on).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from worker_process import WorkerProcess, serve

ROWS = {
    "spin off": {"session.intra_op.allow_spinning": "0"},
    "spin on": {"session.intra_op.allow_spinning": "1"},
    "spin on, stop after run": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
}


def session(path: Path, config: dict | None):
    import onnxruntime as ort

    if config is None:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def worker(row: str, mode: str, args) -> None:
    """One row in its own process: answers each stdin line with the items/s of one call."""
    run = args.root / "run-lite0"
    s = session(run / "model.onnx", ROWS.get(row))
    if mode == "model":
        x = np.random.default_rng(0).integers(0, 256, (args.batch, 3, 224, 224), dtype=np.uint8)
        per_call = max(1, 32 // args.batch)  # small batches: several calls per sample

        def call():
            for _ in range(per_call):
                s.run(None, {"images": x})
            return per_call * args.batch
    else:
        import imgcls
        from imgcls.data.records import Record

        records = [Record(p) for p in sorted((args.root / "big").glob("*.jpg"))[: args.images]]
        predictor = imgcls.load(run)
        predictor.engine.session = s

        def call():
            return sum(1 for _ in predictor.iter_probs(records))

    def handle(_line: str) -> dict:
        t0 = time.perf_counter()
        n = call()
        return {"per_second": n / (time.perf_counter() - t0)}

    serve(handle)


def start_row(row: str, mode: str, argv: list[str]) -> WorkerProcess:
    return WorkerProcess([sys.executable, __file__, "--worker", row, mode, *argv])


def round_robin(rows: dict[str, WorkerProcess], rounds: int) -> dict[str, float]:
    """Median items/s per row; order reversed every round, a pause before each call."""
    samples = {name: [] for name in rows}
    for r in range(rounds + 1):
        for name, row in (list(rows.items()) if r % 2 else list(rows.items())[::-1]):
            time.sleep(0.2)
            value = row.ask()["per_second"]
            if r:  # round 0 warms up
                samples[name].append(value)
    return {name: statistics.median(v) for name, v in samples.items()}


def report(title: str, result: dict[str, float], base: str) -> None:
    print(f"\n{title} (load {os.getloadavg()[0]:.1f})")
    for name, ips in result.items():
        print(f"  {name:26s} {ips:7.1f} /s   x{ips / result[base]:.3f} of {base}")


def busy_loop() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/imgcls-bench"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--images", type=int, default=96, help="pipeline: JPEGs per call")
    parser.add_argument("--busy", type=int, default=0, help="busy-looping processes beside the measurement")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker, args)
    if not (args.root / "run-lite0" / "model.onnx").exists():
        raise SystemExit(f"{args.root / 'run-lite0'} not found: run benchmarks/make_run.py"
                         " (and benchmarks/predict.py for big/) first")
    argv = ["--root", str(args.root), "--batch", str(args.batch), "--images", str(args.images)]
    hogs = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(args.busy)]
    for hog in hogs:
        hog.start()
    print(f"2 intra-op threads, batch {args.batch}, {args.busy} busy processes beside, {args.rounds} rounds;"
          " every row in its own process")
    try:
        for mode, names, rounds, base, title in (
            ("model", ["ORT defaults", *ROWS], args.rounds, "ORT defaults", "model only, images/s"),
            ("pipeline", list(ROWS), max(2, args.rounds // 3), "spin off",
             f"predict pipeline ({args.images} JPEGs, decode threads beside), images/s"),
        ):
            rows = {name: start_row(name, mode, argv) for name in names}
            try:
                report(title, round_robin(rows, rounds), base)
            finally:
                for row in rows.values():
                    row.close()
    finally:
        for hog in hogs:
            hog.terminate()


if __name__ == "__main__":
    main()
