"""The training data path: per-image PIL work vs the array cache augmented on tensors (not a test).

    python benchmarks/data_path.py                       # 5,000 CIFAR-10 train images, 3 rounds
    python benchmarks/data_path.py --train-images 10000 --rounds 5

Data: a class-balanced subset of ../shared/data/cifar10-jpeg.tar.gz extracted into
``--data`` (/tmp by default, never the repository).  Augmentation everywhere: a random
32 px crop of the image padded by 4 (reflect) and a horizontal flip, so every path does
the same work.

Part 1, the data path alone (images/s of one pass over the training images, batch
``--batch``, no model):

* ``PIL + DataLoader(2 workers)``: the loop everybody writes first (a Dataset opening
  each JPEG with PIL, torchvision transforms per image, 2 worker processes);
* ``imgcls --cache none``: imgcls's decode-every-epoch path (the same, in imgcls's Dataset);
* ``imgcls --cache ram``: decoded once into RAM, torchvision transforms per image in the
  training process;
* ``imgcls --cache array``: the memory-mapped array cache, batches augmented at once on the
  device (``data.dataset.ArrayLoader``).

Building the array cache (decode every file once) and mapping it again on a later run are
timed separately.

Part 2, whole training (``imgcls.train``, cifarnet at 32 px, 1 epoch, SGD, batch ``--batch``):
images/s of the epoch's training loop (metrics.csv) with ``--cache ram`` and ``--cache array``,
and ``step only``: the same model's training steps on one batch already in memory, the
ceiling a data path could reach.  The rounds alternate the paths (A B A B ...) so the
machine's other load hits all alike; the table gives medians and the per-round ratio.

Measured 2026-12-06 on the 2-core development machine shared with other sessions (load 7-10),
5,000 images, batch 256, 3 rounds, torch 2 threads with passive OpenMP waiting:

| data path alone | img/s | x PIL loader |
|---|---|---|
| PIL + DataLoader(2 workers) | 912 | 1.00 |
| imgcls --cache none | 1295 | 1.49 |
| imgcls --cache ram | 4586 | 4.34 |
| imgcls --cache array | 21737 | 22.87 |

| cifarnet training, 32 px | img/s | x --cache ram |
|---|---|---|
| --cache ram | 2674 | 1.00 |
| --cache array | 4495 | 1.59 |
| step only (the ceiling) | 5935 | 2.04 |

Building the array cache took 1.7 s (2,868 img/s, the JPEGs in the page cache), mapping it
again 39 ms.  The array path feeds the model 4.8x faster than the model trains, so the loader
is not the bottleneck; the rest of the gap to the ceiling is the augmentation itself and the
loop's per-step work.  A first run with torch imported before imgcls (OpenMP spinning) gave
405 / 508 / 135 / 3,409 img/s for the four data paths: per-image tensor work collapses with
spinning threads on a busy machine.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import imgcls  # before torch, as the command line imports it: its OpenMP defaults apply to this process
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from imgcls.data import arraycache
from imgcls.data.dataset import ArrayLoader, ImageDataset, decode_all
from imgcls.data.preprocess import Augment, Preprocess
from imgcls.data.records import Record

HERE = Path(__file__).resolve()
ARCHIVES = [HERE.parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz",
            HERE.parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"]
SPEC = Preprocess(input_size=32, resize="squash", crop_pct=1.0, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
AUGMENT = Augment(crop_padding=4, pad_mode="reflect", hflip=True, color_jitter=0.0)


def extract_subset(target: Path, per_class: int) -> list[Record]:
    """The first ``per_class`` training JPEGs of each class, extracted once into ``target``."""
    archive = next((a for a in ARCHIVES if a.exists()), None)
    root = target / f"cifar10-{per_class}"
    if not (root / "done").exists():
        if archive is None:
            raise SystemExit(f"no CIFAR-10 archive at {', '.join(map(str, ARCHIVES))}")
        counts: dict[str, int] = {}
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = Path(member.name).parts
                if len(parts) != 4 or parts[1] != "train" or not member.isfile():
                    continue
                if counts.get(parts[2], 0) < per_class:
                    counts[parts[2]] = counts.get(parts[2], 0) + 1
                    tar.extract(member, root, filter="data")
        (root / "done").touch()
    return [Record(str(p), p.parent.name) for p in sorted((root / "cifar10" / "train").glob("*/*.jpg"))]


class PlainDataset(torch.utils.data.Dataset):
    def __init__(self, records, index, transform):
        self.records, self.index, self.transform = records, index, transform

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        return self.transform(Image.open(r.path).convert("RGB")), self.index[r.label]


def one_pass(loader) -> float:
    """images/s of iterating a loader once (each batch touched, as a model would)."""
    seen, start = 0, time.perf_counter()
    for images, _ in loader:
        seen += images.shape[0]
        images.float().sum()  # the batch exists, converted as the model would
    return seen / (time.perf_counter() - start)


def data_paths(records, index, batch: int, cache_dir: Path) -> dict:
    plain_transform = v2.Compose([v2.ToImage(), v2.RandomCrop(32, padding=4, padding_mode="reflect"),
                                  v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                                  v2.Normalize(SPEC.mean, SPEC.std)])
    plain = torch.utils.data.DataLoader(PlainDataset(records, index, plain_transform), batch_size=batch,
                                        shuffle=True, num_workers=2, drop_last=True)
    on_the_fly = torch.utils.data.DataLoader(ImageDataset(records, index, SPEC, AUGMENT), batch_size=batch,
                                             shuffle=True, num_workers=2, drop_last=True)
    ram = [a for a in decode_all(records, SPEC, AUGMENT, workers=2).arrays if a is not None]
    in_ram = torch.utils.data.DataLoader(ImageDataset(records, index, SPEC, AUGMENT, ram), batch_size=batch,
                                         shuffle=True, num_workers=0, drop_last=True)
    array = arraycache.load_or_build(records, SPEC, AUGMENT, cache_dir).view()
    tensor = ArrayLoader(ImageDataset(records, index, SPEC, AUGMENT, array), batch, shuffle=True,
                         generator=torch.Generator().manual_seed(0), drop_last=True)
    return {"PIL + DataLoader(2 workers)": plain, "imgcls --cache none": on_the_fly, "imgcls --cache ram": in_ram,
            "imgcls --cache array": tensor}


def step_only(batch: int, seconds: float = 5.0) -> float:
    """cifarnet training steps on one batch held in memory: the ceiling of any data path."""
    from imgcls.models.classifier import Classifier
    from imgcls.models.registry import create_model

    model = Classifier(create_model("cifarnet", 10, 32), SPEC)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    x, y = torch.rand(batch, 3, 32, 32) * 255, torch.randint(0, 10, (batch,))
    seen, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += batch
    return seen / (time.perf_counter() - start)


def train_ips(csv_path: Path, cache: str, batch: int, out: Path, cache_dir: Path) -> float:
    result = imgcls.train(csv_path, out, model="cifarnet", epochs=1, batch_size=batch, optimizer="sgd", lr=0.05,
                          warmup_epochs=0.2, label_smoothing=0.0, augment=AUGMENT.to_dict(), input_size=32,
                          cache=cache, cache_dir=str(cache_dir), export_onnx=False, int8="off", calibrate=False,
                          progress=False)
    return float(next(csv.DictReader((result.run_dir / "metrics.csv").open()))["images_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/imgcls-data-path"))
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    records = extract_subset(args.data, args.train_images // 10)
    index = {c: i for i, c in enumerate(sorted({r.label for r in records}))}
    from imgcls.system import configure_threads

    configure_threads(torch.device("cpu"))  # the threads imgcls.train uses, for every row
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY"
          f" {os.environ.get('OMP_WAIT_POLICY')}, {len(records)} images", flush=True)
    with tempfile.TemporaryDirectory(prefix="imgcls-data-path-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        arraycache.load_or_build(records, SPEC, AUGMENT, work / "cache", workers=2)
        build = time.perf_counter() - start
        start = time.perf_counter()
        reused = arraycache.load_or_build(records, SPEC, AUGMENT, work / "cache")
        remap = time.perf_counter() - start
        assert reused.reused
        print(f"array cache: built in {build:.1f} s ({len(records) / build:.0f} img/s), mapped again in"
              f" {remap * 1000:.0f} ms", flush=True)
        loaders = data_paths(records, index, args.batch, work / "cache")
        speeds: dict[str, list[float]] = {name: [] for name in loaders}
        for r in range(args.rounds):
            names = list(loaders)[r % len(loaders):] + list(loaders)[:r % len(loaders)]
            for name in names:
                speeds[name].append(one_pass(loaders[name]))
                print(f"round {r + 1} {name:28} {speeds[name][-1]:8.0f} img/s", flush=True)
        print()
        base = "PIL + DataLoader(2 workers)"
        print("| data path alone | img/s (median) | x PIL loader (median of rounds) |")
        print("|---|---|---|")
        for name, values in speeds.items():
            ratio = statistics.median(v / b for v, b in zip(values, speeds[base]))
            print(f"| {name} | {statistics.median(values):.0f} | {ratio:.2f} |")
        if args.skip_training:
            return
        rows = [("path", "label")] + [(r.path, r.label) for r in records]
        csv_path = work / "train.csv"
        with csv_path.open("w", newline="") as handle:
            csv.writer(handle).writerows(rows)
        train: dict[str, list[float]] = {"ram": [], "array": [], "step only": []}
        for r in range(args.rounds):
            for name in (["ram", "array"] if r % 2 == 0 else ["array", "ram"]):
                train[name].append(train_ips(csv_path, name, args.batch, work / f"run-{name}-{r}", work / "cache"))
                print(f"round {r + 1} train --cache {name:6} {train[name][-1]:8.0f} img/s", flush=True)
            train["step only"].append(step_only(args.batch))
            print(f"round {r + 1} step only          {train['step only'][-1]:8.0f} img/s", flush=True)
        print()
        print("| cifarnet training, 32 px | img/s (median) | x --cache ram (median of rounds) |")
        print("|---|---|---|")
        for name, values in train.items():
            ratio = statistics.median(v / b for v, b in zip(values, train["ram"]))
            print(f"| {name} | {statistics.median(values):.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    random.seed(0)
    main()
