"""Progress of long loops: a tqdm bar on a terminal; without one (a batch job's log), a line at most once a minute,
so that a long run is neither silent nor a log full of bar frames."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

LOG_INTERVAL_S = 60.0

T = TypeVar("T")


def track(iterable: Iterable[T], total: int, desc: str, unit: str = "img", log=print,
          terminal: bool | None = None) -> Iterator[T]:
    """Yield from ``iterable`` while showing progress: a bar when ``terminal`` (default: stderr is a terminal),
    else ``log("desc: i/total unit (rate unit/s)")`` at most every ``LOG_INTERVAL_S`` seconds."""
    if sys.stderr.isatty() if terminal is None else terminal:
        from tqdm import tqdm

        yield from tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
        return
    start = last = time.perf_counter()
    for done, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if now - last >= LOG_INTERVAL_S and done < total:
            last = now
            log(f"{desc}: {done}/{total} {unit} ({done / max(now - start, 1e-9):.1f} {unit}/s)")


def duration(seconds: float) -> str:
    """A short human duration: 45s, 12m05s, 3h07m."""
    s = round(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
