"""User-facing error helpers."""

from imgcls.errors import UserError, first_line


def test_first_line_of_paragraphs_empty_messages_and_long_lines():
    assert first_line(RuntimeError("Weights only load failed.\n\tdetails\nmore")) == "Weights only load failed."
    assert first_line(RuntimeError("")) == "RuntimeError" and first_line(ValueError("  \n ")) == "ValueError"
    assert first_line(OSError("x" * 500), limit=10) == "x" * 10
    assert UserError.exit_code == 2
