"""Plots: training curves, the features head's cross-validation, confusion matrices, reliability diagrams
(matplotlib, Agg backend)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(metrics_csv: str | Path, out_png: str | Path) -> None:
    with open(metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    plt = _pyplot()
    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
        ax_loss.plot(epochs, [float(r[key]) for r in rows], style, label=key.replace("_", " "))
    for key, style in (("train_accuracy", "-o"), ("val_accuracy", "-s")):
        ax_acc.plot(epochs, [float(r[key]) for r in rows], style, label=key.replace("_", " "))
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.0))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


# the two families the features head chooses between (train.head), as the plot names them
HEAD_FAMILIES = ((True, "with the source classifier as prior", "#e24a33"), (False, "plain linear head", "#4878cf"))


def chosen_cv_row(info: dict) -> dict | None:
    """The row of ``info["cv"]`` (features.json) that the head was fitted with, or None (no cross-validation:
    a class too small for it, or an older run)."""
    for row in info.get("cv") or ():
        if bool(row["prior"]) == bool(info.get("prior_used")) and info.get("penalty") is not None \
                and math.isclose(row["lambda"], info["penalty"], rel_tol=1e-9):
            return row
    return None


def plot_head_selection(info: dict, out) -> bool:
    """How the features strategy chose its head (``info``: features.json): the held-out loss (error bars: one
    standard error over the folds) and accuracy of each penalty, for each family, the chosen one starred.
    ``out``: a path or a binary file.  False, and nothing drawn, when the run holds no cross-validation of
    one head (none, or one per label or output: multi-label and multi-output runs)."""
    rows = info.get("cv") or []
    if not rows or any("label" in r or "output" in r for r in rows):
        return False
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for prior, name, colour in HEAD_FAMILIES:
        family = sorted((r for r in rows if bool(r["prior"]) == prior), key=lambda r: r["lambda"])
        if not family:
            continue
        lam = [r["lambda"] for r in family]
        ax_loss.errorbar(lam, [r["loss"] for r in family], yerr=[r.get("se", 0) for r in family], fmt="-o", ms=4,
                         capsize=3, color=colour, label=name)
        ax_acc.plot(lam, [r["accuracy"] for r in family], "-o", ms=4, color=colour, label=name)
    chosen = chosen_cv_row(info)
    if chosen is not None:
        for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            ax.plot(chosen["lambda"], chosen[key], "*", ms=15, color="black", zorder=5, label="chosen")
    weighted = info.get("cv_selection") == "balanced_accuracy"
    ax_loss.set(ylabel="held-out cross-entropy" + (" (classes weighted alike)" if weighted else ""),
                title="held-out loss (lower is better)")
    ax_acc.set(ylabel="held-out accuracy", title="held-out accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xscale("log")
        ax.invert_xaxis()  # weaker penalties, more freedom for the head, to the right
        ax.set_xlabel("penalty per image (weaker ->)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90, format="png")
    plt.close(fig)
    return True


def plot_confusion(confusion: np.ndarray, labels: list[str], out_png: str | Path) -> None:
    plt = _pyplot()
    k = len(labels)
    size = min(4 + 0.45 * k, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    totals = confusion.sum(1, keepdims=True).clip(min=1)
    ax.imshow(confusion / totals, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), labels, rotation=90 if k > 6 else 0)
    ax.set_yticks(range(k), labels)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (row-normalized colour, counts)")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if confusion[i, j] > 0.5 * totals[i, 0] else "black")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_reliability(panels: list[tuple[str, dict]], out) -> None:
    """Reliability diagrams side by side, one per ``(title, bins)``: accuracy per confidence bin against the
    diagonal a calibrated model follows, and below it the share of images per bin (``bins``:
    :meth:`imgcls.evaluation.calibration.Reliability.to_dict`).  ``out``: a path or a binary file."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False, sharex=True,
                             gridspec_kw={"height_ratios": [3, 1]})
    for column, (title, bins) in enumerate(panels):
        ax, hist = axes[0, column], axes[1, column]
        k = int(bins["bins"])
        centers = (np.arange(k) + 0.5) / k
        accuracy = np.array([np.nan if a is None else a for a in bins["accuracy"]], dtype=float)
        confidence = np.array([np.nan if c is None else c for c in bins["confidence"]], dtype=float)
        count = np.asarray(bins["count"], dtype=float)
        filled = count > 0
        ax.plot([0, 1], [0, 1], "--", color="0.45", lw=1, label="perfectly calibrated")
        ax.bar(centers[filled], accuracy[filled], width=1 / k, color="#4878cf", edgecolor="white", label="accuracy")
        ax.plot(confidence[filled], accuracy[filled], "o", color="#e24a33", ms=4,
                label="(mean confidence, accuracy)")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy", title=f"{title}  (ECE {bins['ece']:.4f})")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=7.5, frameon=False)
        hist.bar(centers, count / max(count.sum(), 1), width=1 / k, color="0.55", edgecolor="white")
        hist.set(xlim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="share")
        hist.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90, format="png")
    plt.close(fig)
