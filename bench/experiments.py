"""Recipe experiments on the dev split: run one at an equal compute budget, then tabulate and plot them.

    python bench/experiments.py run NAME --minutes 7 [--steps S] -- [train_keras.py flags]
    python bench/experiments.py test NAME...   # scores finished runs once on the test set (evaluate.py)
    python bench/experiments.py table          # rewrites the table in runs/EXPERIMENTS.md and the plots

`run` trains `train_keras.py --data data/tinystories --dev-fraction 0.05 --run-name exp-NAME --out runs/exp
--max-steps S --epochs 1000 <flags>` (no export, no samples) and records the run in `runs/experiments/NAME.json`: the exact
command, its settings, parameters, tokens, epochs, minutes, tokens/s, the dev loss of every evaluation, the dev
bits per byte, and the train-loss curve from TensorBoard (`logs/exp-NAME`). Run directories stay out of git;
the JSON files are enough to rebuild the table.

Equal budgets: unless `--steps` is given, S = minutes x 60 x (predicted tokens/s) / (tokens per step), where
tokens/s = c / (training FLOPs per token) and c is the median FLOP rate of the experiments already recorded
(the bench figure of bench-6m before the first). FLOPs per token (Kaplan et al. 2020; Chinchilla appendix F):
6 (N_matrices + V D) + 6 L T D (causal attention scores and mix, forward and backward). The schedule (warm-up,
cosine to 10 %) then ends at the budget, so no run is cut off at a high learning rate; `--time-budget` is only
a safety stop at 1.5x.

Dev bits per byte = dev loss (nats per token) / ln 2 x tokens / UTF-8 bytes of the dev stories (non-overlapping
T-token windows, as `model.fit` validates). Test bits per byte is `evaluate.py` on the 589 validation stories
(sliding windows, stride T/2; V1 stories only, so not the dev split's mix: compare test with test only).

`table` also draws `runs/experiments/dev_curves.png` (dev bits/byte against tokens seen, each run's train curve
beside it) and `runs/experiments/data_scaling.png` (the runs named in DATA_SCALING against their share of the
training stories, with the fitted power law bpb(f) = E + A f^-alpha).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfgpt.common import atomic_write  # noqa: E402

RECORDS = ROOT / "runs" / "experiments"
EXPERIMENTS_MD = ROOT / "runs" / "EXPERIMENTS.md"
DATA = "data/tinystories"
DEV_FRACTION = 0.05
#: bench/RESULTS.md, 2026-12-01: bench-6m (D 256, L 6, T 256, V 4096) trains at 6,255 tokens/s, bf16.
REFERENCE_FLOP_RATE = 6255 * 6.0 * (6 * 12 * 256**2 + 4096 * 256 + 6 * 256 * 256)
TABLE_BEGIN, TABLE_END = "<!-- table: bench/experiments.py table -->", "<!-- end of table -->"
FIT_BEGIN, FIT_END = "<!-- fit: bench/experiments.py table -->", "<!-- end of fit -->"
#: --epochs of every run: high enough that --max-steps (the budget) always decides where a run ends (the default
#: 5 epochs stopped the 12.5 % runs of 2026-12-03 at 310 of their 350 steps).
EPOCH_CAP = 1000
#: The data-scaling group: the same recipe and compute on 12.5 %, 25 %, 50 % and 100 % of the training stories.
DATA_SCALING = ("s6-f12-do1", "s6-f25", "s6-f50", "s6")
#: The table's groups, in order (runs in no group come last, by name).
GROUPS = {
    "size": ("s3", "s6", "s12"), "lr": ("s6-lr2e-3", "s12-lr2e-3"), "2x budget": ("s6-2x", "s12-2x"),
    "repeated data, dropout": ("s6-f12-do1", "s6-f12-do2"), "data scaling": ("s6-f25", "s6-f50"),
    "ablation": ("s6-post", "s6-sin"), "gpt2-small": ("gpt2-small", "gpt2-small-curve"),
}


def ordered(records: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(group, record) pairs in the order of GROUPS."""
    place = {name: (i, j, group) for i, (group, names) in enumerate(GROUPS.items()) for j, name in enumerate(names)}
    keyed = sorted(records, key=lambda r: (*place.get(r["name"], (len(GROUPS), 0, ""))[:2], r["name"]))
    return [(place.get(r["name"], (0, 0, "other"))[2], r) for r in keyed]


