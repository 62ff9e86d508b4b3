"""Imbalanced classes: whether a run weighs its classes, and which classes are too small to trust.

``--class-weights auto`` (the default) turns into ``balanced`` when the
largest training class has more than :data:`IMBALANCE_RATIO` times the images
of the smallest (camera traps: mostly empty, a long tail of species), and into
``none`` otherwise.  ``balanced`` then means three things, everywhere in
training: the loss weighs every class as if all were equally frequent, the
head's cross-validation scores that weighted loss, and the epoch loop keeps
the epoch with the best balanced accuracy.

Torch-free: the decision is a function of the class counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMBALANCE_RATIO = 5.0   # largest / smallest class count above which auto balances
TINY_CLASS = 5          # fewer training images than this: the class gets a warning


@dataclass(frozen=True)
class Balance:
    """How a run treats its class frequencies (``train.balance.resolve_balance``)."""

    mode: str                      # none | balanced (auto resolved)
    reason: str
    ratio: float                   # largest / smallest training class
    tiny: dict[str, int] = field(default_factory=dict)  # classes below TINY_CLASS images -> count

    @property
    def balanced(self) -> bool:
        return self.mode == "balanced"

    @property
    def selection_metric(self) -> str:
        """What picks the best epoch: balanced accuracy when the classes are weighted."""
        return "balanced_accuracy" if self.balanced else "accuracy"

    def to_dict(self) -> dict:
        return {"class_weights": self.mode, "reason": self.reason, "imbalance_ratio": round(self.ratio, 2),
                "selection_metric": self.selection_metric, "tiny_classes": dict(self.tiny)}


def resolve_balance(mode: str, counts: dict[str, int]) -> Balance:
    """``mode`` (auto | none | balanced) and the training images per class -> a :class:`Balance`."""
    present = [n for n in counts.values() if n > 0]
    ratio = max(present) / min(present) if present else 1.0
    tiny = {c: n for c, n in sorted(counts.items()) if n < TINY_CLASS}
    if mode == "auto":
        if ratio > IMBALANCE_RATIO:
            largest = max(counts, key=counts.get)
            smallest = min(counts, key=counts.get)
            return Balance("balanced", f"auto: classes differ {ratio:.0f}:1 ({largest} {counts[largest]},"
                           f" {smallest} {counts[smallest]}), above {IMBALANCE_RATIO:g}:1; --class-weights none"
                           " switches it off", ratio, tiny)
        return Balance("none", f"auto: class counts within {IMBALANCE_RATIO:g}:1 ({ratio:.1f}:1)", ratio, tiny)
    return Balance(mode, "asked for", ratio, tiny)


def tiny_class_warning(tiny: dict[str, int]) -> str | None:
    """The warning for classes with fewer than :data:`TINY_CLASS` training images, or None."""
    if not tiny:
        return None
    names = ", ".join(f"{c} ({n} image{'s' if n != 1 else ''})" for c, n in tiny.items())
    return (f"class(es) with fewer than {TINY_CLASS} training images: {names}. The model sees too few examples"
            " to learn what they look like: expect low or erratic recall for them, and validation figures for"
            " them that rest on a handful of images. Add training images of these classes if you can.")
