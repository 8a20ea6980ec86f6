"""Train a tfgpt GPT on TinyStories with `model.fit` (a thin command line over `tfgpt.training.train`).

Examples:
    python train_keras.py --preset cpu-small --data data/tinystories --epochs 5
    python train_keras.py --preset tiny --data data/tinystories --max-steps 200 --run-name smoke
    python train_keras.py --config runs/smoke/config.json            # replay a run's settings
    python train_keras.py --resume smoke                             # continue runs/smoke

Rerunning the same command continues the run from its last backup (also after kill -9): the run
directory is runs/<run-name> (default: <preset>-<hash of the settings>). --time-budget stops cleanly,
backs up and finishes the run (metrics, best model, SavedModel); rerun to train on.

Exit status: 0 done, 1 training failed (e.g. the loss diverged), 2 bad input (one `error:` line).
"""

from __future__ import annotations

import argparse
import re
import sys

from tfgpt.cli import OneLineParser, non_negative_int_arg, positive_int_arg
from tfgpt.common import BUNDLED_DATA, HF_SOURCE, quiet_tensorflow
from tfgpt.config import NORM_POSITIONS, POSITION_ENCODINGS
from tfgpt.training.config import PRECISIONS, STRATEGIES, TrainConfigError, settings_from_flags


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
    p = OneLineParser(
        prog="python train_keras.py",
        description=__doc__.split("\n\n")[0],
        epilog="Settings not given come from --config/--resume, else the defaults shown.",
    )
    a = p.add_argument_group("model and data")
    a.add_argument("--preset", help="model preset: tiny, cpu-small, bench-6m, gpt2-small (vocab size comes from "
                   "the tokenizer) [default: cpu-small]")
    a.add_argument("--data", help="story source: HF dataset id, a local dataset dir, a directory of text files "
                   "(files named *valid* are the validation split) or a .txt/.txt.xz/.jsonl/.parquet file "
                   f"[default: {HF_SOURCE} (needs internet); offline: --data {BUNDLED_DATA}]")
    a.add_argument("--val-data", help="separate validation source [default: the validation split of --data]")
    a.add_argument("--val-fraction", type=float, help="held-out fraction when --data has no validation split "
                   "[default: 0.05]")
    a.add_argument("--dev-fraction", type=float, help="carve a dev split of this fraction from the train stories "
                   "and validate on it (checkpoint choice, patience), keeping the validation split an untouched "
                   "test set [default: 0 = validate on the validation split]")
    a.add_argument("--tokenizer", help="directory holding tokenizer.model (or the .model file) [default: tokenizer]")
    a.add_argument("--context", type=positive_int_arg, help="T, tokens per training window (<= the preset's "
                   "context) [default: the preset's]")
    a.add_argument("--dropout", type=float, help="dropout rate [default: the preset's]")
    a.add_argument("--d-model", type=positive_int_arg, help="D, width of the residual stream [default: the preset's]")
    a.add_argument("--n-layers", type=positive_int_arg, help="L, decoder blocks [default: the preset's]")
    a.add_argument("--n-heads", type=positive_int_arg, help="H, attention heads (D divisible by H) [default: the "
                   "preset's]")
    a.add_argument("--norm-position", choices=NORM_POSITIONS, help="pre-LN (GPT-2) or post-LN (Vaswani et al.) "
                   "[default: the preset's]")
    a.add_argument("--position-encoding", choices=POSITION_ENCODINGS, help="learned (GPT-2) or sinusoidal "
                   "positions [default: the preset's]")
    a.add_argument("--train-fraction", type=float, help="train on this hash-chosen fraction of the train stories "
                   "(nested subsets, for data-scaling curves) [default: 1]")
    a.add_argument("--cache-dir", help="token cache directory [default: .cache/tokens]")

    t = p.add_argument_group("optimisation")
    t.add_argument("--epochs", type=positive_int_arg, help="passes over the training tokens [default: 5]")
    t.add_argument("--max-steps", type=positive_int_arg, help="stop after this many optimizer steps in total; the "
                   "learning-rate schedule ends there [default: epochs x steps per epoch]")
    t.add_argument("--time-budget", type=parse_duration, help="wall-clock budget for this invocation (3600, 90m, "
                   "2h, 1h30m): when spent, stop cleanly, back up and finish the run; rerun to continue")
    t.add_argument("--patience", type=positive_int_arg, help="stop when the validation loss has not improved for "
                   "this many epochs (convergence) [default: off]")
    t.add_argument("--batch-size", type=positive_int_arg, help="B, global batch size (split over replicas) "
                   "[default: 32]")
    t.add_argument("--lr", type=float, help="peak learning rate [default: 1e-3]")
    t.add_argument("--warmup", type=non_negative_int_arg, help="linear warm-up steps, then cosine decay to "
                   "--min-lr-ratio x peak at the last step [default: 100, or 10%% of a run of < 1000 steps]")
    t.add_argument("--min-lr-ratio", type=float, help="final learning rate / peak [default: 0.1]")
    t.add_argument("--weight-decay", type=float, help="AdamW decoupled weight decay on weight matrices (not "
                   "LayerNorm, biases, embeddings) [default: 0.1]")
    t.add_argument("--beta1", type=float, help="Adam beta1 [default: 0.9]")
    t.add_argument("--beta2", type=float, help="Adam beta2 [default: 0.95]")
    t.add_argument("--clipnorm", type=float, help="global gradient-norm clip [default: 1.0]")
    t.add_argument("--seed", type=non_negative_int_arg, help="seed of initialisation, data order and dropout "
                   "[default: 1337]")

    d = p.add_argument_group("hardware")
    d.add_argument("--precision", choices=PRECISIONS, help="Keras dtype policy; auto = mixed_bfloat16 on "
                   "TPU/Ampere+ GPUs, mixed_float16 on older GPUs (with loss scaling), the fastest measured "
                   "setting on CPU [default: auto]")
    d.add_argument("--xla", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the train step with XLA (model.compile(jit_compile=...)) [default: auto: on for "
                   "GPU/TPU, the fastest measured setting on CPU]")
    d.add_argument("--strategy", choices=STRATEGIES, help="tf.distribute strategy: auto (TPU if present, "
                   "multiworker under TF_CONFIG, mirrored over >1 GPU, else default), default (one device), "
                   "mirrored (all local GPUs), multiworker (reads TF_CONFIG; the same command on every worker), "
                   "tpu (TPUStrategy; TPU_NAME) [default: auto]")

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
    r.add_argument("--log-every", type=positive_int_arg, help="steps between TensorBoard train scalars and NaN "
                   "checks [default: 20]")
    r.add_argument("--backup-every", type=positive_int_arg, help="steps between resumable backups (also at each "
                   "epoch end) [default: 200]")
    r.add_argument("--val-steps", type=positive_int_arg, help="validation batches per evaluation [default: all]")
    r.add_argument("--sample-tokens", type=non_negative_int_arg, help="tokens per sampled story logged to "
                   "TensorBoard each epoch (0 = none) [default: 128]")
    r.add_argument("--verbose", type=_verbose, help="Keras progress bar: 0 silent, 1 bar, 2 one line per epoch "
                   "[default: auto]")
    r.add_argument("--no-export", dest="export", action="store_false", default=None,
                   help="do not export runs/<run>/saved_model at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "resume")}
    try:
        cfg, resume = settings_from_flags(flags, config=args.config, resume=args.resume)
    except TrainConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    default_data = "data" not in flags and not args.config and args.resume is None

    quiet_tensorflow()
    from tfgpt.config import ConfigError
    from tfgpt.data import DataError
    from tfgpt.tokenizer import TokenizerError
    from tfgpt.training import HubUnavailableError, TrainingError, train

    try:
        train(cfg, resume=resume)
    except HubUnavailableError as exc:
        print(f"error: no --data given, and {exc}" if default_data else f"error: {exc}", file=sys.stderr)
        return 2
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