def flops_per_token(model: dict[str, Any]) -> float:
    """Training FLOPs per token of a GPTConfig dict: 6 (N_matrices + V D) + 6 L T D."""
    D, L, T, V = model["d_model"], model["n_layers"], model["context"], model["vocab_size"]
    F = model.get("d_ff") or 4 * D
    return 6.0 * (L * (4 * D * D + 2 * D * F) + V * D) + 6.0 * L * T * D


def model_settings(flags: list[str]) -> dict[str, Any]:
    """The GPTConfig these train_keras.py flags give (vocab from the tokenizer), without TensorFlow."""
    sys.argv = ["train_keras.py", *flags]
    import train_keras
    from tfgpt.tokenizer import Tokenizer
    from tfgpt.training.config import settings_from_flags

    args = train_keras.build_parser().parse_args(flags)
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "resume")}
    cfg, _ = settings_from_flags({"data": DATA, "dev_fraction": DEV_FRACTION, **given})
    vocab = Tokenizer.load(cfg.tokenizer).vocab_size
    return {**vars(cfg.model_config(vocab)), "batch_size": cfg.batch_size}


def flop_rate() -> tuple[float, str]:
    rates = [r["flops_per_token"] * r["tokens_per_sec"] for r in load_records() if r.get("tokens_per_sec")]
    if not rates:
        return REFERENCE_FLOP_RATE, "bench/RESULTS.md (bench-6m, 6,255 tokens/s)"
    return statistics.median(rates), f"median of {len(rates)} recorded experiment(s)"


def load_records() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(RECORDS.glob("*.json"))]


