"""Local weight files (``--weights PATH``) and the key matching every weight
source shares.

A weight file may be

* a ``.safetensors`` file (for example another run's ``model.safetensors``),
* an imgcls run directory (its ``model.safetensors`` holds the bare net),
* a ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` state dict, or a checkpoint dict
  holding one under ``state_dict`` / ``model`` / ``model_state`` / ...

``.pth`` files are read with ``torch.load(weights_only=True)``: unpickling a
file may run arbitrary code, so imgcls never unpickles anything but tensors
and plain containers.

Matching (:func:`apply_state_dict`) is by name after stripping wrapper
prefixes (``module.`` from DataParallel, ``_orig_mod.`` from torch.compile,
``model.`` / ``net.`` / ``backbone.`` from wrappers such as our
:class:`~imgcls.models.classifier.Classifier`) and by shape.  The classifier
head is special: when its shape differs (a different number of classes) or the
file has none, the net keeps its own freshly initialized head and the report
says "head replaced"; a linear head in the file is still kept in
``LoadReport.source_head`` (e.g. ImageNet's 1000 classes, a prior for the new
head).  Everything else that does not fit is listed in the :class:`LoadReport`;
if less than half of the model's tensors can be filled the load is refused
with a :class:`~imgcls.errors.UserError`.

``torch.nn.Module.load_state_dict(strict=False)`` reports missing and
unexpected keys but raises on the first shape mismatch and knows nothing of
prefixes or heads, hence this module.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import UserError, first_line
from ..rundir import WEIGHTS
from .heads import head_prefix, head_state_keys

# wrapper prefixes stripped from file keys, in any order and repetition
PREFIXES = ("module.", "_orig_mod.", "model.", "net.", "backbone.")
# keys under which training checkpoints keep the model's state dict
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "state_dict_ema")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
RUN_WEIGHTS = WEIGHTS  # a run directory's weights: the bare net's state dict
MIN_FIT = 0.5  # least fraction of the model's tensors a file must fill
_SHOW = 5      # keys quoted per list in messages


# --------------------------------------------------------------------------- report


@dataclass
class LoadReport:
    """What a weight load did.  Key names are the model's (after prefix stripping)."""

    source: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)         # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)      # in the file, not in the model
    # (key, shape in file, shape in model), classifier head excluded
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    head_replaced: bool = False   # the net kept its own (fresh) head: other classes, or none in the file
    head_keys: list[str] = field(default_factory=list)       # the head tensors not taken from the file
    # the file's own head as float32 CPU (weight (M, D), bias (M,)), any class count M, when it
    # is a linear layer on the net's head input: a prior for a replaced head (not in to_dict)
    source_head: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """Everything but (possibly) the head came from the file, nothing was left over."""
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self) -> str:
        total = len(self.loaded) + len(self.missing) + len(self.shape_mismatch) + len(self.head_keys)
        parts = [f"Loaded {len(self.loaded)} of {total} tensors" + (f" from {self.source}" if self.source else "")]
        if self.head_replaced:
            parts.append(
                f"head replaced: the classifier ({_quote(self.head_keys)}) is freshly initialized"
                " for this run's classes"
            )
        if self.missing:
            parts.append(f"{len(self.missing)} missing from the file, left as initialized: {_quote(self.missing)}")
        if self.shape_mismatch:
            shown = ", ".join(
                f"{k} (file {list(a)} vs model {list(b)})" for k, a, b in self.shape_mismatch[:_SHOW]
            )
            more = f" and {len(self.shape_mismatch) - _SHOW} more" if len(self.shape_mismatch) > _SHOW else ""
            parts.append(f"{len(self.shape_mismatch)} with another shape, left as initialized: {shown}{more}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} in the file unused: {_quote(self.unexpected)}")
        if not (self.head_replaced or self.missing or self.shape_mismatch or self.unexpected):
            parts.append("every key matched")
        return "; ".join(parts) + "."

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "loaded": len(self.loaded),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "shape_mismatch": [[k, list(a), list(b)] for k, a, b in self.shape_mismatch],
            "head_replaced": self.head_replaced,
            "head_keys": list(self.head_keys),
        }


def _quote(keys: list[str], n: int = _SHOW) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


# --------------------------------------------------------------------------- reading files


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def unwrap_checkpoint(obj, path: str | Path = "") -> dict[str, torch.Tensor]:
    """A state dict from a state dict or a training checkpoint holding one."""
    for _ in range(3):  # nested checkpoints, e.g. {"model": {"state_dict": ...}}
        if _is_tensor_dict(obj):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in CHECKPOINT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Mapping):
        # a state dict may carry non-tensor extras (e.g. metadata): keep the tensors
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        keys = ", ".join(map(str, list(obj)[:8]))
        raise UserError(
            f"{path}: no model weights found; the file holds a dict with keys {keys}"
            f" (expected tensors, or one of {', '.join(CHECKPOINT_KEYS)})"
        )
    raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")


