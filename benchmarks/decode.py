"""Decode speed: JPEG file -> 224x224 uint8 crop, one thread.

Makes N (default 50) 2048x1536 JPEGs (quality 90) from a real photo
(scikit-image sample data, resized), then times, per image, decode + the eval
geometry (:func:`imgcls.data.preprocess.resize_and_crop`, shorter side 256,
center crop 224):

  pil-full        Image.open().convert("RGB"), full-size decode
  pil-draft       Image.draft("RGB", (256, 256)): libjpeg DCT scaling 1/2, 1/4, 1/8
  simplejpeg      simplejpeg.decode_jpeg(min_height=256, min_width=256):
                  libjpeg-turbo's own choice of scale M/8 (may be 3/8, 5/8, ...)
  simplejpeg-pow2 simplejpeg at the power-of-two scale Pillow's draft picks
  load_uint8      imgcls.data.decode.load_uint8 (what predict uses)

Reported: images/s by wall clock and by CPU time of this process (the CPU
figure is steadier on a shared machine), best of --repeat rounds, the ratio
to pil-full, and the mean / max absolute pixel difference of each crop from
the pil-full crop.

``--scan`` also times imgcls.data.scan.check_image (1/8-scale decode) and
scan_paths with 1, 2 and 4 threads against a 2-process pool.

    python benchmarks/decode.py [--n 50] [--size 2048x1536] [--repeat 3] [--scan]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from imgcls.data import decode
from imgcls.data.preprocess import Preprocess, resize_and_crop

try:
    import simplejpeg
except ImportError:  # pragma: no cover
    simplejpeg = None


def make_images(folder: Path, n: int, size: tuple[int, int], quality: int, photo: str) -> list[Path]:
    from skimage import data

    base = Image.fromarray(getattr(data, photo)()).convert("RGB")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        # a different crop of the photo each time, so files are not identical
        w, h = base.size
        dx, dy = rng.integers(0, w // 10), rng.integers(0, h // 10)
        image = base.crop((dx, dy, dx + w * 9 // 10, dy + h * 9 // 10)).resize(size, Image.Resampling.BICUBIC)
        path = folder / f"photo_{i:03d}.jpg"
        image.save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths


def pil_full(path, spec):
    with Image.open(path) as image:
        return resize_and_crop(image.convert("RGB"), spec)


def pil_draft(path, spec):
    with Image.open(path) as image:
        image.draft("RGB", (spec.resize_size, spec.resize_size))
        return resize_and_crop(image.convert("RGB"), spec)


def simplejpeg_scaled(path, spec):
    data = Path(path).read_bytes()
    array = simplejpeg.decode_jpeg(data, min_height=spec.resize_size, min_width=spec.resize_size)
    return resize_and_crop(Image.fromarray(array), spec)


def simplejpeg_pow2(path, spec):
    data = Path(path).read_bytes()
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    scale = decode.jpeg_draft_scale((width, height), spec.resize_size)
    array = simplejpeg.decode_jpeg(data, min_height=-(-height // scale), min_width=-(-width // scale))
    return resize_and_crop(Image.fromarray(array), spec)


def load_uint8(path, spec):
    return decode.load_uint8(path, spec)


def time_method(fn, paths, spec, repeat):
    fn(paths[0], spec)  # warm up
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        for path in paths:
            fn(path, spec)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return len(paths) / best_wall, len(paths) / best_cpu


def decode_table(paths, spec, repeat):
    methods = {"pil-full": pil_full, "pil-draft": pil_draft}
    if simplejpeg is not None:
        methods["simplejpeg"] = simplejpeg_scaled
        methods["simplejpeg-pow2"] = simplejpeg_pow2
    methods["load_uint8"] = load_uint8
    reference = [pil_full(p, spec).astype(np.int16) for p in paths[:10]]
    rows = []
    for name, fn in methods.items():
        wall, cpu = time_method(fn, paths, spec, repeat)
        diffs = [np.abs(fn(p, spec).astype(np.int16) - ref) for p, ref in zip(paths, reference)]
        rows.append((name, wall, cpu, float(np.mean(diffs)), int(max(d.max() for d in diffs))))
    base_cpu = rows[0][2]
    print(f"\n{'method':16s} {'img/s wall':>10s} {'img/s cpu':>10s} {'x full (cpu)':>12s} "
          f"{'mean|d|':>8s} {'max|d|':>7s}")
    for name, wall, cpu, mean_d, max_d in rows:
        print(f"{name:16s} {wall:10.1f} {cpu:10.1f} {cpu / base_cpu:12.2f} {mean_d:8.3f} {max_d:7d}")


def scan_table(paths, repeat):
    from imgcls.data.scan import check_image, scan_paths

    def best(fn):
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return len(paths) / min(times)

    def full_decode():
        for p in paths:
            decode.open_image(p)

    def process_pool():
        with ProcessPoolExecutor(2) as pool:
            list(pool.map(check_image, paths, chunksize=4))

    rows = {
        "open_image full, 1 thread": best(full_decode),
        "check_image, 1 thread": best(lambda: [check_image(p) for p in paths]),
        "scan_paths workers=2 (threads)": best(lambda: scan_paths(paths, workers=2)),
        "scan_paths workers=4 (threads)": best(lambda: scan_paths(paths, workers=4)),
        "process pool, 2 processes": best(process_pool),
    }
    print(f"\n{'scan':32s} {'files/s wall':>12s}")
    for name, rate in rows.items():
        print(f"{name:32s} {rate:12.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--size", default="2048x1536")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--photo", default="chelsea", help="scikit-image sample: chelsea, astronaut, coffee, ...")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--scan", action="store_true", help="also time check_image / scan_paths")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    spec = Preprocess(input_size=args.input_size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.n, size, args.quality, args.photo)
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        print(f"{args.n} JPEGs {size[0]}x{size[1]} q{args.quality} from skimage '{args.photo}', "
              f"{mb:.2f} MB each; crop {spec.input_size} (shorter side {spec.resize_size}); "
              f"simplejpeg {'yes' if simplejpeg else 'no'}; cpus {len(os.sched_getaffinity(0))}; "
              f"load average {os.getloadavg()[0]:.1f}")
        decode_table(paths, spec, args.repeat)
        if args.scan:
            scan_table(paths, args.repeat)


if __name__ == "__main__":
    main()