def train_curve(log_dir: Path) -> list[list[float]]:
    """[step, train loss] pairs of the run's TensorBoard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    if "train/loss" not in acc.Tags().get("tensors", []):
        return []
    import numpy as np

    return [[int(e.step), round(float(np.asarray(_tensor_value(e.tensor_proto))), 4)] for e in acc.Tensors("train/loss")]


def _tensor_value(proto: Any) -> Any:
    from tensorboard.util import tensor_util

    return tensor_util.make_ndarray(proto)


def dev_text_size(tokenizer: str) -> tuple[int, int]:
    """(tokens, UTF-8 bytes) of the dev split (from the token cache)."""
    from tfgpt.data import token_stream
    from tfgpt.tokenizer import Tokenizer

    info = token_stream(DATA, Tokenizer.load(tokenizer), "dev", dev_fraction=DEV_FRACTION, progress=False, with_info=True)[1]
    return int(info["tokens"]), int(info["bytes"])


def run(args: argparse.Namespace) -> int:
    flags = list(args.flags)
    model = model_settings(flags)
    tokens_per_step = model["batch_size"] * model["context"]
    fpt = flops_per_token(model)
    rate, rate_source = flop_rate()
    steps = args.steps or max(20, round(args.minutes * 60 * rate / fpt / tokens_per_step))
    run_name = f"exp-{args.name}"
    command = [sys.executable, "train_keras.py", "--data", DATA, "--dev-fraction", str(DEV_FRACTION),
               "--run-name", run_name, "--out", "runs/exp", "--logdir", "logs", "--max-steps", str(steps),
               "--epochs", str(EPOCH_CAP),
               "--time-budget", f"{math.ceil(args.minutes * 90)}", "--no-export", "--sample-tokens", "0",
               "--verbose", "2", *flags]
    shown = " ".join(shlex.quote(c) for c in ["python", *command[1:]])
    print(f"experiment {args.name}: {steps} steps ({args.minutes:g} min at {rate / fpt:,.0f} predicted tokens/s, "
          f"FLOP rate from {rate_source})\n  {shown}", flush=True)
    start = time.time()
    rc = subprocess.call(command, cwd=ROOT)
    minutes = (time.time() - start) / 60
    if rc != 0:
        print(f"experiment {args.name}: train_keras.py exited with {rc}", file=sys.stderr)
        return rc
    run_dir = ROOT / "runs" / "exp" / run_name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    dev_tokens, dev_bytes = dev_text_size(config["train"]["tokenizer"])
    to_bpb = dev_tokens / dev_bytes / math.log(2)
    evals = [{"epoch": e["epoch"], "step": e["step"], "tokens": e["tokens_seen"], "dev_loss": round(e["val_loss"], 5),
              "dev_bpb": round(e["val_loss"] * to_bpb, 5)} for e in metrics["epochs"]]
    best = min(evals, key=lambda e: e["dev_loss"])
    record = {
        "name": args.name, "note": args.note, "command": shown, "minutes_budget": args.minutes,
        "train": config["train"], "model": config["model"], "parameters": config["resolved"]["parameters"],
        "flops_per_token": fpt, "steps": metrics["global_step"], "tokens": metrics["tokens_seen"],
        "train_tokens_per_epoch": metrics["steps_per_epoch"] * tokens_per_step,
        "epochs": round(metrics["tokens_seen"] / (metrics["steps_per_epoch"] * tokens_per_step), 3),
        "minutes": round(minutes, 2), "train_minutes": round(metrics["wall_time_s"] / 60, 2),
        "tokens_per_sec": metrics["tokens_per_sec"], "status": metrics["status"],
        "dev_tokens": dev_tokens, "dev_bytes": dev_bytes, "evals": evals,
        "best_dev_bpb": best["dev_bpb"], "best_step": best["step"], "final_dev_bpb": evals[-1]["dev_bpb"],
        "final_train_loss": metrics["final_train_loss"], "curve": train_curve(ROOT / "logs" / run_name),
    }
    RECORDS.mkdir(parents=True, exist_ok=True)
    atomic_write(RECORDS / f"{args.name}.json", (json.dumps(record, indent=1) + "\n").encode())
    print(f"experiment {args.name}: dev {record['final_dev_bpb']:.4f} bits/byte after {record['tokens']:,} tokens "
          f"({record['epochs']:.2f} epochs, {record['minutes']:.1f} min, {record['tokens_per_sec']:,.0f} tokens/s)")
    return 0


def test_score(args: argparse.Namespace) -> int:
    """Score each named finished run once on the test set (the validation split) and record it."""
    for name in args.names:
        path = RECORDS / f"{name}.json"
        if not path.is_file():
            print(f"error: no record {path}; run `python bench/experiments.py run {name} ...` first", file=sys.stderr)
            return 2
        out = ROOT / "runs" / "exp" / f"exp-{name}" / "test.json"
        command = [sys.executable, "evaluate.py", "--model", f"runs/exp/exp-{name}", "--data", DATA,
                   "--samples", "0", "--no-progress", "--json", str(out.relative_to(ROOT))]
        rc = subprocess.call(command, cwd=ROOT)
        if rc != 0:
            return rc
        result = json.loads(out.read_text())
        record = json.loads(path.read_text())
        record["test_bpb"] = round(result["bits_per_byte"], 5)
        record["test_command"] = " ".join(shlex.quote(c) for c in ["python", *command[1:]])
        atomic_write(path, (json.dumps(record, indent=1) + "\n").encode())
        print(f"experiment {name}: test {record['test_bpb']:.4f} bits/byte")
    return 0


def fit_power_law(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least-squares fit of y = E + A x^-alpha: (E, A, alpha).

    For each alpha on a fine grid the best (E, A) is a linear least-squares problem; the alpha with the smallest
    residual wins. Needs at least three points with distinct x.
    """
    import numpy as np

    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.size < 3 or np.unique(xs).size < 3:
        raise ValueError("a power-law fit needs at least three distinct x values")
    best: tuple[float, float, float, float] | None = None
    for alpha in np.linspace(0.01, 3.0, 2991):
        design = np.stack([np.ones_like(xs), xs**-alpha], axis=1)
        (e, a), *_ = np.linalg.lstsq(design, ys, rcond=None)
        err = float(np.sum((design @ np.array([e, a]) - ys) ** 2))
        if best is None or err < best[0]:
            best = (err, float(e), float(a), float(alpha))
    assert best is not None
    return best[1], best[2], best[3]


