"""Row files: prediction rows streamed to disk as they come, and resumed by position after a crash.

A row file is ``csv`` (a header, then one row per image) or JSON Lines (one
JSON object per image, numbers as numbers, missing values null).  Rows are
written in input order and flushed batch by batch, so a kill at any moment
loses at most the batch in flight.  ``--resume`` keys on position: the k
complete rows in the file are inputs 1..k (checked path by path, the file
read back as a stream beside the lazy inputs, so memory stays flat), and the
run goes on from input k + 1.  A last row cut by a kill is truncated away;
an unreadable row anywhere else is an error, and a file this command did not
write is never touched.  :func:`output_lock` keeps two runs from writing one
output.  Files are UTF-8 with ``surrogateescape``, so file names that are not
valid UTF-8 survive.

The standard library only: the prediction runtime stays torch-free.
"""

from __future__ import annotations

import csv
import io
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..data.records import Record
from ..errors import UserError

try:  # POSIX; elsewhere predict runs without the output lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def typed(row: dict) -> dict:
    """A row with numbers as numbers and missing values as None (JSON Lines; rows read back from a CSV)."""
    out = {}
    for key, value in row.items():
        if value == "" or value is None:
            out[key] = None
        elif key == "prob" or key.startswith("prob_"):
            out[key] = float(value)
        else:
            out[key] = value
    return out



# --------------------------------------------------------------------------- row files


