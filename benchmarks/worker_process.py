"""A benchmark row in a process of its own, driven line by line (used by engines.py, predict.py, spin.py).

Why a process per row: an allocator cannot change inside a running process,
and even identical ONNX Runtime sessions in one process differ by ~2% by
creation order.  The protocol is JSON lines: the worker first prints
``{"ready": ...}`` (or ``{"error": ...}``), then answers every line it reads
on stdin with one JSON object.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Callable


def serve(handle: Callable[[str], dict], ready: object = True) -> None:
    """Worker side: announce ``ready``, then answer each stdin line with ``handle(line)``."""
    print(json.dumps({"ready": ready}), flush=True)
    for line in sys.stdin:
        print(json.dumps(handle(line.strip())), flush=True)


def refuse(error: str) -> None:
    """Worker side: tell the parent this worker cannot run (instead of serving)."""
    print(json.dumps({"error": error}), flush=True)


class WorkerProcess:
    """Parent side: start ``argv`` and wait for it to be ready (``.ready`` holds what it announced)."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._reply()["ready"]

    def ask(self, line: str = "") -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        reply = json.loads(line) if line else {"error": f"worker {' '.join(self.argv[1:3])} died"}
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply
