"""int8 on trained runs: the fp32 file, int8 with every node quantized (before) and int8 as shipped (not a test).

    python benchmarks/int8.py RUN [RUN ...]                 # runs of `imgcls train`, each with its model.onnx
    python benchmarks/int8.py RUN --rounds 5 --batch 32

For each run: validation accuracy of its fp32 ``model.onnx`` and of two int8 files made from it the way
training's gate makes them (``imgcls.export.gate``: up to 128 training images spread over the list,
MinMax calibration, QDQ, per-channel weights):

* **every node**: every node the quantizer takes is quantized (imgcls before session 19);
* **shipped**: ``quantize_int8`` as it is, the read-out after the last convolution kept in fp32
  (``imgcls.export.int8.readout_nodes``).

Then images/s of one uint8 batch through each file (OnnxEngine defaults), measured round-robin
(``--rounds`` rounds after a warm-up, one call per file per round, the order reversed every round) so a
burst of other load hits every row alike; the median is printed with the ratio to fp32.  The accuracy
gate keeps an int8 file when it loses at most 1 point (``imgcls.export.MAX_INT8_LOSS``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def int8_files(run: Path, work: Path) -> dict[str, Path]:
    from imgcls import rundir
    from imgcls.export import gate, int8
    from imgcls.prediction.engines import OnnxEngine

    fp32 = run / rundir.ONNX
    spec = OnnxEngine(fp32).preprocess
    train = gate._split_records(rundir.read_split(run), "train")

    def calibration():
        return gate._image_batches(gate._spread(train, gate._CALIBRATION_IMAGES), spec, gate._CALIBRATION_BATCH)

    files = {"fp32": fp32}
    real = int8.readout_nodes
    int8.readout_nodes = lambda model: []
    try:
        files["int8, every node"] = int8.quantize_int8(fp32, work / "every.onnx", calibration())
    finally:
        int8.readout_nodes = real
    files["int8, shipped"] = int8.quantize_int8(fp32, work / "shipped.onnx", calibration())
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed call's loop")
    args = parser.parse_args()

    from imgcls import rundir
    from imgcls.export import gate
    from imgcls.prediction.engines import OnnxEngine

    print(f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'run':14s} {'file':18s} {'val acc':>8s} {'img/s':>8s} {'x fp32':>7s}")
    for run in args.runs:
        labels = rundir.read_json(run / rundir.LABELS)
        val = gate._split_records(rundir.read_split(run), "val")
        with tempfile.TemporaryDirectory() as tmp:
            files = int8_files(run, Path(tmp))
            engines = {name: OnnxEngine(path) for name, path in files.items()}
            spec = engines["fp32"].preprocess
            accuracy = {name: gate._val_accuracy(path, val, spec, labels) for name, path in files.items()}
            batch = np.random.default_rng(0).integers(0, 256, (args.batch, 3, spec.input_size, spec.input_size),
                                                      dtype=np.uint8)
            rates: dict[str, list[float]] = {name: [] for name in engines}
            order = list(engines)
            for round_ in range(args.rounds + 1):
                for name in order:
                    engine = engines[name]
                    engine(batch)
                    start, n = time.perf_counter(), 0
                    while time.perf_counter() - start < args.seconds:
                        engine(batch)
                        n += len(batch)
                    if round_:  # round 0 warms up
                        rates[name].append(n / (time.perf_counter() - start))
                order.reverse()
            base = statistics.median(rates["fp32"])
            for name in engines:
                rate = statistics.median(rates[name])
                print(f"{run.name:14s} {name:18s} {accuracy[name]:8.4f} {rate:8.1f} {rate / base:7.2f}", flush=True)
    print(f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
