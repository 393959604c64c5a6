"""Pictures of a run: training curves from ``metrics.jsonl``, sample grids (image | ground truth | prediction), and
several runs compared (``r2unet compare``)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..data.imageio import class_colors
from ..fileio import atomic_write_bytes
from ..models import RECURRENT


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - every plot uses it; loaded with pyplot (see load)

    return plt


def load() -> None:
    """Import the plotting libraries now (a training run does this before it takes over SIGTERM, so that a signal
    never lands inside their first import, which turns it into an ImportError)."""
    _pyplot()


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
    atomic_write_bytes(out, _figure_bytes(fig, out, dpi=100))  # a viewer never sees half
    plt.close(fig)
    return out


def _figure_bytes(fig, path: Path, dpi: int) -> bytes:
    """The figure encoded in memory in the format of ``path``'s suffix, for one checked write."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi)
    return buffer.getvalue()


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


def color_labels(labels: np.ndarray, num_classes: int, colors=None) -> np.ndarray:
    """Class indices (H, W) as an RGB picture in the class colours (default ``class_colors``)."""
    return np.asarray(colors or class_colors(num_classes), np.uint8)[labels]


def blend(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.45, colors=None) -> np.ndarray:
    """The image with each foreground class laid over it in its colour."""
    out = image.copy()
    fg = labels > 0
    out[fg] = (image[fg] * (1 - alpha) + color_labels(labels, num_classes, colors)[fg] * alpha).astype(np.uint8)
    return out


def sample_grid(rows: list[list[tuple[np.ndarray, str]]], out: str | Path, title: str = "") -> Path:
    """A grid of pictures, one row per sample: each a list of (picture, label), a picture (H, W, 3) uint8 or (H, W)
    bool or 0..1 (drawn in grey); the task makes the rows (``Task.sample_panels``)."""
    plt = _pyplot()
    n, columns = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n, columns, figsize=(2.5 * columns, 2.5 * n), squeeze=False)
    for row, panels in zip(axes, rows):
        for ax, (pic, label) in zip(row, panels):
            ax.imshow(pic, cmap="gray", vmin=0, vmax=1) if pic.ndim == 2 else ax.imshow(pic)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    atomic_write_bytes(out, _figure_bytes(fig, out, dpi=80))  # a viewer never sees half
    plt.close(fig)
    return out


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
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


