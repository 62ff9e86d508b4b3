"""Which architecture? Cost, measured speed and accuracy side by side.

For each registry model: parameters, multiply-adds at the input size, weights
size (fp32), peak activation memory of one inference (batch 1), latency at
batch 1 and throughput at batch ``batch`` measured on this machine, and the
accuracy of the best given run directory that trained it.  A scatter plot puts
GMACs on x and accuracy (or, without runs, throughput) on y, marker area
growing with the parameter count.

Units: MB = 10**6 bytes (torchinfo's "Params size (MB)"); MACs are counted as
in :mod:`imgcls.models.cost` (FLOPs in the papers' sense = multiply-adds).

Timing protocol: random weights and inputs (speed does not depend on the
values), ``eval()`` + ``torch.inference_mode()``, ``warmup`` untimed passes,
then the median of ``repeats`` timed passes.  The warm-up matters on CPU: the
first passes at a new shape set up oneDNN kernels and take orders of magnitude
longer, hence ``warmup=3`` by default.  The backend is named in every
row ("torch eager CPU, N threads" here); numbers from different backends or
machines are not comparable.
"""

from __future__ import annotations

import statistics
import time
from math import floor, log10
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..errors import UserError
from ..rundir import CONFIG, SUMMARY, read_json, read_yaml
from .catalog import build_on_meta
from .cost import format_rows, model_cost
from .registry import create_model, model_spec

__all__ = ["compare_models", "format_comparison", "plot_comparison", "run_accuracy", "measure_speed"]


# --------------------------------------------------------------------------- accuracy from runs


def run_accuracy(run_dir: str | Path) -> dict:
    """``{"run", "model", "accuracy", "split"}`` of one run directory: its
    ``config.yaml`` names the model, ``summary.json`` gives ``test_accuracy``
    (preferred) or ``best_val_accuracy``; accuracy is None if neither is there."""
    run = Path(run_dir)
    if not (run / CONFIG).is_file():
        raise UserError(f"{run}: not a run directory (no {CONFIG}); pass directories made by `imgcls train`")
    try:
        model = read_yaml(run / CONFIG).get("model")
    except Exception as exc:  # noqa: BLE001 - yaml errors vary
        raise UserError(f"{run / CONFIG}: cannot read it ({exc})") from None
    if not model:
        raise UserError(f"{run / CONFIG} has no `model` key")
    summary = {}
    if (run / SUMMARY).is_file():
        try:
            summary = read_json(run / SUMMARY)
        except ValueError as exc:
            raise UserError(f"{run / SUMMARY}: not valid JSON ({exc})") from None
    for key, split in (("test_accuracy", "test"), ("best_val_accuracy", "val")):
        if summary.get(key) is not None:
            return {"run": str(run), "model": model, "accuracy": float(summary[key]), "split": split}
    return {"run": str(run), "model": model, "accuracy": None, "split": None}


def _best_runs(runs: Iterable[str | Path]) -> dict[str, dict]:
    """model name -> its best run (test accuracy preferred over validation)."""
    best: dict[str, dict] = {}
    for run in runs:
        info = run_accuracy(run)
        if info["accuracy"] is None:
            best.setdefault(info["model"], info)
            continue
        rank = (info["split"] == "test", info["accuracy"])
        old = best.get(info["model"])
        if old is None or old["accuracy"] is None or rank > (old["split"] == "test", old["accuracy"]):
            best[info["model"]] = info
    return best


# --------------------------------------------------------------------------- speed


def backend_name(threads: int | None = None) -> str:
    n = threads or torch.get_num_threads()
    return f"torch eager CPU, {n} thread{'' if n == 1 else 's'}"


def measure_speed(net: torch.nn.Module, input_size: int, batch: int = 32, repeats: int = 10,
                  warmup: int = 3, threads: int | None = None) -> dict:
    """Median latency (ms) of one image and throughput (images/s) at ``batch``.

    ``threads``: intra-op threads for the measurement (default: torch's
    current setting), restored afterwards."""
    if repeats < 1 or batch < 1:
        raise UserError("repeats and batch must be at least 1")
    net.eval()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _measure(net, input_size, batch, repeats, warmup)
    finally:
        torch.set_num_threads(old_threads)


def _measure(net, input_size: int, batch: int, repeats: int, warmup: int) -> dict:
    def median_seconds(n: int) -> float:
        x = torch.rand(n, 3, input_size, input_size)
        with torch.inference_mode():
            for _ in range(warmup):
                net(x)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                net(x)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    one = median_seconds(1)
    many = median_seconds(batch)
    return {"latency_ms": one * 1e3, "throughput": batch / many, "backend": backend_name(torch.get_num_threads()),
            "batch": batch, "repeats": repeats}


# --------------------------------------------------------------------------- table


