"""Load on `imgcls serve` from loopback, batching on and off, against the model alone (issue 14; not a test).

    python benchmarks/serve.py                                  # trains a tiny cifarnet first (about half a minute)
    python benchmarks/serve.py --run /tmp/imgcls-bench/run-lite0  # the figures: a Lite0 run (benchmarks/make_run.py)
    python benchmarks/serve.py --run RUN --requests 400 --concurrency 32 200 --batch-size 8 --batch-wait-ms 5

Server: ``python -m imgcls.cli serve RUN`` on 127.0.0.1 and a free port, started once per configuration:

* batching on: ``--batch-size B --batch-wait-ms W`` (default 8 and 5 ms);
* batching off: ``--batch-size 1 --batch-wait-ms 0``.  The batch size is what disables batching: the
  server's batcher stops gathering at ``batch_size`` images, so with 1 every image is its own engine call
  and the wait is never used (0 only says so).

Against each server, for each ``--concurrency`` level (default 32 and 200), an asyncio + httpx load
generator sends ``--requests`` POST /predict requests of ``--images`` JPEG(s) each, at most that many in
flight, after a few warm-up requests.  The JPEGs are 640x480, made in memory from scikit-image's sample
photos (chelsea, coffee, astronaut, rocket: random 4:3 crops, maybe flipped, quality 90) so they decode
like camera pictures, not noise; 16 distinct ones are reused.  One table, a row per configuration and
concurrency: requests, errors (not answered 200: other statuses, transport errors, requests left when
``--timeout`` ran out), throughput in images/s (images answered / wall time of the phase), latency
p50/p95/p99 (ms, per request, from send to the whole answer), and the mean engine batch from the
server's /health counters during the phase.

Model only: after the servers are stopped (never at the same time: they would share the cores), the same
run is loaded in this process with ``imgcls.predict.load`` (the engine the server picks: ONNX Runtime,
int8 on CPUs when the run has ``model.int8.onnx``), the same JPEGs are decoded once with the predictor's
preprocessing, and ``predictor.engine(batch)`` is timed on batches of B (and of 1, for batching off):
``--engine-rounds`` rounds of as many images as a phase, after a warm-up; the median round counts.  The
ratio ``serve (batching on, concurrency 32) / model only (batch B)`` is the goal of issue 14 (>= 0.8).
What the two figures hold differs on purpose: the server's includes HTTP on loopback, multipart parsing,
JPEG decoding and resizing, the softmax and the JSON answer, and the load generator runs on the same
cores; the model-only figure is the engine call alone on images already decoded.

Bounded: each phase stops after its requests or ``--timeout`` seconds, each request after ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
SIZE = (640, 480)
DISTINCT = 16
WARMUP = 3  # requests (and engine calls) before a phase is timed: the first calls allocate


def tiny_run(root: Path) -> Path:
    """A cifarnet trained for one epoch on three classes of 32 px generated images, exported to ONNX."""
    import imgcls

    rng = np.random.default_rng(0)
    for c, colour in enumerate(((200, 60, 40), (40, 180, 60), (50, 70, 200))):
        folder = root / "data" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    result = imgcls.train(root / "data", root / "run", model="cifarnet", epochs=1, batch_size=8, workers=0,
                          export_onnx=True, progress=False)
    return Path(result.run_dir)


def photos(n: int = DISTINCT, size: tuple[int, int] = SIZE) -> list[bytes]:
    """n JPEGs of ``size``: random 4:3 crops (40-100% of the side) of sample photos, maybe flipped."""
    from skimage import data

    bases = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        base = bases[i % len(bases)]
        w, h = base.size
        ch = rng.uniform(0.4, 1.0) * min(h, w * 3 / 4)
        cw = ch * 4 / 3
        left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        image = base.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, port: int, options: list[str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "imgcls.cli", "-q", "serve", str(model), "--host", "127.0.0.1",
                             "--port", str(port), *options], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise SystemExit(f"the server did not start; its log:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Row:
    config: str
    concurrency: int
    requests: int
    errors: int
    images_per_s: float
    p50: float
    p95: float
    p99: float
    mean_batch: float


async def phase(url: str, bodies: list[bytes], requests: int, concurrency: int, images: int,
                timeout: float) -> tuple[list[float], int, float, dict]:
    """Latencies (s), requests not answered 200, wall time (s), and /health's engine counters before the load."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    answered = 0

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        async def one(i: int) -> None:
            nonlocal answered
            files = [("file", (f"{i}_{j}.jpg", bodies[(i + j) % len(bodies)], "image/jpeg"))
                     for j in range(images)]
            async with gate:
                start = time.perf_counter()
                try:
                    response = await client.post("/predict", files=files)
                except httpx.HTTPError:
                    return  # counted as an error: not answered 200
                latencies.append(time.perf_counter() - start)
                answered += response.status_code == 200

        for i in range(WARMUP):
            await one(-1 - i)
        latencies.clear()
        answered = 0
        before = (await client.get("/health")).json()["engine"]
        start = time.perf_counter()
        tasks = [asyncio.ensure_future(one(i)) for i in range(requests)]
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:  # past --timeout: abandoned, counted as errors
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return latencies, requests - answered, time.perf_counter() - start, before


def measure(url: str, config: str, bodies: list[bytes], concurrency: int, args) -> Row:
    latencies, errors, wall, before = asyncio.run(
        phase(url, bodies, args.requests, concurrency, args.images, args.timeout))
    after = httpx.get(f"{url}/health", timeout=30).json()["engine"]
    calls = after["engine_calls"] - before["engine_calls"]
    images = after["images"] - before["images"]
    ms = np.array(latencies or [float("nan")]) * 1000
    p50, p95, p99 = (float(np.percentile(ms, q)) for q in (50, 95, 99))
    return Row(config, concurrency, args.requests, errors, (args.requests - errors) * args.images / wall,
               p50, p95, p99, images / max(1, calls))


def serve_rows(model: Path, bodies: list[bytes], args, tmp: Path) -> tuple[list[Row], dict]:
    configs = {f"on (batch <= {args.batch_size}, wait {args.batch_wait_ms:g} ms)":
                   ["--batch-size", str(args.batch_size), "--batch-wait-ms", str(args.batch_wait_ms)],
               "off (batch 1)": ["--batch-size", "1", "--batch-wait-ms", "0"]}
    rows, info = [], {}
    for config, options in configs.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp / f"server-{port}.log"
        proc = start_server(model, port, [*options, "--max-files", str(max(32, args.images))], log)
        try:
            info = httpx.get(f"{url}/info", timeout=30).json()
            for concurrency in args.concurrency:
                rows.append(measure(url, config, bodies, concurrency, args))
                print(f"  {config}, concurrency {concurrency}: {rows[-1].images_per_s:.1f} images/s", flush=True)
        except Exception:
            print(f"the server's log:\n{log.read_text()[-4000:]}", file=sys.stderr)
            raise
        finally:
            stop_server(proc)
    return rows, info


def model_only(model: Path, bodies: list[bytes], batch_sizes: list[int], images: int, rounds: int):
    """The predictor's engine alone: images/s (median round) per batch size, and its backend."""
    from imgcls.data.decode import load_uint8_bytes
    from imgcls.predict import load

    predictor = load(model)
    decoded = [load_uint8_bytes(data, predictor.preprocess) for data in bodies]
    rates = {}
    for size in batch_sizes:
        batches = [np.stack([decoded[(k * size + j) % len(decoded)] for j in range(size)])
                   for k in range(len(decoded))]
        calls = max(1, -(-images // size))
        for k in range(WARMUP):
            predictor.engine(batches[k % len(batches)])
        per_round = []
        for _ in range(rounds):
            start = time.perf_counter()
            for k in range(calls):
                predictor.engine(batches[k % len(batches)])
            per_round.append(calls * size / (time.perf_counter() - start))
        rates[size] = (statistics.median(per_round), min(per_round), max(per_round))
    return rates, predictor.backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="run directory or model file (default: train a tiny cifarnet)")
    parser.add_argument("--requests", type=int, default=400, help="requests per phase (configuration x concurrency)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 200], help="requests in flight at most")
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--batch-size", type=int, default=8, help="the server's batch size with batching on")
    parser.add_argument("--batch-wait-ms", type=float, default=5, help="the server's wait with batching on")
    parser.add_argument("--engine-rounds", type=int, default=3, help="model-only rounds (of --requests images)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a phase is abandoned")
    args = parser.parse_args()

    bodies = photos()
    with tempfile.TemporaryDirectory(prefix="imgcls-serve-bench-") as tmp:
        tmp = Path(tmp)
        model = args.run or tiny_run(tmp)
        print(f"serving {model} ...", flush=True)
        rows, info = serve_rows(model, bodies, args, tmp)
        print("model only ...", flush=True)
        images = args.requests * args.images
        rates, backend = model_only(model, bodies, sorted({args.batch_size, 1}), images, args.engine_rounds)

    print(f"\nmodel {info['model']} ({len(info['labels'])} classes, input {info['preprocess']['input_size']} px, "
          f"server: {info['engine']}, in process: {backend}); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; {args.images} {SIZE[0]}x{SIZE[1]} JPEG(s) per request, "
          f"{DISTINCT} distinct")
    head = ("batching", "concurrency", "requests", "errors", "images/s", "p50 ms", "p95 ms", "p99 ms", "mean batch")
    table = [head] + [(r.config, str(r.concurrency), str(r.requests), str(r.errors), f"{r.images_per_s:.1f}",
                       f"{r.p50:.1f}", f"{r.p95:.1f}", f"{r.p99:.1f}", f"{r.mean_batch:.2f}") for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    for line in table:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))
    print(f"\nmodel only (engine call on decoded images, median of {args.engine_rounds} rounds of {images} images):")
    for size, (median, low, high) in rates.items():
        print(f"  batch {size}: {median:.1f} images/s (rounds {low:.1f}-{high:.1f})")
    engine = rates[args.batch_size][0]
    for r in rows:
        if r.config.startswith("on"):
            goal = " (goal >= 0.8)" if r.concurrency == 32 else ""
            print(f"serve batching on, concurrency {r.concurrency} / model only batch {args.batch_size}: "
                  f"ratio {r.images_per_s / engine:.2f}{goal}")
    if info["engine"] != backend:
        print(f"warning: the server ran {info['engine']}, this process {backend}: the ratio compares different engines")


if __name__ == "__main__":
    main()