def data_scaling(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], tuple[float, float, float] | None]:
    """The data-scaling group's records (by train fraction) and its fit, if there are three or more."""
    by_name = {r["name"]: r for r in records}
    group = sorted((by_name[n] for n in DATA_SCALING if n in by_name), key=lambda r: r["train"]["train_fraction"])
    if len(group) < 3:
        return group, None
    return group, fit_power_law([r["train"]["train_fraction"] for r in group], [r["best_dev_bpb"] for r in group])


def fit_text(group: list[dict[str, Any]], fit: tuple[float, float, float] | None) -> str:
    if fit is None:
        return "(the data-scaling group has fewer than three finished runs)"
    e, a, alpha = fit
    lines = [f"Fit over {', '.join(r['name'] for r in group)} (best dev bits/byte against f, the share of the "
             f"training stories): bpb(f) = {e:.4f} + {a:.4f} f^-{alpha:.3f}.",
             "", "| share of the text f | measured dev bpb | fitted | test bpb |", "|---:|---:|---:|---:|"]
    for r in group:
        f = r["train"]["train_fraction"]
        test = f"{r['test_bpb']:.4f}" if "test_bpb" in r else "-"
        lines.append(f"| {f:g} | {r['best_dev_bpb']:.4f} | {e + a * f**-alpha:.4f} | {test} |")
    for f in (4.0, 10.0):
        lines.append(f"| {f:g} (projection) | - | {e + a * f**-alpha:.4f} | - |")
    return "\n".join(lines)


