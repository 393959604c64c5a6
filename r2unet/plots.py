"""Pictures of a run: training curves from ``metrics.jsonl`` and sample grids (image | ground truth | prediction)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .fileio import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash: the others still plot
    return rows


def plot_curves(rows: list[dict], out: str | Path) -> Path:
    """``curves.png``: train loss, validation JS/DC (and the training batches' JS, dashed) with the best epoch
    marked, and the learning rate, per epoch."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    epochs = [r["epoch"] for r in rows]
    axes[0].plot(epochs, [r.get("train_loss") for r in rows], marker="o", ms=3)
    axes[0].set(title="training loss", xlabel="epoch")
    for key, style in (("JS", "-o"), ("DC", "-s")):
        pts = [(r["epoch"], r["valid"][key]) for r in rows if r.get("valid")]
        if pts:
            axes[1].plot(*zip(*pts), style, ms=3, label=f"valid {key}")
    train_js = [(r["epoch"], r["train"]["JS"]) for r in rows if r.get("train")]
    if train_js:
        axes[1].plot(*zip(*train_js), "--", color="tab:gray", lw=1, label="train JS (augmented)")
    best = [r["epoch"] for r in rows if r.get("best")]
    if best:  # the last epoch flagged best is the checkpoint kept as best.pt
        axes[1].axvline(best[-1], color="tab:red", ls=":", lw=1.2, label=f"best.pt (epoch {best[-1]})")
    axes[1].set(title="validation scores", xlabel="epoch", ylim=(0, 1))
    if axes[1].lines:
        axes[1].legend(loc="best", fontsize=8, framealpha=0.7)
    axes[2].plot(epochs, [r.get("lr") for r in rows], marker="o", ms=3, color="tab:green")
    axes[2].set(title="learning rate", xlabel="epoch")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=_format(out), dpi=100))  # a viewer never sees half
    plt.close(fig)
    return out


def _format(path: Path) -> str:
    """matplotlib's format for a file name (the temporary file it is written to first has another suffix)."""
    return path.suffix.lstrip(".").lower() or "png"


def contour(mask: np.ndarray) -> np.ndarray:
    """Boolean outline (1 px) of a boolean mask."""
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def overlay(image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None = None, width: int = 2) -> np.ndarray:
    """The image (H, W, 3 uint8) with the predicted contour in green and the ground truth's in blue."""
    out = image.copy()
    for mask, colour in ((gt, (40, 120, 255)), (pred, (0, 255, 0))):
        if mask is None:
            continue
        edge = contour(mask)
        for _ in range(max(0, width - 1)):  # thicken
            e = edge.copy()
            e[1:] |= edge[:-1]
            e[:, 1:] |= edge[:, :-1]
            edge = e
        out[edge] = colour
    return out


def sample_grid(images: np.ndarray, gts: np.ndarray, preds: np.ndarray, out: str | Path, title: str = "",
                row_titles: list[str] | None = None) -> Path:
    """Rows of image | ground truth | prediction (with contours on the image). images (N, H, W, 3) uint8,
    gts/preds (N, H, W) bool; ``row_titles``: a label per row (e.g. the file name) above its image."""
    plt = _pyplot()
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i in range(n):
        js = _jaccard(preds[i], gts[i])
        first = row_titles[i] if row_titles else "image (green: pred, blue: truth)"
        panels = ((overlay(images[i], preds[i], gts[i]), first),
                  (gts[i], "ground truth"), (preds[i], f"prediction  JS={js:.2f}"))
        for ax, (pic, label) in zip(axes[i], panels):
            ax.imshow(pic, cmap="gray", vmin=0, vmax=1) if pic.ndim == 2 else ax.imshow(pic)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=_format(out), dpi=80))  # a viewer never sees half
    plt.close(fig)
    return out


def _jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def redraw(run_dir: str | Path) -> list[Path]:
    """``r2unet plot RUN_DIR``: redraw curves.png from metrics.jsonl."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: is {run_dir} a training output folder?")
    rows = read_metrics(metrics)
    if not rows:
        raise ValueError(f"{metrics} has no complete epoch yet")
    return [plot_curves(rows, run_dir / "curves.png")]
