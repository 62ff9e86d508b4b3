"""Load on `imgcls serve` from loopback, batching on and off, against the model alone (issue 14; not a test).

    python benchmarks/serve.py                                  # trains a tiny cifarnet first (about half a minute)
    python benchmarks/serve.py --run /tmp/imgcls-bench/run-lite0  # the figures: a Lite0 run (benchmarks/make_run.py)
    python benchmarks/serve.py --run RUN --size 1920x1080 --rounds 3 --requests 400 --concurrency 32 200

Servers: ``python -m imgcls.cli serve RUN`` on 127.0.0.1, one per configuration, all started first and
left idle while another is measured:

* batching on: ``--batch-size B --batch-wait-ms W`` (default 8 and 5 ms);
* batching off: ``--batch-size 1 --batch-wait-ms 0``.  The batch size is what disables batching: the
  batcher stops gathering at ``batch_size`` images, so every image is its own engine call;
* ``--variant NAME='OPTIONS'`` (repeatable) adds a configuration: more ``imgcls serve`` options.

Each round measures, in turn, every configuration at every ``--concurrency`` level, then the model alone;
the order of the configurations rotates from round to round.  Other processes on the machine slow every
figure, so each ratio is taken within one round (serve and model only a few seconds apart) and the table
gives the median over ``--rounds`` rounds with their range.

Load generator: ``concurrency`` keep-alive connections on asyncio streams, each sending its next
POST /predict as soon as the answer to the last one is in, until ``--requests`` were sent (after a few
warm-up requests).  The requests are built once, as bytes (multipart, ``--images`` JPEG(s) each), so the
generator's own CPU, spent on the same cores as the server's, stays small: the table shows both, as CPU
milliseconds per image (the server's from /proc, the generator's from its process time).  The JPEGs are
``--size`` (default 640x480), made in memory from scikit-image's sample photos (chelsea, coffee,
astronaut, rocket: random 4:3 crops, maybe flipped, quality 90) so they decode like photos, not noise;
16 distinct ones are reused.

Per row: requests, errors (not answered 200: other statuses, transport errors, requests left when
``--timeout`` ran out), throughput in images/s (images answered / wall time of the phase), latency
p50/p95/p99 (ms, per request, from send to the whole answer; all rounds together), the mean engine batch
(the server's /health counters), and CPU ms per image of the server and of the generator.

Model only: the same run loaded in this process with ``imgcls.prediction.predict.load`` (the engine the server
picks: ONNX Runtime, int8 on CPUs when the run has ``model.int8.onnx``), the same JPEGs decoded once with
the predictor's preprocessing, and the engine timed on batches of B (and of 1) for as many images as a
phase, after a warm-up, two ways: one call at a time on every CPU (as ``imgcls predict`` runs it), and
one ONNX Runtime thread per call with one call per CPU at once (as the server runs it).  The faster of
the two in each round is the reference: ``throughput ratio`` is serve / model only (batch B), the goal
of issue 14 (>= 0.8 with batching on at concurrency 32).  The server's figure includes HTTP on
loopback, multipart parsing, JPEG decoding and resizing, the softmax and the JSON answer, and the load
generator runs on the same cores; the model-only figure is the engine call alone on decoded images.
``CPU ratio``: the engine's CPU per image (the lower of the two ways) / the server's: the throughput
ratio the server would reach on cores of its own (the generator elsewhere, as real clients are), and a
figure that other processes on the machine disturb much less than throughput.

Bounded: each phase stops after its requests or ``--timeout`` seconds, each request after ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
SIZE = (640, 480)
DISTINCT = 16
WARMUP = 3  # requests (and engine calls) before a phase is timed: the first calls allocate
BOUNDARY = "imgcls-bench-boundary"


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
    """n JPEGs of ``size``: random crops (40-100% of the side, the aspect of ``size``) of sample photos, maybe flipped."""
    from skimage import data

    bases = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    aspect = size[1] / size[0]
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        base = bases[i % len(bases)]
        w, h = base.size
        ch = rng.uniform(0.4, 1.0) * min(h, w * aspect)
        cw = ch / aspect
        left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        image = base.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def http_request(jpegs: list[bytes], names: list[str]) -> bytes:
    """A whole POST /predict request, as bytes: the JPEGs in the multipart field ``file``."""
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
             f"Content-Type: image/jpeg\r\n\r\n".encode() + jpeg + b"\r\n" for jpeg, name in zip(jpegs, names)]
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode()
    return head + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request on a keep-alive connection, read the whole answer; its status."""
    writer.write(request)
    status = int((await reader.readline()).split(b" ", 2)[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


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


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and its threads so far; NaN where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Phase:
    """One configuration at one concurrency, in one round."""

    images_per_s: float
    errors: int
    latencies: list[float]
    mean_batch: float
    server_cpu_ms: float  # per image answered
    client_cpu_ms: float


async def load(port: int, requests: list[bytes], count: int, concurrency: int, timeout: float):
    """Latencies (s), requests not answered 200, wall time (s) of ``count`` requests, ``concurrency`` at once."""
    latencies: list[float] = []
    answered = 0
    sent = iter(range(count))

    async def connection() -> None:
        nonlocal answered
        reader = writer = None
        for i in sent:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                start = time.perf_counter()
                status = await exchange(reader, writer, requests[i % len(requests)])
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                if writer is not None:
                    writer.close()
                reader = writer = None  # counted as an error: not answered 200; the next one reconnects
                continue
            latencies.append(time.perf_counter() - start)
            answered += status == 200
        if writer is not None:
            writer.close()

    start = time.perf_counter()
    tasks = [asyncio.ensure_future(connection()) for _ in range(min(concurrency, count))]
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:  # past --timeout: abandoned, counted as errors
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return latencies, count - answered, time.perf_counter() - start


def measure(proc: subprocess.Popen, port: int, requests: list[bytes], concurrency: int, args) -> Phase:
    url = f"http://127.0.0.1:{port}"
    asyncio.run(load(port, requests, WARMUP, 1, args.timeout))
    before = httpx.get(f"{url}/health", timeout=30).json()["engine"]
    server0, client0 = process_cpu(proc.pid), time.process_time()
    latencies, errors, wall = asyncio.run(load(port, requests, args.requests, concurrency, args.timeout))
    server1, client1 = process_cpu(proc.pid), time.process_time()
    after = httpx.get(f"{url}/health", timeout=30).json()["engine"]
    calls = after["engine_calls"] - before["engine_calls"]
    images = (args.requests - errors) * args.images
    return Phase(images / wall, errors, latencies, (after["images"] - before["images"]) / max(1, calls),
                 (server1 - server0) * 1000 / max(1, images), (client1 - client0) * 1000 / max(1, images))


class ModelOnly:
    """The engine alone on decoded images, run the two ways these cores allow; images/s and CPU ms per image.

    ``one call``: the predictor as ``imgcls predict`` loads it, one call at a time on every CPU;
    ``side by side``: one ONNX Runtime thread per call and one call per CPU at once, as the server runs it.
    """

    def __init__(self, model: Path, bodies: list[bytes]):
        from imgcls.data.decode import load_uint8_bytes
        from imgcls.prediction.predict import load
        from imgcls.system import available_cpus

        self.predictor = load(model)
        self.single = load(model, threads=1)
        self.cpus = available_cpus()
        self.decoded = [load_uint8_bytes(data, self.predictor.preprocess) for data in bodies]

    def __call__(self, size: int, images: int) -> dict[str, tuple[float, float]]:
        decoded = self.decoded
        batches = [np.stack([decoded[(k * size + j) % len(decoded)] for j in range(size)]) for k in range(len(decoded))]
        calls = max(1, -(-images // size))
        out = {}
        for way, engine, workers in (("one call", self.predictor.engine, 1),
                                     ("side by side", self.single.engine, self.cpus)):
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(engine, [batches[k % len(batches)] for k in range(WARMUP * workers)]))
                start, cpu = time.perf_counter(), time.process_time()
                list(pool.map(engine, [batches[k % len(batches)] for k in range(calls)]))
                out[way] = (calls * size / (time.perf_counter() - start),
                            (time.process_time() - cpu) * 1000 / (calls * size))
        return out


@dataclass
class Config:
    name: str
    options: list[str]
    proc: subprocess.Popen | None = None
    port: int = 0
    phases: dict[int, list[Phase]] = field(default_factory=dict)  # concurrency -> one per round


def _span(values: list[float], digits: int = 1) -> str:
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _table(head: tuple, rows: list[tuple]) -> None:
    table = [head] + rows
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    for line in table:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="run directory or model file (default: train a tiny cifarnet)")
    parser.add_argument("--requests", type=int, default=400, help="requests per phase (configuration x concurrency)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 200], help="requests in flight at most")
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--size", type=parse_size, default=SIZE, help="the JPEGs' WIDTHxHEIGHT (default 640x480)")
    parser.add_argument("--batch-size", type=int, default=8, help="the server's batch size with batching on")
    parser.add_argument("--batch-wait-ms", type=float, default=5, help="the server's wait with batching on")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each measuring every configuration and the engine")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                        help="another server configuration: NAME and its `imgcls serve` options (repeatable)")
    parser.add_argument("--no-off", action="store_true", help="leave out the batching-off configuration")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a phase is abandoned")
    args = parser.parse_args()

    bodies = photos(size=args.size)
    on = f"on (batch <= {args.batch_size}, wait {args.batch_wait_ms:g} ms)"
    configs = [Config(on, ["--batch-size", str(args.batch_size), "--batch-wait-ms", str(args.batch_wait_ms)])]
    if not args.no_off:
        configs.append(Config("off (batch 1)", ["--batch-size", "1", "--batch-wait-ms", "0"]))
    for variant in args.variant:
        name, _, options = variant.partition("=")
        configs.append(Config(name, shlex.split(options)))
    images = args.requests * args.images
    engine_sizes = sorted({args.batch_size, 1})
    engine: dict[int, list[dict[str, tuple[float, float]]]] = {size: [] for size in engine_sizes}

    with tempfile.TemporaryDirectory(prefix="imgcls-serve-bench-") as tmp:
        tmp = Path(tmp)
        model = args.run or tiny_run(tmp)
        print(f"serving {model}: {len(configs)} servers ...", flush=True)
        try:
            for config in configs:
                config.port = free_port()
                config.proc = start_server(model, config.port, [*config.options, "--max-files",
                                                                 str(max(32, args.images))], tmp / f"{config.port}.log")
            info = httpx.get(f"http://127.0.0.1:{configs[0].port}/info", timeout=30).json()
            requests = [http_request([bodies[(i + j) % len(bodies)] for j in range(args.images)],
                                     [f"{i}_{j}.jpg" for j in range(args.images)]) for i in range(len(bodies))]
            model_only = ModelOnly(model, bodies)
            for r in range(args.rounds):
                for config in configs[r % len(configs):] + configs[:r % len(configs)]:
                    for concurrency in args.concurrency:
                        phase = measure(config.proc, config.port, requests, concurrency, args)
                        config.phases.setdefault(concurrency, []).append(phase)
                        print(f"  round {r + 1}: {config.name}, concurrency {concurrency}: {phase.images_per_s:.1f}"
                              f" images/s, {phase.errors} errors", flush=True)
                for size in engine_sizes:
                    engine[size].append(model_only(size, images))
                print(f"  round {r + 1}: model only, batch {args.batch_size}: " + ", ".join(
                    f"{way} {rate:.1f} images/s" for way, (rate, _) in engine[args.batch_size][-1].items()), flush=True)
            backend = model_only.predictor.backend
        finally:
            for config in configs:
                if config.proc is not None:
                    stop_server(config.proc)

    print(f"\nmodel {info['model']} ({len(info['labels'])} classes, input {info['preprocess']['input_size']} px, "
          f"server: {info['engine']}, in process: {backend}); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; {args.images} {args.size[0]}x{args.size[1]} JPEG(s) per request, {DISTINCT}"
          f" distinct; {args.rounds} round(s): median (min-max)")
    head = ("server", "concurrency", "requests", "errors", "images/s", "p50 ms", "p95 ms", "p99 ms", "mean batch",
            "server CPU ms/img", "load generator CPU ms/img")
    rows = []
    for config in configs:
        for concurrency, phases in config.phases.items():
            ms = np.array([t for p in phases for t in p.latencies] or [float("nan")]) * 1000
            rows.append((config.name, str(concurrency), str(args.requests * len(phases)), str(sum(p.errors for p in phases)),
                         _span([p.images_per_s for p in phases]),
                         *(f"{np.percentile(ms, q):.0f}" for q in (50, 95, 99)),
                         f"{statistics.median(p.mean_batch for p in phases):.2f}",
                         _span([p.server_cpu_ms for p in phases], 2), _span([p.client_cpu_ms for p in phases], 2)))
    _table(head, rows)
    print(f"\nmodel only (engine calls on decoded images, {images} images a round; one call: on every CPU,"
          f" side by side: one thread per call, one call per CPU):")
    for size, rounds in engine.items():
        for way in rounds[0]:
            print(f"  batch {size}, {way}: {_span([f[way][0] for f in rounds])} images/s,"
                  f" CPU {_span([f[way][1] for f in rounds], 2)} ms/img")
    # the reference is the faster way in each round, and the engine's CPU per image the lower one
    rates = [max(rate for rate, _ in f.values()) for f in engine[args.batch_size]]
    cpu = statistics.median(min(c for _, c in f.values()) for f in engine[args.batch_size])
    print(f"\nratios to the model only at batch {args.batch_size}, the faster way of each round (issue 14's goal:"
          f" >= 0.8 at concurrency 32):")
    rows = []
    for config in configs:
        for concurrency, phases in config.phases.items():
            rows.append((config.name, str(concurrency), _span([p.images_per_s / rate for p, rate in zip(phases, rates)], 2),
                         f"{cpu / statistics.median(p.server_cpu_ms for p in phases):.2f}"))
    _table(("server", "concurrency", "throughput ratio", "CPU ratio (server on cores of its own)"), rows)
    if info["engine"] != backend:
        print(f"warning: the server ran {info['engine']}, this process {backend}: the ratio compares different engines")


if __name__ == "__main__":
    main()
