"""Every progress bar of imgcls, one helper: a tqdm bar on a terminal, plain lines elsewhere.

Written to a file or a pipe (CI, nohup, ``| tee``), a tqdm bar becomes hundreds of
carriage-return fragments.  There :func:`bar` returns a :class:`PlainProgress` instead,
which logs one line every ``interval`` seconds (as timm's train.py logs every N steps)
and, for bars that stay (``leave=True``), one line when it closes.  Bars that vanish on a
terminal (``leave=False``, such as an epoch's, whose result the epoch's log line gives)
print nothing when they end in less than ``interval`` seconds.

Only tqdm and the standard library: the prediction runtime uses it.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("imgcls")

#: seconds between two plain lines of one long phase
INTERVAL = 30.0


def interactive() -> bool:
    """A real bar: stderr (tqdm's stream) is a terminal, or a notebook kernel draws the widget."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def bar(iterable=None, *, total=None, desc: str | None = None, disable: bool = False, unit: str = "it",
        leave: bool = True, initial: int = 0, **kwargs):
    """``tqdm(...)`` on a terminal, else :class:`PlainProgress` with the same small API
    (iteration, ``update``, ``set_postfix``, ``total``, ``refresh``, ``close``, a context manager)."""
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=disable, unit=unit, leave=leave, initial=initial,
                    **kwargs)
    return PlainProgress(iterable, total=total, desc=desc, disable=disable, unit=unit, leave=leave, initial=initial)


class PlainProgress:
    """Progress as whole log lines: every ``interval`` seconds, and at the end when ``leave``."""

    def __init__(self, iterable=None, total=None, desc=None, disable=False, unit="it", leave=True, initial=0,
                 interval: float | None = None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.disable, self.unit, self.leave = total, desc or "", disable, unit, leave
        self.n = self._start_n = initial
        self.postfix: dict = {}
        self.interval = INTERVAL if interval is None else interval
        self._start = self._last = time.monotonic()
        self._closed = False

    def __iter__(self):
        if self.iterable is None:
            return
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __len__(self):
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self._last >= self.interval:
            self._last = now
            self._line()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.leave and self.n > self._start_n:
            self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self._start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        post = "".join(f", {k}={v}" for k, v in self.postfix.items())
        log.info("%s: %s %s in %.0f s (%.1f %s/s%s)", self.desc or "progress", done, self.unit, elapsed, rate,
                 self.unit, post)
