"""Load on `imgcls serve` from loopback: throughput, latency and the engine's batch sizes (not a test).

    python benchmarks/serve.py                        # trains a tiny cifarnet first (about half a minute)
    python benchmarks/serve.py --run runs/r1          # an existing run directory or model file
    python benchmarks/serve.py --requests 200 --concurrency 200 --batch-wait-ms 5

A server (`python -m imgcls.cli serve`) is started on 127.0.0.1 and a free port; an asyncio + httpx load
generator sends ``--requests`` POST /predict requests of ``--images`` in-memory JPEGs each (320x240 noise
photos), at most ``--concurrency`` in flight, after a few warm-up requests.  It prints requests/s,
images/s, latency p50/p95/max and, from the server's /health counters, the engine calls and the mean
engine batch size during the load.  Bounded: it stops after the requests or ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


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


def photos(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, 3)
        ramp = np.linspace(0, 1, 320)[None, :, None] * rng.integers(-120, 120, 3)
        pixels = np.clip(base + ramp + rng.normal(0, 25, (240, 320, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, port: int, options: list[str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "imgcls.cli", "-q", "serve", str(model), "--port", str(port),
                             *options], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start; its log:\n{log.read_text()}")


async def load(url: str, bodies: list[bytes], args) -> tuple[list[float], int, float, dict]:
    """Latencies (s), requests not answered 200, wall time (s), and /health's engine counters before the load."""
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    gate = asyncio.Semaphore(args.concurrency)
    latencies, failures = [], 0

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=args.timeout) as client:
        async def one(i: int) -> None:
            nonlocal failures
            files = [("file", (f"{i}_{j}.jpg", bodies[(i + j) % len(bodies)], "image/jpeg"))
                     for j in range(args.images)]
            async with gate:
                start = time.perf_counter()
                response = await client.post("/predict", files=files)
                latencies.append(time.perf_counter() - start)
            failures += response.status_code != 200

        for i in range(3):  # warm-up: the first engine calls allocate
            await one(-1 - i)
        latencies.clear()
        before = (await client.get("/health")).json()["engine"]
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(args.requests))), args.timeout)
        return latencies, failures, time.perf_counter() - start, before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="run directory or model file (default: train a tiny cifarnet)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=200, help="requests in flight at most")
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=5)
    parser.add_argument("--timeout", type=float, default=300, help="seconds before the load is abandoned")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="imgcls-serve-bench-") as tmp:
        tmp = Path(tmp)
        model = args.run or tiny_run(tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(model, port, ["--batch-size", str(args.batch_size), "--batch-wait-ms",
                                          str(args.batch_wait_ms), "--max-files", str(max(32, args.images))],
                            tmp / "server.log")
        try:
            bodies = photos(16)
            latencies, failures, wall, engine_before = asyncio.run(load(url, bodies, args))
            engine = httpx.get(f"{url}/health").json()["engine"]
            info = httpx.get(f"{url}/info").json()
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    calls = engine["engine_calls"] - engine_before["engine_calls"]
    images = engine["images"] - engine_before["images"]
    sizes = {k: v - engine_before["batch_sizes"].get(k, 0) for k, v in engine["batch_sizes"].items()}
    ms = np.array(latencies) * 1000
    print(f"model {info['model']} ({len(info['labels'])} classes, input {info['preprocess']['input_size']} px,"
          f" {info['engine']}); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{args.requests} requests x {args.images} image(s), {args.concurrency} in flight, batch <= "
          f"{args.batch_size}, wait {args.batch_wait_ms:g} ms: {wall:.2f} s, {failures} not 200")
    print(f"throughput: {args.requests / wall:.1f} requests/s, {args.requests * args.images / wall:.1f} images/s")
    print(f"latency ms: p50 {np.percentile(ms, 50):.1f}, p95 {np.percentile(ms, 95):.1f}, max {ms.max():.1f}")
    print(f"engine: {calls} calls for {images} images, mean batch {images / max(1, calls):.2f};"
          f" batch sizes {dict(sorted((int(k), v) for k, v in sizes.items() if v))}")


if __name__ == "__main__":
    main()
