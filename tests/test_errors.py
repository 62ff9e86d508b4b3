"""User-facing error helpers."""

from imgcls.errors import UserError, first_line, listing


def test_first_line_of_paragraphs_empty_messages_and_long_lines():
    assert first_line(RuntimeError("Weights only load failed.\n\tdetails\nmore")) == "Weights only load failed."
    assert first_line(RuntimeError("")) == "RuntimeError" and first_line(ValueError("  \n ")) == "ValueError"
    assert first_line(OSError("x" * 500), limit=10) == "x" * 10
    assert UserError.exit_code == 2


def test_listing_shortens_long_lists_and_counts_them():
    assert listing(["ant", "bee"]) == "ant, bee"
    classes = [f"c{i}" for i in range(1000)]
    text = listing(classes)
    assert text.startswith("c0, c1, ") and text.endswith("c11, ... (1000 in all)") and "c12" not in text
    assert listing(classes[:12]) == ", ".join(classes[:12])