def plots(records: list[dict[str, Any]], group: list[dict[str, Any]], fit: tuple[float, float, float] | None,
          out_dir: Path) -> list[Path]:
    """dev_curves.png (the T=256 runs), gpt2_small.png (larger runs with a train curve) and, with a fit,
    data_scaling.png under out_dir; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    small = [r for r in records if r["model"]["context"] == 256 and r["parameters"] < 50e6]
    big = [r for r in records if r not in small]
    if small:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), dpi=120, sharey=True)
        for i, r in enumerate(small):
            color, to_bpb = f"C{i % 10}", r["dev_tokens"] / r["dev_bytes"] / math.log(2)
            tokens_per_step = r["tokens"] / max(r["steps"], 1)
            minutes_per_step = r["train_minutes"] / max(r["steps"], 1)
            for ax, per_step, scale in ((axes[0], tokens_per_step, 1e6), (axes[1], minutes_per_step, 1)):
                if r["curve"]:
                    ax.plot([s * per_step / scale for s, _ in r["curve"]], [v * to_bpb for _, v in r["curve"]],
                            color=color, alpha=0.3, linewidth=1)
                ax.plot([e["step"] * per_step / scale for e in r["evals"]], [e["dev_bpb"] for e in r["evals"]],
                        "o-", color=color, markersize=4, label=f"{r['name']} ({r['parameters'] / 1e6:.1f} M)")
        axes[0].set_xlabel("tokens seen (millions)")
        axes[1].set_xlabel("training minutes (2 CPU cores)")
        axes[0].set_ylabel("bits per byte")
        best = min(r["best_dev_bpb"] for r in small)
        axes[0].set_ylim(best - 0.05, best + 0.55)
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, ncol=2)
        fig.suptitle("Dev bits/byte at each epoch end (markers); train loss in bits/byte (faint, running mean)",
                     fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "dev_curves.png"))
        plt.close(fig)
    if any(r["curve"] for r in big):
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
        for i, r in enumerate(r for r in big if r["curve"]):
            to_bpb = r["dev_tokens"] / r["dev_bytes"] / math.log(2)
            ax.plot([s for s, _ in r["curve"]], [v * to_bpb for _, v in r["curve"]], "o-", color=f"C{i}",
                    markersize=3, label=f"{r['name']} train ({r['parameters'] / 1e6:.0f} M, "
                                        f"{r['tokens_per_sec']:,.0f} tokens/s)")
            ax.plot([e["step"] for e in r["evals"]], [e["dev_bpb"] for e in r["evals"]], "s", color=f"C{i}",
                    label=f"{r['name']} dev")
        ax.set_xlabel("optimizer step (8 x 1024 tokens)")
        ax.set_ylabel("bits per byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "gpt2_small.png"))
        plt.close(fig)
    if fit is not None:
        e, a, alpha = fit
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        fs = [r["train"]["train_fraction"] for r in group]
        ax.plot(fs, [r["best_dev_bpb"] for r in group], "o", color="C0", label="dev (measured)")
        tests = [(r["train"]["train_fraction"], r["test_bpb"]) for r in group if "test_bpb" in r]
        if tests:
            ax.plot([f for f, _ in tests], [b for _, b in tests], "s", color="C1", label="test (measured)")
        grid = [min(fs) * (10 / min(fs)) ** (i / 100) for i in range(101)]
        ax.plot(grid, [e + a * f**-alpha for f in grid], "--", color="C0",
                label=f"fit {e:.3f} + {a:.3f} f^-{alpha:.2f}")
        ax.axvspan(1, 10, color="0.9", zorder=0)
        ax.text(3, ax.get_ylim()[1], "projection", ha="center", va="top", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("share of the 20,634 training stories (same compute)")
        ax.set_ylabel("bits per byte")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "data_scaling.png"))
        plt.close(fig)
    return written


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def table(records: list[dict[str, Any]]) -> str:
    rows = ["| group | run | what differs | params | tokens | epochs | train min | tok/s | best dev bpb (step) "
            "| final dev bpb | test bpb |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for group, r in ordered(records):
        test = f"{r['test_bpb']:.4f}" if "test_bpb" in r else "-"
        rows.append(f"| {group} | {r['name']} | {r['note']} | {r['parameters'] / 1e6:.2f} M | {r['tokens'] / 1e6:.2f} M | "
                    f"{r['epochs']:.2f} | {r['train_minutes']:.1f} | {r['tokens_per_sec']:,.0f} | "
                    f"{r['best_dev_bpb']:.4f} ({r['best_step']}) | {r['final_dev_bpb']:.4f} | {test} |")
    return "\n".join(rows)


def _replace_between(doc: str, begin: str, end: str, text: str) -> str:
    if begin not in doc or end not in doc:
        return doc
    head, rest = doc.split(begin, 1)
    return head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1]


def make_table(args: argparse.Namespace) -> int:
    records = load_records()
    if not records:
        print(f"error: no experiment records in {RECORDS}; run `python bench/experiments.py run ...` first",
              file=sys.stderr)
        return 2
    text = table(records)
    group, fit = data_scaling(records)
    scaling = fit_text(group, fit)
    if EXPERIMENTS_MD.is_file():
        doc = _replace_between(EXPERIMENTS_MD.read_text(), TABLE_BEGIN, TABLE_END, text)
        doc = _replace_between(doc, FIT_BEGIN, FIT_END, scaling)
        atomic_write(EXPERIMENTS_MD, doc.encode())
    written = plots(records, group, fit, RECORDS)
    print(text + "\n\n" + scaling + "\n\nplots: " + ", ".join(str(p.relative_to(ROOT)) for p in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train one experiment and record it")
    r.add_argument("name")
    r.add_argument("--minutes", type=float, default=7.0, help="compute budget of the run [default: 7]")
    r.add_argument("--steps", type=int, help="optimizer steps (overrides the budget's prediction)")
    r.add_argument("--note", default="", help="what differs from the baseline (the table's column)")
    t = sub.add_parser("test", help="score finished runs once on the test set (the 589 validation stories)")
    t.add_argument("names", nargs="+")
    sub.add_parser("table", help="rewrite the table and fit of runs/EXPERIMENTS.md, draw the plots, print them")
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.flags = flags
    return {"run": run, "test": test_score, "table": make_table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
