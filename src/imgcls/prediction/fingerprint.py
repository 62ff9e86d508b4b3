"""What a prediction output came from: the ``OUT.meta.json`` sidecar and its fingerprints.

Every output of ``imgcls predict`` (its rows, journal, event rows and final
files) has one sidecar, written atomically before the first row: the sha256 of
the model file that ran, its preprocessing and labels, the options that shape
the rows (format, top-k, thresholds, events), the shard, the inputs as given
and the imgcls version.  Two short fingerprints sum it up: ``model`` (file,
preprocessing, labels) and ``options``.  ``--resume`` and ``imgcls merge``
compare them, so rows of two models never end up in one file.

The standard library only: the prediction runtime stays torch-free.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .. import rundir
from ..errors import UserError

SUFFIX = ".meta.json"
CHUNK = 1 << 20
SHORT = 12  # hex digits of a fingerprint in messages

# what each part of the sidecar is called in a message, by key (model, then options)
MODEL_FIELDS = {"sha256": "model file", "preprocess": "preprocessing", "labels": "labels", "name": "model name"}
OPTION_FIELDS = {"format": "format", "top_k": "top-k", "thresholds": "thresholds", "events": "events",
                 "event_gap": "event gap", "aggregate": "aggregate", "media": "media"}


def meta_path(out: str | Path) -> Path:
    """``rows.csv`` -> ``rows.csv.meta.json``; a Camtrap DP folder ``pkg/`` -> ``pkg.meta.json`` beside it."""
    out = Path(out)
    return out.with_name(out.name + SUFFIX)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (model files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8",
                                                                                      "surrogateescape")).hexdigest()


def build(model: dict, options: dict, inputs: dict, shard: dict | None, version: str, files: list[str]) -> dict:
    """The sidecar: ``model`` (file, sha256, name, labels, preprocess), ``options`` (format, top_k,
    thresholds, events, event_gap, aggregate, media), ``inputs`` (as given), ``shard`` (k, n, by; None
    for all inputs) and the fingerprints.  The shard is not in the options fingerprint: the shards of
    one job share it, which ``imgcls merge`` checks."""
    return {"imgcls": version, "fingerprint": {"model": digest(model), "options": digest(options)},
            "model": model, "options": options, "shard": shard, "inputs": inputs, "files": files}


def read(out: str | Path) -> dict | None:
    """The sidecar of ``out``, None when there is none; a UserError naming it when it is damaged."""
    path = meta_path(out)
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return None
    try:
        meta = json.loads(text)
        if isinstance(meta, dict) and isinstance(meta.get("fingerprint"), dict):
            meta["fingerprint"]["model"], meta["fingerprint"]["options"]  # noqa: B018 - both present
            return meta
    except (ValueError, KeyError):
        pass
    raise UserError(f"{path}: not an imgcls prediction sidecar (JSON with a fingerprint); delete it or use"
                    " --overwrite")


def write(out: str | Path, meta: dict) -> None:
    rundir.atomic_write(meta_path(out), json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def short(meta: dict | None) -> str:
    """``model abc123.../options def456...`` for a message."""
    if meta is None:
        return "no fingerprint (no sidecar)"
    fp = meta["fingerprint"]
    return f"model {fp['model'][:SHORT]} options {fp['options'][:SHORT]}"


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two sidecars' model and options, by name (empty: the same fingerprints)."""
    out = []
    for part, names in (("model", MODEL_FIELDS), ("options", OPTION_FIELDS)):
        a, b = old.get(part) or {}, new.get(part) or {}
        out += [f"{name} ({_show(a.get(key))} -> {_show(b.get(key))})" for key, name in names.items()
                if a.get(key) != b.get(key)]
    if old.get("shard") != new.get("shard"):
        out.append(f"shard ({_shard(old.get('shard'))} -> {_shard(new.get('shard'))})")
    return out


def _shard(shard: dict | None) -> str:
    return "all inputs" if not shard else f"{shard['k']}/{shard['n']} by {shard['by']}"


def _show(value) -> str:
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return value[:SHORT]
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def same(old: dict, new: dict) -> bool:
    return old["fingerprint"] == new["fingerprint"] and old.get("shard") == new.get("shard")


def check_resume(out: Path, old: dict | None, new: dict) -> None:
    """A UserError when ``out`` was written by another model or other options than this run's."""
    if old is None or same(old, new):
        return
    what = "; ".join(differences(old, new)) or "the fingerprints"
    raise UserError(f"{out} was written with {short(old)} but this run has {short(new)}: {what} differ;"
                    " resume with the model and options that wrote it, or use --overwrite")
