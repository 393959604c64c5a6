"""Atomic file writes: a temporary file in the same folder, then a rename, so readers never see half a file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_image(image: Any, path: str | Path, **options) -> None:
    """``image.save(path)`` for a PIL image, through a temporary file: an interrupted write (Ctrl-C, a full disk)
    leaves the previous file or none, never a truncated one that a later run would take as done."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
    try:
        image.save(tmp, format=formats.get(path.suffix.lower()), **options)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
