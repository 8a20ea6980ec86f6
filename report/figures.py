"""The report's matplotlib figures, drawn as vector PDFs at their printed size (report/build.py calls these).

Every function takes the numbers it plots (already read from the run files by build.py) and a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: Printed widths in inches: the A4 text block of report.typ (21 cm − 2 × 1.6 cm) and one column.
FULL_WIDTH = 7.0
COLUMN_WIDTH = 3.4

plt.rcParams.update({
    "font.size": 7.5, "axes.titlesize": 7.5, "axes.labelsize": 7.5, "legend.fontsize": 6.5,
    "xtick.labelsize": 6.5, "ytick.labelsize": 6.5, "axes.spines.top": False, "axes.spines.right": False,
    "pdf.fonttype": 42, "figure.dpi": 100, "axes.linewidth": 0.6, "lines.linewidth": 1.1,
    "svg.hashsalt": "tfgpt", "pdf.compression": 9,
})
#: No creation date in the PDF, so an unchanged figure is byte-identical when rebuilt.
_METADATA = {"CreationDate": None, "Creator": "report/build.py (matplotlib)"}


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="pdf", metadata=_METADATA)
    plt.close(fig)
    return path


def learning_curves(train: list[tuple[int, float]], lr: list[tuple[int, float]], epochs: list[dict[str, Any]],
                    best_step: int, tokens_per_step: int, test_loss: float | None, dev_name: str, path: Path) -> Path:
    """Train loss (TensorBoard, every log step) and dev loss (per epoch) against tokens seen, the best
    checkpoint marked; the learning rate on a second axis."""
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.15), layout="constrained")
    m = tokens_per_step / 1e6
    ax.plot([s * m for s, _ in train], [v for _, v in train], color="#1f77b4", lw=0.8, label="train (20-step mean)")
    ax.plot([e["step"] * m for e in epochs], [e["train_loss"] for e in epochs], "o", color="#1f77b4", ms=2.5,
            label="train (epoch mean)")
    ax.plot([e["step"] * m for e in epochs], [e["val_loss"] for e in epochs], "s-", color="#d62728", ms=2.5,
            label=f"{dev_name} (per epoch)")
    best = [e for e in epochs if e["step"] == best_step]
    if best:
        ax.plot([best_step * m], [best[0]["val_loss"]], marker="*", color="black", ms=8, ls="none",
                label=f"best checkpoint (step {best_step:,})")
    if test_loss is not None:
        ax.axhline(test_loss, color="#2ca02c", lw=0.8, ls="--", label="test loss of that checkpoint")
    losses = [v for _, v in train] + [e["val_loss"] for e in epochs]
    low = min(losses)
    ax.set_ylim(low - 0.15, min(max(losses), low + 3.2))
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.25, lw=0.4)
    if lr:
        ax2 = ax.twinx()
        ax2.plot([s * m for s, _ in lr], [v * 1e3 for _, v in lr], color="0.55", lw=0.7, ls=":")
        ax2.set_ylabel("learning rate (×10⁻³, dotted)", color="0.4")
        ax2.tick_params(colors="0.4")
        ax2.spines["right"].set_visible(True)
        ax2.set_ylim(0, max(v for _, v in lr) * 1e3 * 1.6)
    ax.legend(loc="upper right", frameon=False)
    return _save(fig, path)


def experiments(size_runs: list[dict[str, Any]], ablation_runs: list[dict[str, Any]], scaling: dict[str, Any],
                path: Path) -> Path:
    """Three panels: (a) train loss of the model sizes at one compute budget against tokens, (b) the
    same for the ablations, (c) dev bits/byte against the share of the training text, with the fit."""
    fig, axes = plt.subplots(1, 3, figsize=(FULL_WIDTH, 1.95), layout="constrained")
    for ax, runs, title in ((axes[0], size_runs, "(a) model size, 8 min each"),
                            (axes[1], ablation_runs, "(b) ablations of s6, 8 min each")):
        for r in runs:
            tokens = r["train"]["batch_size"] * r["model"]["context"] / 1e6
            ax.plot([s * tokens for s, _ in r["curve"]], [v for _, v in r["curve"]],
                    label=f"{r['name']}: {r['label']}, dev {r['best_dev_bpb']:.3f} b/B")
        ax.set_xlabel("tokens seen (millions)")
        ax.set_ylabel("train loss (nats / token)")
        ax.set_ylim(3.0, 7.0)
        ax.set_title(title, loc="left")
        ax.grid(alpha=0.25, lw=0.4)
        ax.legend(frameon=False, loc="upper right" if runs is size_runs else "center right", handlelength=1.2)
    ax = axes[2]
    f = [p["fraction"] for p in scaling["points"]]
    ax.plot(f, [p["dev_bpb"] for p in scaling["points"]], "o", color="#d62728", ms=3.5, label="dev (measured)")
    tests = [(p["fraction"], p["test_bpb"]) for p in scaling["points"] if p.get("test_bpb") is not None]
    if tests:
        ax.plot(*zip(*tests, strict=True), "^", color="#2ca02c", ms=3.5, label="test (measured)")
    if scaling.get("fit"):
        import numpy as np

        e, a, alpha = scaling["fit"]["E"], scaling["fit"]["A"], scaling["fit"]["alpha"]
        xs = np.geomspace(min(f), 10.0, 100)
        ax.plot(xs, e + a * xs**-alpha, color="0.3", lw=0.8,
                label="fit (dashed: projection)")
        ax.plot(xs[xs > 1], (e + a * xs**-alpha)[xs > 1], color="white", lw=0.8, ls=(0, (3, 3)))
    values = [p["dev_bpb"] for p in scaling["points"]] + [t for _, t in tests]
    low, high = min(values), max(values)
    ax.set_ylim(low - 0.1 * (high - low), high + 0.9 * (high - low))  # room for the legend above the points
    ax.set_xscale("log")
    ax.set_xticks([0.125, 0.25, 0.5, 1, 4, 10], ["⅛", "¼", "½", "1", "4", "10"])
    ax.set_xlabel("share f of the training stories (log)")
    ax.set_ylabel("bits / byte")
    ax.set_title("(c) data scaling, s6, 8 min each", loc="left")
    ax.grid(alpha=0.25, lw=0.4)
    ax.legend(frameon=False, loc="upper right")
    return _save(fig, path)


def attention(maps: list[dict[str, Any]], tokens: list[str], path: Path) -> Path:
    """Rows: layers; columns: heads; each panel P_h[i, j] (query i down, key j across)."""
    import numpy as np

    n_rows, n_heads = len(maps), len(maps[0]["probs"])
    t = len(tokens)
    fig, axes = plt.subplots(n_rows, n_heads, figsize=(FULL_WIDTH, 1.2 * n_rows + 0.45), layout="constrained",
                             squeeze=False)
    for r, layer in enumerate(maps):
        for h in range(n_heads):
            ax = axes[r][h]
            probs = np.asarray(layer["probs"][h])
            ax.imshow(np.where(np.tril(np.ones((t, t), bool)), probs, np.nan), cmap="viridis", vmin=0, vmax=1,
                      interpolation="nearest")
            s = layer["head_stats"][h]
            ax.set_title(f"layer {layer['layer'] + 1}, head {h + 1}: prev {s['previous']:.2f}", fontsize=6)
            ax.set_xticks(range(t))
            ax.set_yticks(range(t))
            ax.set_xticklabels(tokens if r == n_rows - 1 else [], rotation=90, fontsize=5.2)
            ax.set_yticklabels(tokens if h == 0 else [], fontsize=5.2)
            ax.tick_params(length=0, pad=1)
            for spine in ax.spines.values():
                spine.set_visible(False)
    return _save(fig, path)


def crop(source: Path, box: tuple[float, float, float, float], path: Path) -> Path:
    """The region (left, top, right, bottom; fractions of the width and height) of a screenshot, pixels unchanged."""
    import matplotlib.image as mpimg

    img = mpimg.imread(source)
    h, w = img.shape[:2]
    left, top, right, bottom = box
    path.parent.mkdir(parents=True, exist_ok=True)
    mpimg.imsave(path, img[round(top * h): round(bottom * h), round(left * w): round(right * w)])
    return path
