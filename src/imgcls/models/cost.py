"""Per-layer cost table: shapes, activation memory, parameters and multiply-adds.

Everything is measured from one traced forward pass of the real module tree
(forward hooks + :class:`torch.utils.flop_counter.FlopCounterMode`), never from
per-model tables, so it works for any ``nn.Module``: plain CNNs, residual
blocks, grouped / depthwise convolutions, squeeze-and-excitation, ConvNeXt,
attention.  The pass runs on the model's own device; build the model on the
``meta`` device (``with torch.device("meta"): ...``) and it costs no memory and
almost no time.

Conventions
-----------
* **MACs** (multiply-accumulates, the "FLOPs" of papers and of the lecture
  tables): ``FlopCounterMode`` counts 2 FLOPs per multiply-add for every
  convolution / matmul op, wherever it runs (including matmuls written in a
  ``forward`` such as attention), so MACs = its FLOPs / 2; that equals
  ``out_numel * (in_c / groups) * kh * kw`` for a convolution and
  ``in * out`` for a linear layer.  We go beyond it in one place: with
  ``include_bias=True`` (default) the bias of a Conv / Linear module adds one
  MAC per output element, which is torchinfo's convention (its "mult-adds"
  for torchvision AlexNet at 224 px are 714.68 M; FlopCounterMode alone gives
  714.19 M).  Element-wise work (norms, activations, pooling, residual adds)
  counts zero, as in torchinfo and the papers.
* **params** of a row are the parameters owned by the modules of that row,
  each shared parameter counted once (at its first use), so the rows add up to
  :func:`count_params`.  ``include_bias=False`` leaves biases out of both
  params and MACs (the lecture's AlexNet table counts FC layers that way).
* **memory** of a row is the size of its output activation(s) for one sample
  (``numel * element_size``; fp32 -> ``numel * 4``).  The table's total sums
  them (what training keeps for backward); ``peak_activation_bytes`` is the
  most activation memory alive at once during inference, measured by
  tracking every tensor storage the forward allocates until it is freed.

Which layers become rows (a generic rule, no per-model code)
------------------------------------------------------------
1. The traced calls form a tree (root = the model).  ``depth=None`` uses the
   leaf calls (modules that call no other module, or only modules that rule 2
   folds, like timm's BatchNormAct2d); ``depth=N`` uses the calls
   at nesting depth N (1 = the model's direct children) and aggregates every
   call below them into them; leaves shallower than N stay as they are.
2. A call becomes a row if it holds parameters, does multiply-adds or changes
   the per-sample tensor shape.  Everything else -- ReLU, Dropout, Identity, a
   pooling that is the identity at this input size -- is folded (hidden): it
   has no parameters and no MACs, so nothing is lost from the totals.
3. A reshape done in a ``forward`` rather than by a module (``torch.flatten``
   in torchvision's AlexNet, ResNet, ...) is detected between two consecutive
   calls: the previous output has >= 3 dims, the next input has 2 and both hold
   the same number of elements -> a ``flatten`` row.
4. Multiply-adds or parameters that belong to a non-leaf module's own
   ``forward`` (an attention matmul, a layer-scale ``gamma``) get a row
   ``<module> (own ops)``, so rows always add up to the totals; parameters
   never used in the forward get a final ``(unused)`` row.
5. Names: at leaf level conv and fc layers are numbered together in forward
   order (conv1 ... conv5, fc6 ...), other layers take the number of the last
   conv / fc before them (pool1 after conv1, pool5 after conv5; norm, ...), a
   repeated name gets a letter suffix (pool5b); aggregated rows are named by
   their module path (``layer1.0``).  Every row also carries its module path.
"""

from __future__ import annotations

import csv
import io
import json
import math
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from ..errors import UserError

__all__ = [
    "CostRow",
    "CostTable",
    "layer_table",
    "count_params",
    "count_macs",
    "peak_activation_bytes",
    "model_cost",
    "format_rows",
]


