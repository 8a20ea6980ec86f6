"""Train a tfgpt GPT on TinyStories with `model.fit` (a thin command line over `tfgpt.training.train`).

Examples:
    python train_keras.py --preset cpu-small --data ../shared/data/tinystories --epochs 5
    python train_keras.py --preset tiny --data stories.txt --max-steps 200 --run-name smoke
    python train_keras.py --config runs/smoke/config.json            # replay a run's settings
    python train_keras.py --resume smoke                             # continue runs/smoke

Rerunning the same command continues the run from its last backup (also after kill -9): the run
directory is runs/<run-name> (default: <preset>-<hash of the settings>). --time-budget stops cleanly,
backs up and finishes the run (metrics, best model, SavedModel); rerun to train on.

Exit status: 0 done, 1 training failed (e.g. the loss diverged), 2 bad input (one `error:` line).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

PRECISION_CHOICES = ("auto", "float32", "mixed_bfloat16", "mixed_float16")  # = tfgpt.training.PRECISIONS
STRATEGY_CHOICES = ("auto", "default", "mirrored", "multiworker", "tpu")  # = tfgpt.training.STRATEGIES
#: = tfgpt.training.RUN_CONTROL_FIELDS (settings that may differ when a run is resumed).
RUN_CONTROL_FIELDS = frozenset(
    {"time_budget", "run_name", "logdir", "out", "verbose", "log_every", "backup_every", "cache_dir", "export"}
)
_DATA_SUFFIXES = (".txt", ".xz", ".gz", ".jsonl", ".json", ".parquet", ".arrow")


class UsageError(ValueError):
    """Bad command-line input (reported as one `error:` line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        self.exit(2, f"error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_duration(text: str) -> float:
    """Seconds in '3600', '90s', '45m', '2h', '1h30m' or '1.5h'."""
    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise argparse.ArgumentTypeError(f"expected a duration such as 3600, 90m, 2h or 1h30m, got {text!r}")
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return seconds


def _verbose(text: str) -> int | str:
    if text == "auto":
        return text
    if text in ("0", "1", "2"):
        return int(text)
    raise argparse.ArgumentTypeError(f"expected 0, 1, 2 or auto, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python train_keras.py",
        description=__doc__.split("\n\n")[0],
        epilog="Settings not given come from --config/--resume, else the defaults shown.",
    )
    a = p.add_argument_group("model and data")
    a.add_argument("--preset", help="model preset: tiny, cpu-small, bench-6m, gpt2-small (vocab size comes from "
                   "the tokenizer) [default: cpu-small]")
    a.add_argument("--data", help="story source: HF dataset id, a local dataset dir, a directory of text files "
                   "(files named *valid* are the validation split) or a .txt/.txt.xz/.jsonl/.parquet file "
                   "[default: roneneldan/TinyStories]")
    a.add_argument("--val-data", help="separate validation source [default: the validation split of --data]")
    a.add_argument("--val-fraction", type=float, help="held-out fraction when --data has no validation split "
                   "[default: 0.05]")
    a.add_argument("--tokenizer", help="directory holding tokenizer.model (or the .model file) [default: tokenizer]")
    a.add_argument("--context", type=_positive_int, help="T, tokens per training window (<= the preset's context) "
                   "[default: the preset's]")
    a.add_argument("--dropout", type=float, help="dropout rate [default: the preset's]")
    a.add_argument("--cache-dir", help="token cache directory [default: .cache/tokens]")

    t = p.add_argument_group("optimisation")
    t.add_argument("--epochs", type=_positive_int, help="passes over the training tokens [default: 5]")
    t.add_argument("--max-steps", type=_positive_int, help="stop after this many optimizer steps in total; the "
                   "learning-rate schedule ends there [default: epochs x steps per epoch]")
    t.add_argument("--time-budget", type=parse_duration, help="wall-clock budget for this invocation (3600, 90m, "
                   "2h, 1h30m): when spent, stop cleanly, back up and finish the run; rerun to continue")
    t.add_argument("--patience", type=_positive_int, help="stop when the validation loss has not improved for "
                   "this many epochs (convergence) [default: off]")
    t.add_argument("--batch-size", type=_positive_int, help="B, global batch size (split over replicas) "
                   "[default: 32]")
    t.add_argument("--lr", type=float, help="peak learning rate [default: 1e-3]")
    t.add_argument("--warmup", type=_non_negative_int, help="linear warm-up steps, then cosine decay to "
                   "--min-lr-ratio x peak at the last step [default: 100]")
    t.add_argument("--min-lr-ratio", type=float, help="final learning rate / peak [default: 0.1]")
    t.add_argument("--weight-decay", type=float, help="AdamW decoupled weight decay on weight matrices (not "
                   "LayerNorm, biases, embeddings) [default: 0.1]")
    t.add_argument("--beta1", type=float, help="Adam beta1 [default: 0.9]")
    t.add_argument("--beta2", type=float, help="Adam beta2 [default: 0.95]")
    t.add_argument("--clipnorm", type=float, help="global gradient-norm clip [default: 1.0]")
    t.add_argument("--seed", type=_non_negative_int, help="seed of initialisation, data order and dropout "
                   "[default: 1337]")

    d = p.add_argument_group("hardware")
    d.add_argument("--precision", choices=PRECISION_CHOICES, help="Keras dtype policy; auto = mixed_bfloat16 on "
                   "TPU/Ampere+ GPUs, mixed_float16 on older GPUs (with loss scaling), the fastest measured "
                   "setting on CPU [default: auto]")
    d.add_argument("--xla", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the train step with XLA (model.compile(jit_compile=...)) [default: auto: on for "
                   "GPU/TPU, the fastest measured setting on CPU]")
    d.add_argument("--strategy", choices=STRATEGY_CHOICES, help="tf.distribute strategy: auto (TPU if present, "
                   "mirrored over >1 GPU, else default), default (one device), mirrored (all local GPUs), "
                   "multiworker (reads TF_CONFIG), tpu (TPUStrategy; TPU_NAME) [default: auto]")

    r = p.add_argument_group("run directory and logging")
    r.add_argument("--run-name", help="run directory runs/<run-name> and logs logs/<run-name> [default: "
                   "<preset>-<hash of the settings>, so the same command finds the same run]")
    r.add_argument("--out", help="directory of run directories [default: runs]")
    r.add_argument("--logdir", help="TensorBoard root directory [default: logs]")
    r.add_argument("--config", metavar="CONFIG_JSON", help="replay the settings of a run's config.json "
                   "(flags given here override them)")
    r.add_argument("--resume", nargs="?", const="", metavar="RUN", help="continue a run (name under --out, or "
                   "its directory) from its last backup; flags given must match its settings. Without RUN: the "
                   "run this command names. (Rerunning the same command also resumes.)")
    r.add_argument("--log-every", type=_positive_int, help="steps between TensorBoard train scalars and NaN "
                   "checks [default: 20]")
    r.add_argument("--backup-every", type=_positive_int, help="steps between resumable backups (also at each "
                   "epoch end) [default: 200]")
    r.add_argument("--val-steps", type=_positive_int, help="validation batches per evaluation [default: all]")
    r.add_argument("--sample-tokens", type=_non_negative_int, help="tokens per sampled story logged to "
                   "TensorBoard each epoch (0 = none) [default: 128]")
    r.add_argument("--verbose", type=_verbose, help="Keras progress bar: 0 silent, 1 bar, 2 one line per epoch "
                   "[default: auto]")
    r.add_argument("--no-export", dest="export", action="store_false", default=None,
                   help="do not export runs/<run>/saved_model at the end")
    return p


def _looks_like_path(source: str) -> bool:
    """A quick pre-check (tfgpt.data resolves sources fully): strings that cannot be a HF dataset id."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or source.lower().endswith(_DATA_SUFFIXES)


def _light_presets() -> dict[str, Any]:
    """tfgpt.config.PRESETS, read without importing the tfgpt package: its __init__ imports TensorFlow
    (seconds, and log lines on stderr that cannot be silenced), which bad input should not wait for."""
    name = "_tfgpt_config_for_cli"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "tfgpt" / "config.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].PRESETS


def _read_config(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"{what}: {path} does not exist; pass a run's config.json")
    try:
        train = json.loads(path.read_text()).get("train")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        train = None
    if not isinstance(train, dict):
        raise UsageError(f"{what}: {path} is not a tfgpt run config (no 'train' section)")
    return dict(train)


def resolve_settings(args: argparse.Namespace) -> tuple[dict[str, Any], bool | None]:
    """(TrainConfig fields, resume flag) from the flags, --config and --resume, checked without TensorFlow."""
    explicit = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "resume")}
    values: dict[str, Any] = {}
    resume: bool | None = None
    if args.config:
        values.update(_read_config(Path(args.config), "--config"))
    if args.resume is not None:
        resume = True
        if args.resume:  # a run name or directory
            candidate = Path(args.resume)
            run_dir = candidate if (candidate / "config.json").is_file() else Path(
                explicit.get("out", values.get("out", "runs"))) / args.resume
            if not (run_dir / "config.json").is_file():
                raise UsageError(f"--resume {args.resume}: no run at {run_dir} (no config.json); pass a run name "
                                 "under --out or a run directory")
            saved = _read_config(run_dir / "config.json", f"--resume {args.resume}")
            ignore = RUN_CONTROL_FIELDS
            diffs = [f"--{k.replace('_', '-')} {v!r} (the run has {saved.get(k)!r})"
                     for k, v in explicit.items() if k not in ignore and k in saved and saved[k] != v]
            if diffs:
                raise UsageError(f"--resume {args.resume}: {'; '.join(diffs)}; drop these flags to continue the "
                                 "run, or start a new one with another --run-name")
            values.update(saved)
            values.update(run_name=run_dir.name, out=str(run_dir.parent))
    values.update(explicit)
    # Fast checks of the preset and paths (tfgpt.training and tfgpt.data check again, in depth).
    presets = _light_presets()
    preset = values.get("preset", "cpu-small")
    if preset not in presets:
        raise UsageError(f"unknown preset {preset!r}; known presets: {', '.join(presets)}")
    context = values.get("context")
    if context is not None and context > presets[preset].context:
        raise UsageError(f"--context {context} is larger than preset {preset!r} allows ({presets[preset].context} "
                         f"positions); use --context <= {presets[preset].context}")
    tokenizer = Path(values.get("tokenizer", "tokenizer"))
    if not (tokenizer / "tokenizer.model").is_file() and not (tokenizer.is_file()):
        raise UsageError(f"no tokenizer at {tokenizer}; pass --tokenizer DIR (holding tokenizer.model) or train one "
                         "with `python -m tfgpt.tokenizer train --data SOURCE --out DIR`")
    for key in ("data", "val_data"):
        source = values.get(key)
        if source and _looks_like_path(source) and not Path(source).expanduser().exists():
            raise UsageError(f"--{key.replace('_', '-')} path {source} does not exist; pass an existing file or "
                             "directory, or a Hugging Face dataset id such as roneneldan/TinyStories")
    return values, resume


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        values, resume = resolve_settings(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfgpt.config import ConfigError
    from tfgpt.data import DataError
    from tfgpt.tokenizer import TokenizerError
    from tfgpt.training import TrainConfig, TrainingError, train

    try:
        cfg = TrainConfig.from_dict(values)
        train(cfg, resume=resume)
    except (ConfigError, DataError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue from the last backup", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
