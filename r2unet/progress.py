"""Progress of long loops: a tqdm bar on a terminal; without one (a batch job's log), a line at most once a minute,
so that a long run is neither silent nor a log full of bar frames."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

LOG_INTERVAL_S = 60.0

T = TypeVar("T")


def track(iterable: Iterable[T], total: int, desc: str, unit: str = "img", log=print,
          terminal: bool | None = None) -> Iterator[T]:
    """Yield from ``iterable`` while showing progress: a bar when ``terminal`` (default: stderr is a terminal),
    else ``log("desc: i/total unit (rate unit/s)")`` at most every ``LOG_INTERVAL_S`` seconds."""
    if sys.stderr.isatty() if terminal is None else terminal:
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


# ------------------------------------------------------------------------------------------------ training
def around_bars(log, bar):
    """``log`` that clears the progress bars (stderr) while it prints, so a message never lands inside a bar's line."""
    if bar is None:
        return log
    def write(*args, **kwargs):
        with tqdm.external_write_mode(file=sys.stderr):
            log(*args, **kwargs)

    return write


class EpochLines:
    """Progress inside an epoch without a terminal: a line at log points, at most every ``LOG_INTERVAL_S`` (the
    interval of every other long loop's lines); with ``early``, also at the first two log points, the first step
    included, so that a run whose steps are slow shows its pace within a step, not after a minute of steps."""

    def __init__(self, log, epoch: int, num_epochs: int, total_steps: int, first_step: int, images_per_step: int,
                 early: bool = False):
        self.log, self.epoch, self.num_epochs, self.total = log, epoch, num_epochs, total_steps
        self.first, self.images_per_step, self.early = first_step, images_per_step, 2 if early else 0
        self.start = self.last = time.perf_counter()

    def __call__(self, state, loss: float) -> None:
        now = time.perf_counter()
        if now - self.last < LOG_INTERVAL_S and not self.early:
            return
        self.early = max(0, self.early - 1)
        self.last = now
        done = state.steps - self.first
        per_step = (now - self.start) / max(done, 1)
        left = (self.total - state.steps) * per_step
        self.log(f"  epoch {self.epoch + 1}/{self.num_epochs}  step {state.steps}/{self.total}  loss {loss:.4f}  "
                 f"{self.images_per_step / per_step:.1f} img/s ({per_step:.2g} s/step"
                 + (", the first with start-up" if done == 1 else "") + f")  epoch ends in {duration(left)}")


def training_bar(is_main: bool, total: int, images_per_batch: int):
    """A tqdm bar counting batches but showing images and img/s (the whole job's), on a terminal of the process
    that prints (None elsewhere)."""
    if not is_main or not sys.stderr.isatty():
        return None
    return tqdm(total=total, unit="img", unit_scale=images_per_batch, dynamic_ncols=True, leave=False)


def log_epoch(log, row: dict, num_epochs: int, eta_s: float = 0.0) -> None:
    loss, skipped = row["train_loss"], row.get("skipped_steps", 0)
    msg = f"epoch {row['epoch']}/{num_epochs}  loss {'NaN/Inf' if loss is None else f'{loss:.4f}'}"
    if skipped:
        msg += f" ({skipped} step{'s' if skipped > 1 else ''} skipped: NaN/Inf)"
    msg += f"  lr {row['lr']:.2e}  {row['train_img_per_s']:.1f} img/s"
    if row.get("valid"):
        v = row["valid"]
        msg += f"  valid JS {v['JS']:.4f} DC {v['DC']:.4f} ACC {v['ACC']:.4f}" + ("  (best)" if row.get("best") else "")
    if row["epoch"] < num_epochs:
        msg += f"  ETA {duration(eta_s)}"
    log(msg)


def tensorboard_row(writer, row: dict) -> None:
    step = row["epoch"]
    if row["train_loss"] is not None:
        writer.add_scalar("train/loss", row["train_loss"], step)
    writer.add_scalar("train/lr", row["lr"], step)
    writer.add_scalar("train/img_per_s", row["train_img_per_s"], step)
    for k, v in (row.get("valid") or {}).items():
        writer.add_scalar(f"valid/{k}", v, step)
