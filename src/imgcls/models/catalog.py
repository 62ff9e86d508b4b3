"""The rows of ``imgcls models``: every registered architecture with its size.

Columns: name, family, params and multiply-adds (FLOPs in the papers' sense)
at the default input size with the registry's default 1000 classes, the
default input size, and whether pretrained weights can be loaded offline.

Speed: each network is built on the ``meta`` device (shapes only, no memory,
no weight initialization) and its multiply-adds are counted with
:func:`imgcls.models.cost.count_macs` on meta tensors; a model whose builder
cannot run on meta falls back to the CPU.  Building and tracing every model
still takes seconds, so the numbers are cached on disk (``$IMGCLS_CACHE_DIR``
or ``~/.cache/imgcls``/``$XDG_CACHE_HOME/imgcls``, file ``catalog.json``),
keyed by model, classes and input size and invalidated by a fingerprint of the
torch / torchvision / timm versions and the source of the ``imgcls/models``
modules that can define networks (all but ``_NOT_ARCHITECTURE``).
The pretrained column is never cached: files can appear or vanish.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..errors import UserError
from . import pretrained  # the module: pretrained_available is looked up per call (tests replace it)
from .cost import count_macs, count_params, format_rows
from .registry import create_model, list_models, model_spec

__all__ = ["catalog_rows", "format_catalog", "model_size", "build_on_meta"]

CACHE_FILE = "catalog.json"
# modules of imgcls/models that define no network: editing them keeps the cache
_NOT_ARCHITECTURE = {"catalog.py", "compare.py", "pretrained.py", "weights.py", "classifier.py", "heads.py"}


def build_on_meta(name: str, num_classes: int = 1000, input_size: int | None = None, **kwargs) -> nn.Module:
    """The registry's network for ``name`` with meta tensors (no memory, no init
    cost); on the CPU if its builder needs real tensors."""
    try:
        with torch.device("meta"):
            return create_model(name, num_classes, input_size, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any builder quirk: fall back to a real build
        if isinstance(exc, UserError):
            raise
        return create_model(name, num_classes, input_size, **kwargs)


def model_size(name: str, num_classes: int = 1000, input_size: int | None = None) -> dict:
    """``{"params", "macs", "input_size"}`` of registry model ``name`` (no cache)."""
    size = input_size or model_spec(name).default_input_size
    net = build_on_meta(name, num_classes, size)
    try:
        macs = count_macs(net, (3, size, size))
    except Exception:  # noqa: BLE001 - an op without a meta kernel: count on the CPU
        net = create_model(name, num_classes, size)
        macs = count_macs(net, (3, size, size))
    return {"params": count_params(net), "macs": macs, "input_size": size}


def _cache_dir() -> Path:
    if os.environ.get("IMGCLS_CACHE_DIR"):
        return Path(os.environ["IMGCLS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imgcls"


def _fingerprint() -> str:
    h = hashlib.sha1()
    for pkg in ("torch", "torchvision", "timm"):
        try:
            h.update(f"{pkg}={metadata.version(pkg)};".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{pkg}=none;".encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name in _NOT_ARCHITECTURE:
            continue
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _load_cache(path: Path, fingerprint: str) -> dict:
    try:
        data = json.loads(path.read_text())
        return data["entries"] if data.get("fingerprint") == fingerprint else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _save_cache(path: Path, fingerprint: str, entries: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "entries": entries}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs speed


def _pretrained_available(name: str) -> bool:
    try:
        return bool(pretrained.pretrained_available(name))
    except Exception:  # noqa: BLE001 - a broken weight source must not break the listing
        return False


def catalog_rows(names: Iterable[str] | None = None, num_classes: int = 1000,
                 cache: bool = True, cache_dir: str | Path | None = None) -> list[dict]:
    """One dict per model: name, family, params, macs, input_size, pretrained,
    description.  ``macs`` is None if the model could not be traced."""
    specs = list_models() if names is None else [model_spec(n) for n in names]
    path = Path(cache_dir or _cache_dir()) / CACHE_FILE
    fingerprint = _fingerprint() if cache else ""
    entries = _load_cache(path, fingerprint) if cache else {}
    changed = False
    rows = []
    for spec in specs:
        key = f"{spec.name}|{num_classes}|{spec.default_input_size}"
        size = entries.get(key)
        if size is None:
            try:
                size = model_size(spec.name, num_classes)
            except Exception as exc:  # noqa: BLE001 - list the others anyway
                size = {"params": None, "macs": None, "input_size": spec.default_input_size,
                        "error": f"{type(exc).__name__}: {exc}"}
            else:
                entries[key] = size
                changed = True
        rows.append({"name": spec.name, "family": spec.family, "params": size["params"],
                     "macs": size["macs"], "input_size": spec.default_input_size,
                     "pretrained": _pretrained_available(spec.name),
                     "description": spec.description})
    if cache and changed:
        _save_cache(path, fingerprint, entries)
    return rows


def _human(n: float | None, unit: str) -> str | None:
    if n is None:
        return None
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_catalog(rows: list[dict], fmt: str = "table") -> str:
    """``table`` / ``md``: human units (11.69M params, 1.82G MACs);
    ``csv`` / ``json``: exact integers."""
    if fmt in ("csv", "json"):
        return format_rows(rows, fmt)
    shown = [{"name": r["name"], "family": r["family"], "params": _human(r["params"], ""),
              "MACs": _human(r["macs"], ""), "input": r["input_size"],
              "pretrained": {True: "yes", False: "no", None: "?"}[r["pretrained"]],
              "description": r.get("description", "")} for r in rows]
    return format_rows(shown, fmt)
