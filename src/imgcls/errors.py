"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a bad path, an empty class
folder, weights that do not fit).  The CLI prints its one-line message and
exits with status 2; anything else is a bug and keeps its traceback.
"""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (libraries write paragraphs), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def listing(names, limit: int = 12) -> str:
    """``names`` joined for a message, the first ``limit`` of a long list and how many there are
    (a model with the 1,000 ImageNet classes must not print all of them)."""
    names = list(names)
    shown = ", ".join(str(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


class UserError(Exception):
    """A problem with the user's input, with a message saying what to do."""

    exit_code = 2