# --------------------------------------------------------------------------- tracing


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


class _LiveActivations(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once, counting only storages that
    the traced ops allocate (plus the input), not parameters or buffers.

    Storages are tracked by identity (PyTorch keeps one Python object per
    storage) and released through ``weakref.finalize`` when the last tensor or
    view using them dies.  Works on CPU, CUDA and meta tensors alike.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._excluded = {id(t.untyped_storage()) for t in exclude}
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.active = True

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._excluded or key in self._live:
            return
        nbytes = st.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        nbytes = self._live.pop(key, 0)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active:
            for t in _tensors(out):
                self.track(t)
        return out


@dataclass
class _Call:
    """One forward call of one module, as seen by the hooks."""

    module: nn.Module
    path: str
    depth: int
    parent: "_Call | None"
    start: int
    end: int = 0
    in_shape: tuple[int, ...] | None = None
    in_elem_size: int = 4
    out_shapes: list[tuple[int, ...]] = field(default_factory=list)
    out_bytes: int = 0
    macs_start: int = 0
    macs: int = 0                       # inclusive: this call and everything under it
    children: list["_Call"] = field(default_factory=list)
    own_params: int = 0                 # params first used by this call's module

    @property
    def out_shape(self) -> tuple[int, ...] | None:
        return self.out_shapes[0] if self.out_shapes else None

    @property
    def trivial(self) -> bool:
        """No parameters, no MACs, same per-sample shape out as in, all the way down."""
        return (self.own_params == 0 and self.macs == 0 and len(self.out_shapes) <= 1
                and _per_sample(self.in_shape) == _per_sample(self.out_shape)
                and all(c.trivial for c in self.children))

    @property
    def is_leaf(self) -> bool:
        """Calls no other module, or only trivial ones (timm's BatchNormAct2d is a
        BatchNorm2d whose children are an activation and a dropout): a layer."""
        return all(c.trivial for c in self.children)


class _Tracer:
    def __init__(self, model: nn.Module, include_bias: bool):
        self.model = model
        self.include_bias = include_bias
        self.paths = {}
        for name, mod in model.named_modules(remove_duplicate=False):
            self.paths.setdefault(mod, name)
        self.tick = 0
        self.stack: list[_Call] = []
        self.calls: list[_Call] = []
        self.root: _Call | None = None
        self.flops: FlopCounterMode | None = None
        self.extra_macs = 0               # bias adds (beyond FlopCounterMode)
        self.seen_params: set[int] = set()

    # MACs so far: FlopCounterMode counts 2 FLOPs per multiply-add
    def _macs_now(self) -> int:
        return self.flops.get_total_flops() // 2 + self.extra_macs

    def pre(self, module, args, kwargs):
        self.tick += 1
        parent = self.stack[-1] if self.stack else None
        call = _Call(module, self.paths.get(module, module.__class__.__name__),
                     0 if parent is None else parent.depth + 1, parent, self.tick)
        ins = _tensors((args, kwargs))
        if ins:
            call.in_shape, call.in_elem_size = tuple(ins[0].shape), ins[0].element_size()
        call.macs_start = self._macs_now()
        for p in module.parameters(recurse=False):
            if id(p) not in self.seen_params:
                self.seen_params.add(id(p))
                if self.include_bias or not _is_bias(module, p):
                    call.own_params += p.numel()
        if parent is None:
            self.root = call
        else:
            parent.children.append(call)
        self.stack.append(call)
        self.calls.append(call)

    def post(self, module, args, kwargs, output):
        call = self.stack.pop()
        self.tick += 1
        call.end = self.tick
        outs = _tensors(output)
        call.out_shapes = [tuple(t.shape) for t in outs]
        call.out_bytes = sum(t.numel() * t.element_size() for t in outs)
        bias = getattr(module, "bias", None)
        if (self.include_bias and isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
                and isinstance(bias, torch.Tensor) and outs):
            # torchinfo's convention: one add per output element for the bias
            # (FlopCounterMode counts only the multiply-adds of the weights)
            self.extra_macs += outs[0].numel()
        call.macs = self._macs_now() - call.macs_start


def _is_bias(module: nn.Module, p: torch.Tensor) -> bool:
    return any(p is q for name, q in module.named_parameters(recurse=False) if name == "bias")


def _input_tensor(input_shape, batch: int, device, dtype) -> torch.Tensor:
    if isinstance(input_shape, int):
        input_shape = (3, input_shape, input_shape)
    return torch.zeros((batch, *tuple(input_shape)), device=device, dtype=dtype)


def _model_device_dtype(model: nn.Module):
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _trace(model: nn.Module, input_shape, include_bias: bool = True, batch: int = 1):
    """Run one forward pass recording every module call, MACs and live memory."""
    device, dtype = _model_device_dtype(model)
    x = _input_tensor(input_shape, batch, device, dtype)
    tracer = _Tracer(model, include_bias)
    handles = []
    for mod in dict.fromkeys(model.modules()):  # unique, in definition order
        handles.append(mod.register_forward_pre_hook(tracer.pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(tracer.post, with_kwargs=True))
    was_training = model.training
    exclude = list(model.parameters()) + list(model.buffers())
    live = _LiveActivations(exclude)
    live.track(x)
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as flops, live:
            tracer.flops = flops
            out = model(x)
            del out
        live.active = False
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tracer.root is None:
        raise ValueError("the model's forward did not run through its hooks")
    return tracer, live.peak


# --------------------------------------------------------------------------- rows

_COLUMNS = ["layer", "in_c", "in_hw", "filters", "kernel", "stride", "pad",
            "out_c", "out_hw", "memory_kb", "params", "macs", "groups", "module"]
_HEADERS = {"layer": "layer", "in_c": "in C", "in_hw": "in H/W", "filters": "filters",
            "kernel": "kernel", "stride": "stride", "pad": "pad", "out_c": "out C",
            "out_hw": "out H/W", "memory_kb": "memory KB", "params": "params k",
            "macs": "MFLOPs", "module": "module"}


@dataclass
class CostRow:
    """One row of the table; exact numbers (``params`` count, ``macs``,
    ``memory_kb`` float).  :meth:`CostTable.display_rows` rounds them."""

    layer: str
    in_c: int | None = None
    in_hw: int | str | None = None
    filters: int | None = None
    kernel: int | str | None = None
    stride: int | str | None = None
    pad: int | str | None = None
    out_c: int | None = None
    out_hw: int | str | None = None
    memory_kb: float = 0.0
    params: int = 0
    macs: int = 0
    groups: int | None = None
    module: str = ""


def _square(v) -> int | str | None:
    """(3, 3) -> 3, (3, 1) -> '3x1', 'same' -> 'same'."""
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (tuple, list)):
        v = [int(x) for x in v]
        if not v:
            return None
        return v[0] if all(x == v[0] for x in v) else "x".join(map(str, v))
    return int(v)


def _split(shape: tuple[int, ...] | None, channels_last: bool):
    """Per-sample shape -> (channels, spatial) for the table."""
    if shape is None or len(shape) < 2:
        return None, None
    s = shape[1:]
    if len(s) == 1:
        return s[0], None
    c, spatial = (s[-1], s[:-1]) if channels_last else (s[0], s[1:])
    return c, _square(spatial)


def _kind(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "fc"
    if isinstance(module, nn.Flatten) or "Flatten" in name:
        return "flatten"
    if "Pool" in name:
        return "pool"
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or "Norm" in name:
        return "norm"
    return name.lower()


def _channels_last(call: _Call) -> bool:
    """Linear / LayerNorm act on the last dim (ConvNeXt's MLP runs NHWC); an
    aggregated row follows its first leaf."""
    while not call.is_leaf:
        call = call.children[0]
    return isinstance(call.module, (nn.Linear, nn.LayerNorm)) and not _is_2d_norm(call.module)


def _is_2d_norm(module: nn.Module) -> bool:
    # timm's LayerNorm2d subclasses nn.LayerNorm but normalizes NCHW over C
    return "2d" in type(module).__name__.lower()


def _geometry(row: CostRow, module: nn.Module) -> None:
    if isinstance(module, nn.modules.conv._ConvNd):
        row.filters = module.out_channels
        row.kernel, row.stride, row.pad = (_square(module.kernel_size), _square(module.stride),
                                           _square(module.padding))
        row.groups = module.groups
    elif isinstance(module, nn.Linear):
        row.filters = module.out_features
    elif _kind(module) == "pool" and hasattr(module, "kernel_size"):
        row.kernel = _square(module.kernel_size)
        row.stride = _square(getattr(module, "stride", None) or module.kernel_size)
        row.pad = _square(getattr(module, "padding", 0))


def _subtree_params(call: _Call) -> int:
    return call.own_params + sum(_subtree_params(c) for c in call.children)


def _units(call: _Call, depth: int | None, out: list) -> None:
    """Collect (tick, kind, call) display units under ``call`` (see module doc)."""
    for child in call.children:
        if child.is_leaf or (depth is not None and child.depth >= depth):
            out.append((child.start, "unit", child))
        else:
            _units(child, depth, out)
    own_macs = call.macs - sum(c.macs for c in call.children)
    if not call.is_leaf and (own_macs > 0 or call.own_params > 0):
        out.append((call.end, "own", call))


def _per_sample(shape):
    return None if shape is None else tuple(shape[1:])


def _numel(shape) -> int:
    return math.prod(shape) if shape else 0


def _build_rows(root: _Call, depth: int | None) -> list[CostRow]:
    units: list = []
    if root.is_leaf:
        units.append((root.start, "unit", root))
    else:
        _units(root, depth, units)
    units.sort(key=lambda u: u[0])

    rows: list[CostRow] = []
    names: set[str] = set()
    counter = 0
    prev_out: tuple[int, ...] | None = None

    def unique(name: str) -> str:
        base, i = name, 0
        while name in names:
            i += 1
            name = base + chr(ord("a") + i)
        names.add(name)
        return name

    for _, what, call in units:
        if what == "own":
            rows.append(CostRow(layer=unique(f"{call.path or 'model'} (own ops)"), module=call.path,
                                params=call.own_params,
                                macs=call.macs - sum(c.macs for c in call.children)))
            continue
        ins, outs = _per_sample(call.in_shape), _per_sample(call.out_shape)
        # 3. a reshape between calls that no module did: flatten to (N, features)
        if (prev_out is not None and ins is not None and len(prev_out) >= 2 and len(ins) == 1
                and _numel(prev_out) == _numel(ins)):
            c, hw = _split((1, *prev_out), False)
            rows.append(CostRow(layer=unique("flatten"), in_c=c, in_hw=hw, out_c=ins[0],
                                memory_kb=_numel(ins) * call.in_elem_size / 1024))
        if outs is not None:
            prev_out = outs
        params = _subtree_params(call)
        # 2. fold what neither holds parameters, computes nor reshapes
        if params == 0 and call.macs == 0 and ins == outs and len(call.out_shapes) <= 1:
            continue
        module = call.module
        leaf_level = call.is_leaf and depth is None
        if leaf_level:
            kind = _kind(module)
            if kind in ("conv", "fc"):
                counter += 1
                name = f"{kind}{counter}"
            elif kind == "flatten":
                name = "flatten"
            else:
                name = f"{kind}{counter or ''}"
        else:
            name = call.path or type(module).__name__.lower()
        cl = _channels_last(call)
        in_c, in_hw = _split(call.in_shape, cl)
        out_c, out_hw = _split(call.out_shape, cl)
        row = CostRow(layer=unique(name), in_c=in_c, in_hw=in_hw, out_c=out_c, out_hw=out_hw,
                      memory_kb=call.out_bytes / max(1, _batch(call)) / 1024,
                      params=params, macs=call.macs, module=call.path)
        if call.is_leaf:
            _geometry(row, module)
        rows.append(row)
    return rows


def _batch(call: _Call) -> int:
    return call.out_shape[0] if call.out_shape else 1


# --------------------------------------------------------------------------- table


@dataclass
class CostTable:
    rows: list[CostRow]
    input_shape: tuple[int, ...]
    params: int                 # exact, == count_params(model)
    macs: int                   # multiply-adds for one sample
    activation_bytes: int       # sum of the leaf rows' outputs (one sample), whatever the depth
    peak_activation_bytes: int  # most activation memory alive at once (one sample)
    depth: int | None = None
    include_bias: bool = True

    @property
    def totals(self) -> dict:
        return {"params": self.params, "macs": self.macs, "mflops": round(self.macs / 1e6, 2),
                "activation_kb": round(self.activation_bytes / 1024, 1),
                "peak_activation_kb": round(self.peak_activation_bytes / 1024, 1)}

    def display_rows(self, decimals: int = 0) -> list[dict]:
        """Rows as in the lecture table: memory KB, params k, MFLOPs rounded."""
        def r(v: float):
            return round(v) if decimals == 0 else round(v, decimals)

        out = []
        for row in self.rows:
            d = asdict(row)
            d.pop("groups")
            d["memory_kb"] = r(row.memory_kb)
            d["params"] = r(row.params / 1e3)
            d["macs"] = r(row.macs / 1e6)
            out.append({_HEADERS[k]: v for k, v in d.items()})
        return out

    def _totals_line(self) -> str:
        t = self.totals
        return (f"total params: {self.params:,}   multiply-adds: {self.macs / 1e6:,.2f} M   "
                f"activations: {t['activation_kb']:,.0f} KB   "
                f"peak activation memory: {t['peak_activation_kb']:,.0f} KB   (per sample)")

    def to_text(self, decimals: int = 0) -> str:
        return format_rows(self.display_rows(decimals), "table") + "\n" + self._totals_line()

    def to_markdown(self, decimals: int = 0) -> str:
        return format_rows(self.display_rows(decimals), "md") + "\n\n" + self._totals_line()

    def to_csv(self) -> str:
        """Exact values (``params`` count, ``macs``, ``memory_kb``) and a total row."""
        rows = [asdict(r) for r in self.rows]
        rows.append({"layer": "total", "memory_kb": self.activation_bytes / 1024,
                     "params": self.params, "macs": self.macs})
        return format_rows(rows, "csv", columns=_COLUMNS)

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "depth": self.depth,
                "include_bias": self.include_bias, "rows": [asdict(r) for r in self.rows],
                "totals": {"params": self.params, "macs": self.macs,
                           "activation_bytes": self.activation_bytes,
                           "peak_activation_bytes": self.peak_activation_bytes}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self, fmt: str = "table") -> str:
        """``fmt``: table (aligned text), csv, md, json."""
        try:
            return {"table": self.to_text, "text": self.to_text, "csv": self.to_csv,
                    "md": self.to_markdown, "markdown": self.to_markdown, "json": self.to_json}[fmt]()
        except KeyError:
            raise UserError(f"unknown format {fmt!r}; use table, csv, md or json") from None


def layer_table(model: nn.Module, input_shape: Sequence[int] | int = (3, 224, 224),
                depth: int | None = None, include_bias: bool = True) -> CostTable:
    """The per-layer cost table of ``model`` for one input of ``input_shape``
    (C, H, W; an int means 3 x s x s).  ``depth=None``: leaf layers; ``depth=N``:
    modules at nesting depth N with everything below aggregated into them."""
    if depth is not None and depth < 1:
        raise ValueError("depth must be >= 1 (or None for leaf layers)")
    tracer, peak = _trace(model, input_shape, include_bias)
    rows = _build_rows(tracer.root, depth)
    leaf_rows = rows if depth is None else _build_rows(tracer.root, None)
    total = count_params(model, include_bias)
    used = sum(r.params for r in rows)
    if total != used:
        rows.append(CostRow(layer="(unused)", params=total - used, module=""))
    shape = (3, input_shape, input_shape) if isinstance(input_shape, int) else tuple(input_shape)
    return CostTable(rows=rows, input_shape=shape, params=total, macs=tracer.root.macs,
                     activation_bytes=round(sum(r.memory_kb for r in leaf_rows) * 1024),
                     peak_activation_bytes=peak, depth=depth, include_bias=include_bias)


def count_params(model: nn.Module, include_bias: bool = True) -> int:
    """Number of parameters (shared ones once), like torchinfo's "Total params"."""
    if include_bias:
        return sum(p.numel() for p in model.parameters())
    biases = {id(p) for m in model.modules() for n, p in m.named_parameters(recurse=False) if n == "bias"}
    return sum(p.numel() for p in model.parameters() if id(p) not in biases)


def count_macs(model: nn.Module, input_shape: Sequence[int] | int = (3, 224, 224),
               include_bias: bool = True) -> int:
    """Multiply-adds of one forward pass for one sample (see module doc).

    The lean path of :func:`layer_table` (no per-call records, no memory
    tracking): FlopCounterMode plus a hook on each Conv / Linear for the bias
    adds.  Use a model built on the meta device and it takes about as long as
    a forward pass on meta tensors."""
    device, dtype = _model_device_dtype(model)
    x = _input_tensor(input_shape, 1, device, dtype)
    bias_adds = 0

    def hook(module, args, output):
        nonlocal bias_adds
        if isinstance(getattr(module, "bias", None), torch.Tensor) and isinstance(output, torch.Tensor):
            bias_adds += output.numel()   # torchinfo's convention, see module doc

    handles = [m.register_forward_hook(hook) for m in dict.fromkeys(model.modules())
               if include_bias and isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return flops.get_total_flops() // 2 + bias_adds


def peak_activation_bytes(model: nn.Module, input_shape: Sequence[int] | int = (3, 224, 224),
                          batch: int = 1) -> int:
    """Most activation memory (input included, weights excluded) alive at once
    during one inference forward pass of ``batch`` samples."""
    _, peak = _trace(model, input_shape, True, batch)
    return peak


def model_cost(model: nn.Module, input_shape: Sequence[int] | int = (3, 224, 224)) -> dict:
    """params, macs and peak activation bytes from one trace (for catalog/compare)."""
    tracer, peak = _trace(model, input_shape, True)
    return {"params": count_params(model), "macs": tracer.root.macs, "peak_activation_bytes": peak}


# --------------------------------------------------------------------------- formatting


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def format_rows(rows: list[dict], fmt: str = "table", columns: Sequence[str] | None = None) -> str:
    """Render a list of dicts as ``table`` (aligned text), ``csv``, ``md`` or ``json``.
    Numbers are right-aligned in tables; csv and json keep the raw values."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    if fmt == "json":
        return json.dumps([{c: r.get(c) for c in columns} for r in rows], indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})
        return buf.getvalue()
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
               for c in columns]
    if fmt in ("md", "markdown"):
        def esc(s: str) -> str:
            return s.replace("|", "\\|")
        lines = ["| " + " | ".join(esc(str(c)) for c in columns) + " |",
                 "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
        return "\n".join(lines)
    if fmt not in ("table", "text"):
        raise UserError(f"unknown format {fmt!r}; use table, csv, md or json")
    widths = [max([len(str(c))] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(vals):
        return "  ".join(v.rjust(w) if n else v.ljust(w)
                         for v, w, n in zip(vals, widths, numeric)).rstrip()

    out = [line([str(c) for c in columns]), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out)
