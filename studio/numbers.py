"""Numbers in messages people read, and ids read from forms."""

from __future__ import annotations


def shown(number: float) -> str:
    """A bound or a value as a person writes it: whole numbers in full (2,147,483,647, not 2.14748e+09),
    others in their shortest form (0.7, 1e-06)."""
    if isinstance(number, int) or (float(number).is_integer() and abs(number) < 1e16):
        return f"{int(number):,}"
    return f"{number:g}"


def form_id(text: str) -> int | None:
    """A row id from a form field: ASCII digits that fit a 64-bit id, else None (never a 500 from int()
    on thousands of digits, never a negative or non-ASCII digit taken for an id)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None
