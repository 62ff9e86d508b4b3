"""``imgcls merge``: the outputs of the shards of one prediction job -> one output.

Before a row is read, every part is checked through its sidecar
(:mod:`imgcls.prediction.fingerprint`): it is finished, one model and the same options
wrote them all (the odd one is named), and the shards are 1..N of one N with
no gap and no repeat (outputs that are not shards merge with a warning).  The
rows are merged in path order, which is the order a folder walk gives, so
the merge of the shards of a folder is the output of the unsharded run; a
path in two parts is an error naming it.  ``ALL`` is written through a temp
file and a rename, with its own sidecar.  CSV and JSON Lines rows stream
(memory stays flat when each part is in path order); the MegaDetector and
Camtrap DP files are read whole.

The standard library only: the prediction runtime stays torch-free.
"""

from __future__ import annotations

import csv
import heapq
import json
import logging
import os
import tempfile
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from .. import __version__, rundir
from ..errors import UserError
from . import fingerprint, outputs
from .rowfiles import output_lock, typed

log = logging.getLogger("imgcls")


def path_key(path: str) -> tuple[str, ...]:
    """How rows are ordered: by path components, the order of a sorted folder walk."""
    return Path(path).parts


# --------------------------------------------------------------------------- checks


def _metas(parts: list[Path]) -> list[dict]:
    metas = []
    for part in parts:
        if not part.exists():
            raise UserError(f"{part}: no such file or folder")
        meta = fingerprint.read(part)
        if meta is None:
            raise UserError(f"{part} has no {fingerprint.meta_path(part).name} (written by an older imgcls, or"
                            " not by imgcls predict): merge cannot check which model wrote it; predict it again")
        if not meta.get("complete"):
            raise UserError(f"{part} is not finished (interrupted, or still running): finish it with the same"
                            " imgcls predict command and --resume, then merge")
        metas.append(meta)
    return metas


def _odd_one(parts: list[Path], values: list, what: str, show: Callable = str) -> None:
    """A UserError naming the parts whose ``values`` differ from the most common one (both shown)."""
    canon = [json.dumps(v, sort_keys=True) for v in values]
    common = Counter(canon).most_common(1)[0][0]
    odd = [f"{p} ({what} {show(v)})" for p, v, c in zip(parts, values, canon) if c != common]
    if odd:
        usual = show(values[canon.index(common)])
        raise UserError(f"{', '.join(odd)}: another {what} than the other parts ({usual}); merge only the outputs"
                        " of one model and one set of options")


def check_parts(parts: list[Path], metas: list[dict]) -> None:
    """One model, the same options, and shards 1..N of one N (a warning when they are not shards)."""
    short = lambda fp: fp[:fingerprint.SHORT]  # noqa: E731
    _odd_one(parts, [m["fingerprint"]["model"] for m in metas], "model", short)
    _odd_one(parts, [m["fingerprint"]["options"] for m in metas], "options (format, top-k, thresholds, events)",
             short)
    shards = [m.get("shard") for m in metas]
    if not any(shards):
        log.warning("merging %d outputs that are not shards of one run (no --shard): their rows are joined in"
                    " path order, and a file in two of them is an error", len(parts))
        return
    if not all(shards):
        plain = [str(p) for p, s in zip(parts, shards) if not s]
        raise UserError(f"{', '.join(plain)}: not a shard (no --shard), but the other parts are; merge the"
                        " shards of one run")
    _odd_one(parts, [(s["n"], s["by"]) for s in shards], "shard count and --shard-by",
             lambda v: f"N={v[0]} by {v[1]}")
    n = shards[0]["n"]
    seen: dict[int, Path] = {}
    for part, shard in zip(parts, shards):
        if shard["k"] in seen:
            raise UserError(f"shard {shard['k']}/{n} is given twice: {seen[shard['k']]} and {part}")
        seen[shard["k"]] = part
    missing = [k for k in range(1, n + 1) if k not in seen]
    if missing:
        raise UserError(f"shard(s) {', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''} of {n}"
                        " missing: give every part (out/part_*.csv), or predict the missing shards first")


