"""Turning exceptions into one readable line for the user."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of ``exc``'s message (at most ``limit`` characters), or "" when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


def for_user(exc: BaseException) -> str:
    """What a command prints for an error it stops on: an OS error on a file (a full disk, a read-only or forbidden
    destination) as "FILE: reason"; every other error's own message."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)