def _resolve_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"--weights {path}: no such file or directory")
    if path.is_dir():
        if (path / RUN_WEIGHTS).is_file():
            return path / RUN_WEIGHTS
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise UserError(
            f"--weights {path}: a directory without {RUN_WEIGHTS}; give an imgcls run directory"
            " or the weight file itself (.safetensors, .pth, .pt)"
        )
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weight file or run directory, on the CPU, never unpickling code."""
    path = _resolve_path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    if suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"(?:Unsupported global: GLOBAL|reduce for) ([\w.]+)", str(exc))
            if found is None:  # not a pickle torch understands at all
                raise UserError(f"{path}: not a readable PyTorch weight file (corrupt or another format)") from None
            example = f" (e.g. {found.group(1)})"
            raise UserError(
                f"{path}: holds pickled Python objects besides tensors{example}; imgcls loads"
                " .pth files with torch.load(weights_only=True) because unpickling can run arbitrary code."
                " If you trust the file, re-save just its weights: torch.save(torch.load(FILE,"
                " weights_only=False).state_dict(), 'weights.pth'), or convert it to .safetensors"
            ) from None
        except Exception as exc:  # noqa: BLE001 - a damaged pickle fails in struct, zipfile, EOF, ... alike
            raise UserError(f"{path}: not a readable PyTorch weight file ({first_line(exc, 200)})") from None
        return unwrap_checkpoint(obj, path)
    raise UserError(
        f"--weights {path}: unknown weight file type {suffix or '(no suffix)'!r};"
        f" use {', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)} or an imgcls run directory"
    )


# --------------------------------------------------------------------------- matching


def _strip(key: str) -> list[str]:
    """``key`` and its forms with leading wrapper prefixes removed one by one."""
    forms = [key]
    while prefix := next((p for p in PREFIXES if forms[-1].startswith(p)), None):
        forms.append(forms[-1][len(prefix):])
    return forms


def _matcher(model_keys) -> Callable[[str], str]:
    """file key -> model key: exact, else without the file's wrapper prefixes, else
    onto a model key that carries a prefix itself (a wrapped net), if unambiguous."""
    wrapped: dict[str, list[str]] = {}
    for mkey in model_keys:
        for form in _strip(mkey)[1:]:
            wrapped.setdefault(form, []).append(mkey)

    def match(key: str) -> str:
        forms = _strip(key)
        for form in forms:
            if form in model_keys:
                return form
        for form in forms:
            if len(wrapped.get(form, ())) == 1:
                return wrapped[form][0]
        return key

    return match


def _counted(key: str) -> bool:
    # BatchNorm's step counter is not a weight; old files lack it, and it must not
    # decide whether a file "fits"
    return not key.endswith("num_batches_tracked")


def _source_head(net: nn.Module, target: Mapping[str, torch.Tensor],
                 file_head: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The file's head as (weight (M, D), bias (M,)) float32 CPU copies if it is a linear
    layer taking the net head's D inputs, whatever its M; else None."""
    prefix = head_prefix(net)
    wkey, bkey = (f"{prefix}.weight", f"{prefix}.bias") if prefix else ("weight", "bias")
    weight, bias, own = file_head.get(wkey), file_head.get(bkey), target.get(wkey)
    if weight is None or bias is None or own is None:
        return None
    if not (weight.dim() == 2 and bias.dim() == 1 and own.dim() == 2
            and weight.shape[1] == own.shape[1] and bias.shape[0] == weight.shape[0]):
        return None
    # copies: the caller's state dict may share storage with a live net
    return (weight.detach().to(device="cpu", dtype=torch.float32, copy=True),
            bias.detach().to(device="cpu", dtype=torch.float32, copy=True))


def apply_state_dict(
    net: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "",
    model_name: str | None = None,
    min_fit: float = MIN_FIT,
) -> LoadReport:
    """Copy the matching tensors of ``state_dict`` into ``net`` (see module docstring)."""
    target = net.state_dict()
    model_keys = set(target)
    head = head_state_keys(net)
    report = LoadReport(source=source)
    match = _matcher(model_keys)
    to_load: dict[str, torch.Tensor] = {}
    file_head: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for key, value in state_dict.items():
        mkey = match(key)
        if mkey not in model_keys or mkey in seen:
            report.unexpected.append(key)
            continue
        seen.add(mkey)
        if mkey in head:
            file_head[mkey] = value
        if tuple(value.shape) == tuple(target[mkey].shape):
            to_load[mkey] = value
        elif mkey in head:
            report.head_keys.append(mkey)
        else:
            report.shape_mismatch.append((mkey, tuple(value.shape), tuple(target[mkey].shape)))
    for key in target:
        if key not in seen:
            if key in head:
                report.head_keys.append(key)
            elif _counted(key):
                report.missing.append(key)
    if report.head_keys:
        # part of the head fitting and part not (e.g. weight loaded, bias of other shape)
        # would make a chimera: keep the whole head as initialized
        for key in head:
            if key in to_load:
                del to_load[key]
                if key not in report.head_keys:
                    report.head_keys.append(key)
        report.head_replaced = True
    report.loaded = [k for k in target if k in to_load]
    report.source_head = _source_head(net, target, file_head)

    wanted = [k for k in target if _counted(k) and k not in report.head_keys]
    got = sum(1 for k in wanted if k in to_load)
    if not wanted or got < min_fit * len(wanted):
        what = model_name or type(net).__name__
        details = []
        if report.missing:
            details.append(f"missing {_quote(report.missing)}")
        if report.shape_mismatch:
            details.append(
                "shape mismatch " + ", ".join(f"{k} (file {list(a)} vs model {list(b)})"
                                              for k, a, b in report.shape_mismatch[:_SHOW])
            )
        if report.unexpected:
            details.append(f"unexpected {_quote(report.unexpected)}")
        raise UserError(
            f"weights don't fit model {what}: only {got} of {len(wanted)} tensors match"
            + (f" in {source}" if source else "") + "; " + "; ".join(details)
            + ". Are these weights for another architecture?"
        )
    if to_load:
        net.load_state_dict(to_load, strict=False)
    return report


def load_weights_file(path: str | Path, net: nn.Module, *, model_name: str | None = None,
                      min_fit: float = MIN_FIT) -> LoadReport:
    """``--weights PATH``: load a local file or run directory into the bare ``net``."""
    resolved = _resolve_path(path)
    state_dict = read_state_dict(resolved)
    return apply_state_dict(net, state_dict, source=str(resolved), model_name=model_name, min_fit=min_fit)