def run_summary(run_dir: str | Path) -> dict:
    """What ``compare`` shows of one run folder: its curves (``metrics.jsonl``) and, once training has finished, its
    test scores and throughput (``results.json``); the network from ``results.json`` or ``config.json``."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: is {run_dir} a training output folder?")
    rows = read_metrics(metrics)
    info: dict = {}
    for name in ("config.json", "results.json"):  # results.json last: it describes the finished run
        try:
            info.update(json.loads((run_dir / name).read_text()))
        except (OSError, json.JSONDecodeError):
            pass
    model = info.get("model_type", "?")
    if model in RECURRENT and "t" in info:
        model += f" t={info['t']}"
    best = [r for r in rows if r.get("best")]
    return {"run": str(run_dir), "model": model, "epochs": rows[-1]["epoch"] if rows else 0,
            "best_epoch": best[-1]["epoch"] if best else None,
            "best_valid": best[-1].get("valid") if best else None,
            "test": info.get("test") if "best_valid_JS_plus_DC" in info else None,  # only a finished run's
            "test_spread": info.get("test_spread") if "best_valid_JS_plus_DC" in info else None,
            "fps": info.get("fps") if "best_valid_JS_plus_DC" in info else None, "rows": rows}


def _labels(runs: list[str]) -> list[str]:
    """Short names for run folders: the last part of each path, more parts where two would read the same."""
    parts = [Path(r).resolve().parts for r in runs]
    labels = []
    for i, p in enumerate(parts):
        depth = 1
        while depth < len(p) and any(q[-depth:] == p[-depth:] for j, q in enumerate(parts) if j != i):
            depth += 1
        labels.append("/".join(p[-depth:]))
    return labels


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> tuple[Path, list[dict]]:
    """``compare.png`` for several runs (say U-Net against R2U-Net): training loss and validation JS per epoch, each
    run's best epoch marked, and the test JS / DC of the finished runs side by side. Returns the picture and one
    summary per run (``run_summary``), labelled."""
    from matplotlib.ticker import MaxNLocator

    summaries = [run_summary(r) for r in run_dirs]
    for s, label in zip(summaries, _labels([s["run"] for s in summaries])):
        s["label"] = f"{label} ({s['model']})"
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.9]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, s in enumerate(summaries):
        colour = colours[k % len(colours)]
        rows = s["rows"]
        axes[0].plot([r["epoch"] for r in rows], [r.get("train_loss") for r in rows], color=colour, lw=1.4,
                     label=s["label"])
        pts = [(r["epoch"], r["valid"]["JS"]) for r in rows if r.get("valid")]
        if pts:
            axes[1].plot(*zip(*pts), color=colour, lw=1.4, label=s["label"])
        if s["best_valid"]:
            axes[1].plot(s["best_epoch"], s["best_valid"]["JS"], "*", ms=11, color=colour)
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].set(title="validation JS (star: best.pt)", xlabel="epoch", ylim=(0, 1))
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(loc="best", fontsize=8, framealpha=0.7)
    finished = [(k, s) for k, s in enumerate(summaries) if s["test"]]
    ax = axes[2]
    if finished:
        x = np.arange(len(finished))
        for offset, key, hatch in ((-0.2, "JS", ""), (0.2, "DC", "//")):
            values = [s["test"][key] for _, s in finished]
            # error bars: the 95 % bootstrap interval of the mean, where the run recorded it
            errors = np.array([[v - s["test_spread"][key]["ci"][0], s["test_spread"][key]["ci"][1] - v]
                               if s.get("test_spread") else [0.0, 0.0] for v, (_, s) in zip(values, finished)]).T
            bars = ax.bar(x + offset, values, width=0.38, hatch=hatch, edgecolor="white",
                          color=[colours[k % len(colours)] for k, _ in finished], label=f"test {key}",
                          yerr=errors, capsize=3, error_kw={"lw": 1})
            texts = ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], label_type="center", fontsize=7,
                                 rotation=90, color="white", fontweight="bold")  # inside: error bars sit on top
            for text, bar in zip(texts, bars):  # readable over the hatching
                text.set_bbox({"boxstyle": "round,pad=0.2", "facecolor": bar.get_facecolor(), "edgecolor": "none"})
        ax.set_xticks(x, [s["label"].split(" (")[0] for _, s in finished], rotation=20, ha="right", fontsize=8)
        ax.set(title="test split (best.pt): JS plain, DC hatched; 95% CI", ylim=(0, 1.08))
        ax.grid(alpha=0.3, axis="y")
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no finished run yet:\ntest scores appear when training ends", ha="center", va="center")
    fig.tight_layout()
    out = Path(out)
    atomic_write_bytes(out, _figure_bytes(fig, out, dpi=100))
    plt.close(fig)
    for s in summaries:
        del s["rows"]
    return out, summaries


def comparison_table(runs: list[dict]) -> str:
    """``compare``'s table: per run the epochs, best epoch, validation JS, test JS with its 95 % CI, DC, ACC, img/s."""

    def score(s, key):
        return f"{s['test'][key]:.4f}" if s["test"] else "-"

    def interval(s, key):
        return "{:.3f}-{:.3f}".format(*s["test_spread"][key]["ci"]) if s.get("test_spread") else "-"

    width = max(len(s["label"]) for s in runs)
    lines = [f"{'run':<{width}}  epochs  best  valid JS  test JS  (95% CI)     test DC  test ACC   img/s"]
    for s in runs:
        valid = f"{s['best_valid']['JS']:.4f}" if s["best_valid"] else "-"
        fps = f"{s['fps']:.1f}" if s["fps"] else "-"
        lines.append(f"{s['label']:<{width}}  {s['epochs']:>6}  {s['best_epoch'] or '-':>4}  {valid:>8}  "
                     f"{score(s, 'JS'):>7}  {interval(s, 'JS'):<11}  {score(s, 'DC'):>7}  {score(s, 'ACC'):>8}  "
                     f"{fps:>6}")
    return "\n".join(lines)
