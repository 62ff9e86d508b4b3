"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a bad path, an empty class
folder, weights that do not fit).  The CLI prints its one-line message and
exits with status 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, with a message saying what to do."""

    exit_code = 2
