"""Shards: a deterministic share of the inputs, so N jobs (a SLURM array) predict one set of images.

``--shard K/N`` keeps the inputs whose key hashes to K (1-based) among N.  The key
is the path relative to the input it came from (:func:`imgcls.data.sources.keyed_inputs`),
so a shard holds the same files from any working directory and after the data moved;
``--shard-by folder`` hashes the folder instead, so a camera's folder (and with it its
capture events) stays in one shard.  The hash is sha256, never Python's salted ``hash``.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from ..data.records import Record
from ..errors import UserError

# what a record's key is hashed as, by --shard-by
SHARD_BY: dict[str, Callable[[str], str]] = {
    "path": lambda key: key,
    "folder": posixpath.dirname,
}


@dataclass(frozen=True)
class Shard:
    k: int          # 1-based
    n: int
    by: str = "path"

    def owns(self, key: str) -> bool:
        return shard_of(key, self.n, self.by) == self.k

    def to_dict(self) -> dict:
        return {"k": self.k, "n": self.n, "by": self.by}

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"


def shard_of(key: str, n: int, by: str = "path") -> int:
    """The shard (1..n) of a record's key."""
    text = SHARD_BY[by](key).encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") % n + 1


def parse_shard(text: str | None, by: str = "path") -> Shard | None:
    """``"K/N"`` (1 <= K <= N) -> :class:`Shard`; None for None; a UserError otherwise."""
    if by not in SHARD_BY:
        raise UserError(f"unknown --shard-by {by!r}; use {' or '.join(SHARD_BY)}")
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise UserError(f"--shard {text}: expected K/N with 1 <= K <= N, e.g. --shard 3/50"
                        " (SLURM: --shard ${SLURM_ARRAY_TASK_ID}/N with --array=1-N)")
    return Shard(int(match[1]), int(match[2]), by)


def select(keyed: Iterable[tuple[Record, str]], shard: Shard | None) -> Iterator[Record]:
    """The records of ``shard`` (all of them for None), in input order."""
    for record, key in keyed:
        if shard is None or shard.owns(key):
            yield record
