"""Turning exceptions into one readable line for the user."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of ``exc``'s message (at most ``limit`` characters), or "" when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""