def compare_models(names: Sequence[str] = (), input_size: int | None = None, runs: Sequence[str | Path] = (),
                   batch: int = 32, repeats: int = 10, warmup: int = 3, num_classes: int = 1000,
                   plot_path: str | Path | None = None, speed: bool = True,
                   threads: int | None = None) -> list[dict]:
    """One row per model (``names`` plus every model trained in ``runs``).

    ``input_size`` None: each model's default.  ``speed=False`` skips the
    timing (cost columns only); ``threads`` sets torch's intra-op threads for
    the timing.  With ``plot_path`` a PNG scatter plot is
    written there too.
    """
    best = _best_runs(runs)
    names = list(dict.fromkeys([*names, *best]))
    if not names:
        raise UserError("nothing to compare: give model names and/or run directories")
    rows = []
    for name in names:
        spec = model_spec(name)
        size = input_size or spec.default_input_size
        meta_net = build_on_meta(name, num_classes, size)
        try:
            cost = model_cost(meta_net, (3, size, size))
        except Exception:  # noqa: BLE001 - an op without a meta kernel: trace on the CPU
            cost = model_cost(create_model(name, num_classes, size), (3, size, size))
        run = best.get(name, {})
        row = {"model": name, "family": spec.family, "input_size": size,
               "params": cost["params"], "macs": cost["macs"],
               "weights_mb": cost["params"] * 4 / 1e6,
               "peak_activation_mb": cost["peak_activation_bytes"] / 1e6,
               "latency_ms": None, "throughput": None, "throughput_batch": None, "backend": None,
               "accuracy": run.get("accuracy"), "accuracy_split": run.get("split"), "run": run.get("run")}
        if speed:
            net = create_model(name, num_classes, size)
            s = measure_speed(net, size, batch=batch, repeats=repeats, warmup=warmup, threads=threads)
            row.update(latency_ms=s["latency_ms"], throughput=s["throughput"], throughput_batch=batch,
                       backend=s["backend"])
            del net
        rows.append(row)
    if plot_path is not None:
        plot_comparison(rows, plot_path)
    return rows


def _sig(v: float | None, digits: int = 3) -> float | None:
    """Round to ``digits`` significant digits (0.000742 -> 0.000742, 46.73 -> 46.7)."""
    if v is None or v == 0:
        return v
    return round(v, max(0, digits - 1 - floor(log10(abs(v)))))


def format_comparison(rows: list[dict], fmt: str = "table") -> str:
    """``table`` / ``md``: rounded, readable units; ``csv`` / ``json``: raw values."""
    if fmt in ("csv", "json"):
        return format_rows(rows, fmt)
    batch_note = ""
    shown = []
    for r in rows:
        shown.append({
            "model": r["model"], "input": r["input_size"],
            "params M": _sig(r["params"] / 1e6),
            "GMACs": _sig(r["macs"] / 1e9),
            "weights MB": _sig(r["weights_mb"]),
            "peak act. MB": _sig(r["peak_activation_mb"]),
            "latency ms (b=1)": _sig(r["latency_ms"]),
            "img/s": _sig(r["throughput"]),
            "batch": r.get("throughput_batch"),
            "accuracy": None if r["accuracy"] is None else f"{r['accuracy']:.4f} ({r['accuracy_split']})",
        })
    backends = sorted({r["backend"] for r in rows if r.get("backend")})
    if backends:
        batch_note = "\nspeed: " + "; ".join(backends) + "; latency median at batch 1, img/s at `batch`"
    return format_rows(shown, fmt) + batch_note


def plot_comparison(rows: list[dict], path: str | Path) -> Path:
    """Scatter plot: x = GMACs, y = accuracy (models with a run) or else
    throughput; marker area grows with params; each point labelled."""
    # the object-oriented API with the Agg canvas: no pyplot, no global backend switch;
    # imported here because matplotlib is slow to import and only the plot needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    title = "models compared (marker area ~ parameters)"
    with_acc = [r for r in rows if r.get("accuracy") is not None]
    if with_acc:
        points, ykey, ylabel = with_acc, "accuracy", "accuracy"
        if len(with_acc) < len(rows):
            title += f"\nnot shown (no run): {', '.join(r['model'] for r in rows if r not in with_acc)}"
    else:
        points = [r for r in rows if r.get("throughput") is not None]
        first = points[0] if points else {}
        ykey = "throughput"
        ylabel = f"images/s at batch {first.get('throughput_batch')} ({first.get('backend')})"
    fig = Figure(figsize=(7, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        biggest = max(r["params"] for r in points) or 1
        xs = [r["macs"] / 1e9 for r in points]
        ys = [r[ykey] for r in points]
        sizes = [30 + 600 * r["params"] / biggest for r in points]
        ax.scatter(xs, ys, s=sizes, alpha=0.5, edgecolors="black")
        for r, x, y in zip(points, xs, ys):
            ax.annotate(f"{r['model']} ({r['params'] / 1e6:.1f}M)", (x, y), textcoords="offset points",
                        xytext=(6, 6), fontsize=8)
        if len(xs) > 1 and max(xs) / max(min(xs), 1e-12) > 50:
            ax.set_xscale("log")
        ax.margins(x=0.2, y=0.12)  # room for the labels
        if ax.get_xscale() == "linear":
            ax.set_xlim(left=0)
    else:
        ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("GMACs per image (multiply-adds)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
