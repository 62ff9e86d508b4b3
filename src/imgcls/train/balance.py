"""Imbalanced classes: how a run counters them, what picks its best model, which classes are too small.

Two choices, resolved once from the training class counts into one :class:`Balance`:

``--balance`` (:data:`BALANCE`)
    ``weights``: the loss weighs every class as if all were equally frequent;
    ``sampler``: training draws images so that every class comes up about
    equally often (where a strategy draws: :data:`SAMPLER_MEANS`); ``none``: as
    counted; ``auto`` (default): ``weights`` when the largest training class has
    more than :data:`IMBALANCE_RATIO` times the images of the smallest (camera
    traps: mostly empty, a long tail of species), else ``none``.
``--select-by`` (:data:`SELECT_BY`)
    What picks the best epoch (the epoch loop) and the head's penalty (the
    head's cross-validation, which then scores a held-out loss where every class
    weighs alike): ``accuracy`` or ``balanced_accuracy``; ``auto`` (default):
    balanced accuracy past the same ratio, whatever ``--balance`` says.

Torch-free: the decisions are functions of the class counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

IMBALANCE_RATIO = 5.0   # largest / smallest class count above which auto balances
TINY_CLASS = 5          # fewer training images than this: the class gets a warning

# the choices and their help text (train.config builds the options from them)
BALANCE = {
    "auto": f"weights when class counts differ more than {IMBALANCE_RATIO:g}:1, else none",
    "none": "classes as counted",
    "weights": "the loss weighs each class as if all were equally frequent",
    "sampler": "each epoch draws images so that every class comes up about equally often (a head fitted at"
               " once on cached features weighs images by their expected draws instead)",
}
SELECT_BY = {
    "auto": f"balanced_accuracy when class counts differ more than {IMBALANCE_RATIO:g}:1, else accuracy",
    "accuracy": "the share of images right",
    "balanced_accuracy": "the mean recall of the classes: every class counts alike",
}
# what --balance sampler does on each strategy: only an epoch loop draws images; a fit over every
# cached view at once weighs each image by its expected share of the balanced draws instead, which
# is the loss that --balance weights uses (docs/decisions.md, 2026-12-06)
SAMPLER_MEANS = {
    "finetune": "each epoch draws as many images as the training set holds, with replacement, every class"
                " about equally often (seeded per epoch)",
    "features": "the head is fitted once on every cached view, so there are no draws to balance: each image"
                " weighs its expected share of class-balanced draws, which is the loss of --balance weights",
    "tail": "the linear probe weighs each image by its expected share of class-balanced draws (the loss of"
            " --balance weights); the last-stage epochs draw cached views, every class about equally often",
}


@dataclass(frozen=True)
class Balance:
    """How a run treats its class frequencies (``train.balance.resolve_balance``)."""

    mode: str                      # none | weights | sampler (auto resolved)
    reason: str
    ratio: float                   # largest / smallest training class
    tiny: dict[str, int] = field(default_factory=dict)  # classes below TINY_CLASS images -> count
    selection_metric: str = "accuracy"  # accuracy | balanced_accuracy (auto resolved)
    selection_reason: str = "asked for"
    strategy: str = ""             # the strategy that fits (set by strategies.choose)

    def loss_weights(self, draws: bool) -> str:
        """``balanced`` or ``none``: the class weights of a loss (``head.class_weights``).  ``draws``: the
        loss is over images drawn by the sampler (the epoch loops), which then do the balancing."""
        return "balanced" if self.mode == "weights" or (self.mode == "sampler" and not draws) else "none"

    @property
    def sampler(self) -> bool:
        return self.mode == "sampler"

    @property
    def cv_weights(self) -> str:
        """The class weights of the head's cross-validated loss: balanced when selecting by balanced accuracy."""
        return "balanced" if self.selection_metric == "balanced_accuracy" else "none"

    def sampler_note(self) -> str | None:
        """What ``--balance sampler`` does on this run's strategy, or None when not asked for."""
        return SAMPLER_MEANS.get(self.strategy) if self.sampler else None

    def for_strategy(self, name: str) -> "Balance":
        return replace(self, strategy=name)

    def to_dict(self) -> dict:
        data = {"balance": self.mode, "reason": self.reason, "imbalance_ratio": round(self.ratio, 2),
                "selection_metric": self.selection_metric, "selection_reason": self.selection_reason,
                "tiny_classes": dict(self.tiny)}
        if self.sampler_note():
            data["sampler"] = self.sampler_note()
        return data


def _ratio(counts: dict[str, int]) -> tuple[float, str]:
    """(largest / smallest class, "20:1 (empty 40, stoat 2)")."""
    present = [n for n in counts.values() if n > 0]
    if not present:
        return 1.0, "no counts"
    ratio = max(present) / min(present)
    largest = max(counts, key=counts.get)
    smallest = min(counts, key=counts.get)
    return ratio, f"{ratio:.0f}:1 ({largest} {counts[largest]}, {smallest} {counts[smallest]})"


def resolve_balance(mode: str, counts: dict[str, int], select_by: str = "auto") -> Balance:
    """``mode`` (auto | none | weights | sampler), ``select_by`` (auto | accuracy | balanced_accuracy) and
    the training images per class -> a :class:`Balance`."""
    if mode not in BALANCE:
        raise ValueError(f"balance must be one of {', '.join(BALANCE)}, not {mode!r}")
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {', '.join(SELECT_BY)}, not {select_by!r}")
    ratio, text = _ratio(counts)
    tiny = {c: n for c, n in sorted(counts.items()) if n < TINY_CLASS}
    imbalanced = ratio > IMBALANCE_RATIO
    if mode == "auto":
        mode, reason = (("weights", f"auto: classes differ {text}, above {IMBALANCE_RATIO:g}:1; --balance none"
                         " switches it off, --balance sampler draws classes equally instead") if imbalanced else
                        ("none", f"auto: class counts within {IMBALANCE_RATIO:g}:1 ({ratio:.1f}:1)"))
    else:
        reason = "asked for"
    if select_by == "auto":
        select_by, why = (("balanced_accuracy", f"auto: classes differ {text}, above {IMBALANCE_RATIO:g}:1;"
                           " --select-by accuracy counts images instead") if imbalanced else
                          ("accuracy", f"auto: class counts within {IMBALANCE_RATIO:g}:1 ({ratio:.1f}:1)"))
    else:
        why = "asked for"
    return Balance(mode, reason, ratio, tiny, select_by, why)


def tiny_class_warning(tiny: dict[str, int]) -> str | None:
    """The warning for classes with fewer than :data:`TINY_CLASS` training images, or None."""
    if not tiny:
        return None
    names = ", ".join(f"{c} ({n} image{'s' if n != 1 else ''})" for c, n in tiny.items())
    return (f"class(es) with fewer than {TINY_CLASS} training images: {names}. The model sees too few examples"
            " to learn what they look like: expect low or erratic recall for them, and validation figures for"
            " them that rest on a handful of images. Add training images of these classes if you can.")