class CsvRows:
    """``OUT`` as CSV: a header, then one row per image.  UTF-8 with ``surrogateescape``, so file names
    that are not valid UTF-8 survive."""

    kind = "CSV"

    def __init__(self, path: Path, columns: list[str], is_ours: Callable[[list[str]], bool]):
        self.path, self.columns, self.is_ours = path, columns, is_ours

    def keep(self, records: Iterator[Record], resume: bool, overwrite: bool,
             check: Callable[[], None] | None = None) -> int:
        """How many inputs the file already holds (0: write it afresh), taken from ``records`` (an
        iterator: those inputs are consumed, checked against the rows); UserErrors for files not to be
        touched.  ``check``: called before the rows are read, once the file is known to be ours."""
        out = self.path
        if overwrite or self._replaceable():
            return 0
        header = self._first_line()
        ours = self.is_ours(header)
        if not resume:
            if ours:
                raise UserError(f"{out} already exists; add --resume to finish it (only the images it lacks are"
                                " predicted) or --overwrite to replace it")
            raise UserError(f"{out} already exists and is not an imgcls predict CSV; choose another --out,"
                            " or add --overwrite to replace it")
        if not ours:
            raise UserError(f"{out} is not an imgcls predict CSV (its first line is {','.join(header)[:80]!r});"
                            " --resume continues a file this command wrote: choose another --out, or use --overwrite")
        if header != self.columns:
            raise UserError(f"{out} has columns {', '.join(header)}, not {', '.join(self.columns)} (another --top-k,"
                            " --events/--aggregate, or thresholds added or removed?);"
                            " resume with the options that wrote it, or use --overwrite")
        if check is not None:
            check()
        return check_same_inputs(out, self._complete_rows(), records)

    @contextmanager
    def open(self, kept: int):
        """A function writing one row; ``flush()`` on it makes the rows so far durable."""
        with self.path.open("a" if kept else "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            if not kept:
                writer.writeheader()
                handle.flush()  # a crash before the first batch leaves our header, which may be replaced
            yield _Writer(writer.writerow, handle.flush)

    def read(self) -> list[dict]:
        with self.path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
            return [typed(row) for row in csv.DictReader(handle)]

    def _replaceable(self) -> bool:
        """True when the file is absent, empty, or exactly our header line: there is nothing in it to lose."""
        try:
            if self.path.stat().st_size > 64 * 1024:
                return False
            text = self.path.read_bytes().decode("utf-8", "surrogateescape")
        except FileNotFoundError:
            return True
        if not text:
            return True
        line = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else None
        return line is not None and "\n" not in line and "\r" not in line and self.is_ours(line.split(","))

    def _first_line(self) -> list[str]:
        with self.path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
            try:
                return next(csv.reader([handle.readline(64 * 1024)]), [])
            except csv.Error:
                return []

    def _complete_rows(self) -> Iterator[str]:
        """The paths of the complete rows, in order, read as a stream.  A last row cut off by a crash (the
        bytes do not read back as the row the csv module writes) is truncated away once the rows are all
        read; an unreadable row anywhere else is an error."""
        out, columns = self.path, self.columns
        size = out.stat().st_size
        pieces: list[str] = []  # the text of the record being read
        consumed = [0]          # bytes read so far

        def lines(handle):  # the reader pulls one line at a time and never reads past the end of a record
            for piece in handle:
                consumed[0] += len(piece.encode("utf-8", "surrogateescape"))
                pieces.append(piece)
                yield piece

        with out.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
            reader = csv.reader(lines(handle))
            next(reader)  # the header, already checked
            pieces.clear()
            good_end, line = consumed[0], 2
            try:
                for fields in reader:
                    chunk = "".join(pieces)
                    pieces.clear()
                    good = len(fields) == len(columns)
                    if not good or _csv_line(fields).rstrip("\r\n") != chunk.rstrip("\r\n") or not chunk.endswith("\n"):
                        if consumed[0] < size:  # only the last row may be cut off
                            raise UserError(f"{out}:{line}: not a row imgcls predict wrote; fix or delete that"
                                            " line, or use --overwrite")
                        break
                    yield fields[0]
                    good_end = consumed[0]
                    line += chunk.count("\n")
            except csv.Error as err:
                raise UserError(f"{out}:{line}: not a CSV row ({err}); fix or delete that line, or use"
                                " --overwrite") from None
        _truncate(out, size, good_end)


class JsonlRows:
    """``OUT`` as JSON Lines: one JSON object per image, numbers as numbers, missing values null.  JSON
    escapes newlines, so a row is one line and a complete row ends with a newline."""

    kind = "JSON Lines"

    def __init__(self, path: Path, columns: list[str], is_ours: Callable[[list[str]], bool]):
        self.path, self.columns, self.is_ours = path, columns, is_ours

    def keep(self, records: Iterator[Record], resume: bool, overwrite: bool,
             check: Callable[[], None] | None = None) -> int:
        out = self.path
        if overwrite or not out.exists() or out.stat().st_size == 0:
            return 0
        with out.open("rb") as handle:
            head = handle.readline()
            whole = not handle.read(1)
        text = head.decode("utf-8", "surrogateescape")
        first = _json_row(text.rstrip("\n")) if text.endswith("\n") else None
        # our rows start with the path; a first row cut by a kill is ours too (and is truncated on resume)
        cut_first = first is None and whole and not text.endswith("\n") and text.startswith(ROW_START)
        ours = cut_first or first is not None and self.is_ours(list(first))
        if not resume:
            if ours:
                raise UserError(f"{out} already exists; add --resume to finish it (only the images it lacks are"
                                " predicted) or --overwrite to replace it")
            raise UserError(f"{out} already exists and is not an imgcls predict JSON Lines file; choose another"
                            " --out, or add --overwrite to replace it")
        if not ours:
            raise UserError(f"{out} is not an imgcls predict JSON Lines file; --resume continues a file this"
                            " command wrote: choose another --out, or use --overwrite")
        if first is not None and list(first) != self.columns:
            raise UserError(f"{out} has fields {', '.join(first)}, not {', '.join(self.columns)} (another --top-k,"
                            " --format, --events/--aggregate, or thresholds added or removed?);"
                            " resume with the options that wrote it, or use --overwrite")
        if check is not None:
            check()
        return check_same_inputs(out, self._complete_rows(), records)

    def _complete_rows(self) -> Iterator[str]:
        size, good_end = self.path.stat().st_size, 0
        with self.path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                complete = raw.endswith(b"\n")  # JSON escapes newlines: a complete row ends with one
                row = _json_row(raw[:-1].decode("utf-8", "surrogateescape")) if complete else None
                if row is None or list(row) != self.columns:
                    if complete and good_end + len(raw) < size:  # only the last row may be cut off
                        raise UserError(f"{self.path}:{number}: not a row imgcls predict wrote; fix or delete"
                                        " that line, or use --overwrite")
                    break
                yield row["path"]
                good_end += len(raw)
        _truncate(self.path, size, good_end)

    @contextmanager
    def open(self, kept: int):
        with self.path.open("a" if kept else "w", encoding="utf-8", errors="surrogateescape") as handle:
            yield _Writer(lambda row: handle.write(json.dumps(typed(row), ensure_ascii=False) + "\n"), handle.flush)

    def read(self) -> list[dict]:
        text = self.path.read_bytes().decode("utf-8", "surrogateescape")
        return [json.loads(line) for line in text.split("\n") if line]


ROW_START = '{"path": '


@dataclass
class _Writer:
    write: Callable[[dict], object]
    flush: Callable[[], None]


def _json_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and "path" in row else None


def _truncate(out: Path, size: int, good_end: int) -> None:
    if good_end < size:  # killed mid-row: keep whole rows only
        with out.open("r+b") as handle:
            handle.truncate(good_end)


def _csv_line(fields: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(fields)
    return buffer.getvalue()


def check_same_inputs(out: Path, done: Iterable[str], records: Iterator[Record]) -> int:
    """Row i of ``out`` must be input i: otherwise the file was written for other inputs.  Takes one input
    from ``records`` per row, streaming both; returns how many rows there are."""
    fix = "resume with the inputs (and order) that wrote it, or use --overwrite"
    count = 0
    for written in done:
        record = next(records, None)
        if record is None:
            more = count + 1 + sum(1 for _ in done)
            raise UserError(f"{out} holds {more} rows but there are only {count} inputs; it was written"
                            f" for other inputs: {fix}")
        count += 1
        if not _same_input(written, record.path):
            raise UserError(f"{out}: row {count} is {written!r} but input {count} is {str(record.path)!r}; the"
                            f" file was written for other inputs: {fix}")
    return count


def _same_input(written: str, path: Path) -> bool:
    """``written`` (a path column) names ``path``: as given, resolved absolute, or (written relative from
    another working directory) as the tail of its absolute path."""
    given = str(path)
    if written == given or os.path.abspath(written) == os.path.abspath(given):
        return True
    if os.path.isabs(written):
        return False
    tail = tuple(p for p in Path(os.path.normpath(written)).parts if p not in ("..", "."))
    return bool(tail) and Path(os.path.abspath(given)).parts[-len(tail):] == tail


# --------------------------------------------------------------------------- the output lock


@contextmanager
def output_lock(out: Path):
    """Hold an exclusive lock on ``OUT.lock`` for the block; a UserError when another process holds it.

    The lock file is removed on the way out while still locked; a process that
    opened it meanwhile sees another inode after locking and retries, so two
    runs never both believe they hold the lock.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path = out.with_name(out.name + ".lock")
    fd = _acquire(lock_path, out)
    try:
        yield
    finally:
        try:
            os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)  # releases the lock (also on Ctrl-C and exceptions; the kernel does it on a kill)


def _acquire(lock_path: Path, out: Path) -> int:
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{out} is being written by another imgcls predict (it holds {lock_path});"
                            " wait for that run to finish, or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_inode(fd, lock_path):
            return fd
        os.close(fd)  # the previous holder removed this lock file as we locked it: take the new one


def _same_inode(fd: int, path: Path) -> bool:
    try:
        held, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)