# --------------------------------------------------------------------------- rows


def _merged(streams: list[Iterator[tuple[tuple, str, object]]], parts: list[Path]) -> Iterator[tuple[str, object]]:
    """(path, item) from every part, in path order, each path once (a UserError naming a path in two
    parts).  Streams when every part is in path order; otherwise the items are sorted in memory."""
    sorted_parts = all(_in_order(stream_factory()) for stream_factory in streams)
    if sorted_parts:
        merged = heapq.merge(*(factory() for factory in streams), key=lambda item: item[0])
    else:
        log.info("the parts are not in path order (a CSV of paths?): the merged rows are sorted by path")
        merged = iter(sorted((item for factory in streams for item in factory()), key=lambda item: item[0]))
    previous = None
    for key, path, item in merged:
        if key == previous:
            raise UserError(f"{path} is in two of the parts ({', '.join(map(str, parts))}); a file must be"
                            " predicted once: were two outputs of one shard given, or overlapping inputs?")
        previous = key
        yield path, item


def _in_order(stream) -> bool:
    previous = None
    for key, _, _ in stream:
        if previous is not None and key < previous:
            return False
        previous = key
    return True


def _csv_stream(part: Path) -> Callable[[], Iterator[tuple[tuple, str, dict]]]:
    def rows():
        with part.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
            for row in csv.DictReader(handle):
                yield path_key(row["path"]), row["path"], row
    return rows


def _jsonl_stream(part: Path) -> Callable[[], Iterator[tuple[tuple, str, bytes]]]:
    def rows():
        with part.open("rb") as handle:
            for line in handle:
                path = json.loads(line.decode("utf-8", "surrogateescape"))["path"]
                yield path_key(path), path, line
    return rows


def _header(part: Path) -> list[str]:
    with part.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        return next(csv.reader(handle), [])


