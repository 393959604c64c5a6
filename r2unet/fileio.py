"""Atomic file writes: a temporary file in the same folder, then a rename, so readers never see half a file and an
interrupted write (Ctrl-C, a full disk) leaves the previous file or none, never a truncated one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` writes the whole file to ``tmp``; it then replaces ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save_image(image: Any, path: str | Path, **options) -> None:
    """``image.save(path, **options)`` for a PIL image (the format follows the suffix, as PIL's would)."""
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
    atomic_write(path, lambda tmp: image.save(tmp, format=formats.get(Path(path).suffix.lower()), **options))
