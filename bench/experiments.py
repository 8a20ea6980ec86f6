"""Recipe experiments on the dev split: run one at an equal compute budget, then tabulate and plot them.

    python bench/experiments.py run NAME --minutes 7 [--steps S] -- [train_keras.py flags]
    python bench/experiments.py table          # rewrites the table in runs/EXPERIMENTS.md and the plots

`run` trains `train_keras.py --data data/tinystories --dev-fraction 0.05 --run-name exp-NAME --out runs/exp
--max-steps S <flags>` (no export, no samples) and records the run in `runs/experiments/NAME.json`: the exact
command, its settings, parameters, tokens, epochs, minutes, tokens/s, the dev loss of every evaluation, the dev
bits per byte, and the train-loss curve from TensorBoard (`logs/exp-NAME`). Run directories stay out of git;
the JSON files are enough to rebuild the table.

Equal budgets: unless `--steps` is given, S = minutes x 60 x (predicted tokens/s) / (tokens per step), where
tokens/s = c / (training FLOPs per token) and c is the median FLOP rate of the experiments already recorded
(the bench figure of bench-6m before the first). FLOPs per token (Kaplan et al. 2020; Chinchilla appendix F):
6 (N_matrices + V D) + 6 L T D (causal attention scores and mix, forward and backward). The schedule (warm-up,
cosine to 10 %) then ends at the budget, so no run is cut off at a high learning rate; `--time-budget` is only
a safety stop at 1.5x.

Dev bits per byte = dev loss (nats per token) / ln 2 x tokens / UTF-8 bytes of the dev stories.
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
    from tfgpt.data import token_stream_info
    from tfgpt.tokenizer import Tokenizer

    info = token_stream_info(DATA, Tokenizer.load(tokenizer), "dev", dev_fraction=DEV_FRACTION, progress=False)
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


def table(records: list[dict[str, Any]]) -> str:
    rows = ["| run | what differs | params | tokens | epochs | min | tok/s | best dev bpb (step) | final dev bpb |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        rows.append(f"| {r['name']} | {r['note']} | {r['parameters'] / 1e6:.2f} M | {r['tokens'] / 1e6:.2f} M | "
                    f"{r['epochs']:.2f} | {r['train_minutes']:.1f} | {r['tokens_per_sec']:,.0f} | "
                    f"{r['best_dev_bpb']:.4f} ({r['best_step']}) | {r['final_dev_bpb']:.4f} |")
    return "\n".join(rows)


def make_table(args: argparse.Namespace) -> int:
    records = load_records()
    if not records:
        print(f"error: no experiment records in {RECORDS}; run `python bench/experiments.py run ...` first",
              file=sys.stderr)
        return 2
    text = table(records)
    if EXPERIMENTS_MD.is_file():
        doc = EXPERIMENTS_MD.read_text()
        if TABLE_BEGIN in doc and TABLE_END in doc:
            head, rest = doc.split(TABLE_BEGIN, 1)
            doc = head + TABLE_BEGIN + "\n" + text + "\n" + TABLE_END + rest.split(TABLE_END, 1)[1]
            atomic_write(EXPERIMENTS_MD, doc.encode())
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train one experiment and record it")
    r.add_argument("name")
    r.add_argument("--minutes", type=float, default=7.0, help="compute budget of the run [default: 7]")
    r.add_argument("--steps", type=int, help="optimizer steps (overrides the budget's prediction)")
    r.add_argument("--note", default="", help="what differs from the baseline (the table's column)")
    sub.add_parser("table", help="rewrite the table of runs/EXPERIMENTS.md (and print it)")
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.flags = flags
    return run(args) if args.cmd == "run" else make_table(args)


if __name__ == "__main__":
    sys.exit(main())