@contextmanager
def _atomic_stream(path: Path, mode: str = "w"):
    """A handle on a temp file beside ``path`` that replaces ``path`` when the block ends without error."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        kwargs = {} if "b" in mode else dict(newline="", encoding="utf-8", errors="surrogateescape")
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _merge_csv(parts: list[Path], out: Path, metas: list[dict]) -> int:
    columns = _header(parts[0])
    for part in parts[1:]:
        if _header(part) != columns:
            raise UserError(f"{part} has columns {', '.join(_header(part))}, not {', '.join(columns)} like"
                            f" {parts[0]}; merge outputs of the same options")
    n = 0
    with _atomic_stream(out) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for _, row in _merged([_csv_stream(p) for p in parts], parts):
            writer.writerow(row)
            n += 1
    return n


def _merge_jsonl(parts: list[Path], out: Path, metas: list[dict]) -> int:
    n = 0
    with _atomic_stream(out, "wb") as handle:
        for _, line in _merged([_jsonl_stream(p) for p in parts], parts):
            handle.write(line)
            n += 1
    return n


def _read_rows(out: Path, fmt: outputs.Format) -> list[dict]:
    if fmt.name == "csv":
        with out.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
            return [typed(row) for row in csv.DictReader(handle)]
    return [json.loads(line) for line in out.read_bytes().decode("utf-8", "surrogateescape").splitlines() if line]


def _merge_megadetector(parts: list[Path], out: Path, metas: list[dict]) -> int:
    files = [json.loads(p.read_text(encoding="utf-8", errors="surrogateescape")) for p in parts]
    _odd_one(parts, [f["classification_categories"] for f in files], "set of classes")

    def images(data):
        return lambda: ((path_key(image["file"]), image["file"], image) for image in data["images"])

    merged = [image for _, image in _merged([images(f) for f in files], parts)]
    result = {**files[0], "images": merged}
    result["info"] = {**files[0]["info"], "classification_completion_time":
                      max(f["info"].get("classification_completion_time", "") for f in files)}
    rundir.atomic_write(out, json.dumps(result, indent=1, ensure_ascii=False))
    return len(merged)


def _csv_dicts(path: Path) -> list[dict]:
    return outputs.csv_dicts(path.read_bytes().decode("utf-8", "surrogateescape"))


def _merged_deployments(parts: list[Path]) -> list[dict]:
    """Each deployment once, from the first start to the last end over the parts (a part written before
    imgcls wrote deployments.csv gives its media rows instead)."""
    spans = []
    for part in parts:
        if (part / "deployments.csv").exists():
            for row in _csv_dicts(part / "deployments.csv"):
                spans += [{"deploymentID": row["deploymentID"], "timestamp": row.get(key, "")}
                          for key in ("deploymentStart", "deploymentEnd")]
        else:
            spans += _csv_dicts(part / "media.csv")
    return outputs.deployment_rows(spans)


def _merge_camtrapdp(parts: list[Path], out: Path, metas: list[dict]) -> int:
    """media.csv and observations.csv of every part: the media IDs imgcls made (m000001, ...) and the
    observation IDs are numbered again over the merged media, in path order, the event observations in
    the order their events first appear there; a --media table's IDs stay."""
    given_media = metas[0]["options"].get("media")
    media, events = [], []
    for part in parts:
        part_media = {row["mediaID"]: row for row in _csv_dicts(part / "media.csv")}
        for obs in _csv_dicts(part / "observations.csv"):
            if obs["observationLevel"] == "event":
                events.append(obs)
                continue
            row = part_media[obs["mediaID"]]
            media.append((path_key(row["filePath"]), row["filePath"], (row, obs)))
    media.sort(key=lambda item: item[0])
    order = [item for _, item in _merged([lambda: iter(media)], parts)]
    media_rows, obs_rows = [], []
    for i, (row, obs) in enumerate(order, start=1):
        if not given_media:
            media_id = f"m{i:06d}"
            media_rows.append({**row, "mediaID": media_id})
            obs = {**obs, "mediaID": media_id, "observationID": f"obs-{media_id}"}
        obs_rows.append(obs)
    first: dict[str, int] = {}  # the unsharded run lists events as they first appear among the media
    for i, obs in enumerate(obs_rows):
        first.setdefault(obs["eventID"], i)
    events.sort(key=lambda obs: first.get(obs["eventID"], len(obs_rows)))
    for k, obs in enumerate(events, start=1):
        obs_rows.append({**obs, "observationID": f"obs-event-{k:06d}"})
    out.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write(out / "observations.csv", outputs.csv_text(outputs.OBSERVATION_COLUMNS, obs_rows))
    media_text = (parts[0] / "media.csv").read_bytes().decode("utf-8", "surrogateescape") if given_media else \
        outputs.csv_text(outputs.MEDIA_COLUMNS, media_rows)
    rundir.atomic_write(out / "media.csv", media_text)
    package = json.loads((parts[0] / "datapackage.json").read_text(encoding="utf-8"))
    if package["imgcls"].get("deployments") == "deployments.csv beside --media":  # the user's, as every part has it
        text = (parts[0] / "deployments.csv").read_bytes().decode("utf-8", "surrogateescape")
        deployments = outputs.csv_dicts(text)
    else:
        deployments = _merged_deployments(parts)
        text = outputs.csv_text(outputs.DEPLOYMENT_COLUMNS, deployments)
    rundir.atomic_write(out / "deployments.csv", text)
    package["resources"] = outputs.package_resources()  # parts written before deployments.csv lack it
    outputs.package_extent(package, deployments, package["imgcls"]["labels"])
    package["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    package["name"] = out.name.lower() or package["name"]
    package["imgcls"]["merged_from"] = [str(p) for p in parts]
    rundir.atomic_write(out / "datapackage.json", json.dumps(package, indent=2, ensure_ascii=False))
    return len(order)


# how each format's parts become one (csv/jsonl rows stream; the whole files are read whole)
MERGERS: dict[str, Callable[[list[Path], Path, list[dict]], int]] = {
    "csv": _merge_csv, "jsonl": _merge_jsonl, "megadetector": _merge_megadetector, "camtrapdp": _merge_camtrapdp,
}


def _without_companions(parts: list[Path]) -> list[Path]:
    """The parts less the files that belong to another part (``out/part_*.csv`` also matches each part's
    ``part_K.events.csv``): event rows, sidecars, journals and locks are not parts."""
    def companions(part: Path) -> set[str]:
        return {os.path.abspath(f) for f in (outputs.events_path(part), fingerprint.meta_path(part),
                                             outputs.journal_path(part), part.with_name(part.name + ".lock"))}

    taken = set().union(*(companions(p) for p in parts)) if parts else set()
    dropped = [p for p in parts if os.path.abspath(p) in taken]
    if dropped:
        log.info("not parts but files of a part (event rows, sidecars): %s", ", ".join(map(str, dropped)))
    return [p for p in parts if os.path.abspath(p) not in taken]


def merge(parts: list[str | Path], out: str | Path, overwrite: bool = False) -> dict:
    """Merge the outputs ``parts`` (the shards of one ``imgcls predict`` job) into ``out``; returns the row
    count, the format and the files written.  Everything is checked before ``out`` is touched."""
    parts, out = _without_companions([Path(p) for p in parts]), Path(out)
    if not parts:
        raise UserError("name the outputs to merge, e.g. imgcls merge out/part_*.csv --out all.csv")
    if len(set(map(os.path.abspath, parts))) < len(parts):
        raise UserError("an output is named twice among the parts; give each shard's output once")
    if any(os.path.abspath(p) == os.path.abspath(out) for p in parts):
        raise UserError(f"--out {out} is one of the parts; write the merged output to a new file")
    metas = _metas(parts)
    check_parts(parts, metas)
    fmt = outputs.FORMATS[metas[0]["options"]["format"]]
    if fmt.whole:
        unfinished = [str(p) for p in parts if outputs.journal_path(p).exists()]
        if unfinished:
            raise UserError(f"{', '.join(unfinished)}: not finished (a journal is there); finish with --resume")
    if (metas[0]["options"].get("aggregate") and fmt.name == "camtrapdp"
            and any((m.get("shard") or {}).get("by") == "path" for m in metas)):
        log.warning("Camtrap DP event observations of shards by path may split an event; --shard-by folder keeps"
                    " each camera's events in one shard")
    outputs.check_output_path(out, fmt)
    if (out.exists() and (not fmt.folder or any(out.iterdir()))) and not overwrite:
        raise UserError(f"{out} already exists; add --overwrite to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        rows = MERGERS[fmt.name](parts, out, metas)
        files = outputs.output_files(out, fmt, None)
        aggregate = metas[0]["options"].get("aggregate")
        if aggregate and fmt.events:  # event rows again, from the merged rows (in their order)
            model = metas[0]["model"]
            job = outputs.Job(out, fmt, list(model["labels"]), "", dict(metas[0]["options"].get("thresholds") or {}),
                              [], aggregate)
            files += fmt.events(job, _read_rows(out, fmt))
        counted = sum(m.get("rows", 0) for m in metas)
        if rows != counted:
            log.warning("the parts hold %d rows but their sidecars count %d: a part was edited after its run",
                        rows, counted)
        meta = {**metas[0], "shard": None, "files": [str(f) for f in files], "complete": True, "rows": rows,
                "merged_from": [str(p) for p in parts], "imgcls": __version__,
                "inputs": {"inputs": sorted({i for m in metas for i in m["inputs"]["inputs"]})}}
        meta.pop("rows_before_meta", None)
        fingerprint.write(out, meta)
    return {"rows": rows, "format": fmt.name, "files": [str(f) for f in files], "parts": len(parts),
            "meta": str(fingerprint.meta_path(out))}
