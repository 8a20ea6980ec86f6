"""Run directories on disk: where a run is, its backups and its config, and how to load a trained one.

A run directory (`runs/<name>/`, written by `tfgpt.training`) holds `config.json` (every setting, the
tokenizer path, the model config), `metrics.json`, `model.keras` (weights of the best validation epoch),
`backup/state.npz` (model + optimizer + `RunState`: what a killed run resumes from) and, once exported,
`saved_model/`. `load_model(run_dir)` gives back (model, tokenizer); `generate.py`, `evaluate.py`,
`python -m tfgpt.export` and the report load runs through it. Which run a training job continues is
`tfgpt.training.resume`'s business: this module knows files, not training settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tfgpt.common import REPO_ROOT, SHIPPED_RUN, atomic_file, atomic_write, write_json

#: The model `generate.py` and `evaluate.py` use when no --model is given (a run directory).
DEFAULT_MODEL = REPO_ROOT / SHIPPED_RUN
#: Where a run keeps its own copy of the tokenizer it was trained with (relative to the run directory).
PINNED_TOKENIZER = "tokenizer"

#: The backup of a run: runs/<run>/backup/state.npz.
BACKUP_FILE = "state.npz"
BACKUP_FORMAT = 2


class RunError(ValueError):
    """A run directory or model file is missing or unusable; the message says which and how to fix it."""


def load_model(path: str | Path, tokenizer_path: str | Path | None = None):
    """Load (model, tokenizer) from a run directory (model.keras + config.json naming the tokenizer) or a
    .keras file (tokenizer from `tokenizer_path`, or the config.json / tokenizer/ beside it).

    Raises RunError with a one-line fix when something is missing.
    """
    import keras

    import tfgpt.model  # noqa: F401  (registers GPT for deserialisation)
    from tfgpt.tokenizer import Tokenizer, TokenizerError

    path = Path(path)
    if not path.exists():
        raise RunError(f"model path {path} does not exist; train a model or pass --model RUN_DIR|FILE.keras")
    run_dir = path if path.is_dir() else path.parent
    model_file = path / "model.keras" if path.is_dir() else path
    if not model_file.is_file():
        raise RunError(f"no model.keras in {path}; pass a run directory or a .keras file")
    explicit_tokenizer = tokenizer_path is not None
    if tokenizer_path is None:
        tokenizer_path = _tokenizer_from_run(run_dir)
    try:
        tokenizer = Tokenizer.load(tokenizer_path)
    except TokenizerError as exc:
        raise RunError(f"{exc} (pass the tokenizer with --tokenizer)") from None
    trained_with = recorded_tokenizer_hash(run_dir)  # a bare .keras is checked against its run's config.json too
    if trained_with is not None and tokenizer.sha256 != trained_with:
        raise RunError(
            f"tokenizer {tokenizer.path} (sha256 {tokenizer.sha256[:12]}) is not the one {run_dir} was trained "
            f"with (sha256 {trained_with[:12]}, recorded in its config.json); pass --tokenizer "
            f"{run_dir / PINNED_TOKENIZER}"
        )
    if trained_with is None and explicit_tokenizer:
        print(f"warning: tokenizer {tokenizer.path} is unverified: no config.json beside {model_file} records the "
              "tokenizer it was trained with", file=sys.stderr)
    import zipfile

    if not zipfile.is_zipfile(model_file):  # Keras would say "File not found" for a file that is there
        size = model_file.stat().st_size
        raise RunError(f"{model_file} is {'empty' if size == 0 else f'damaged ({size:,} bytes, not a zip archive)'}"
                       "; restore it, or retrain the run")
    try:
        model = keras.saving.load_model(model_file, compile=False)
    except (ValueError, OSError, KeyError, EOFError, json.JSONDecodeError, zipfile.BadZipFile) as exc:
        raise RunError(f"cannot load {model_file}: {str(exc).splitlines()[0]}; restore it, or retrain the run") from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise RunError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but the model only "
            f"{model.config.vocab_size}; pass the tokenizer the model was trained with"
        )
    return model, tokenizer


def pin_tokenizer(run_dir: str | Path, tokenizer: Any) -> str:
    """Copy the tokenizer a run trains with into runs/<run>/tokenizer/ (its model, and meta.json when the
    source has one), so that retraining `tokenizer/` can never change what a trained run decodes with.
    Returns the path to record in config.json, relative to the run directory."""
    from tfgpt.tokenizer import META_FILE, MODEL_FILE

    out = Path(run_dir) / PINNED_TOKENIZER
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / MODEL_FILE, tokenizer.model_proto)
    source = Path(tokenizer.path)
    meta = source.parent / META_FILE
    if source.is_file() and meta.is_file():
        atomic_write(out / META_FILE, meta.read_bytes())
    return PINNED_TOKENIZER


def read_run_config(path: str | Path) -> dict[str, Any] | None:
    """A run's config.json as a dict: `path` is the run directory or the config file itself (a `.json` path).
    None when there is none; RunError with one line when it is not JSON or not a JSON object. The one place
    config.json is parsed (loading a run, resuming it, `train_keras.py --config/--resume`)."""
    path = Path(path)
    config_file = path if path.suffix == ".json" or path.is_file() else path / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{config_file} is not valid JSON ({str(exc).splitlines()[0]}); restore it from the run "
                       "or delete it and pass --tokenizer") from None
    if not isinstance(config, dict):
        raise RunError(f"{config_file} is not a tfgpt run config (not a JSON object); restore it or delete it")
    return config


def recorded_tokenizer_hash(run_dir: str | Path) -> str | None:
    """The sha256 of the tokenizer recorded in run_dir/config.json (tokenizer_info), if any."""
    info = (read_run_config(run_dir) or {}).get("tokenizer_info") or {}
    return info.get("sha256") if isinstance(info, dict) else None


def _tokenizer_from_run(run_dir: Path) -> Path:
    """The tokenizer named by run_dir/config.json (keys "tokenizer", "tokenizer_path", "tokenizer_dir",
    at the top level or under "data"/"train"), resolved against run_dir, the working directory, then
    the repository root (training writes paths relative to where it ran); else run_dir/tokenizer."""
    config = read_run_config(run_dir)
    if config is not None:
        for section in (config, config.get("data") or {}, config.get("train") or {}):
            for key in ("tokenizer", "tokenizer_path", "tokenizer_dir"):
                value = section.get(key) if isinstance(section, dict) else None
                if isinstance(value, str) and value:
                    for candidate in (run_dir / value, Path(value), REPO_ROOT / value):
                        if candidate.exists():
                            return candidate
                    return Path(value)
    return run_dir / "tokenizer"


# =========================================================================== run state and backups
@dataclass
class RunState:
    """Where a run stands; saved in every backup."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # 0-based epoch the next step belongs to
    step_in_epoch: int = 0  # steps of `epoch` already done
    best_val_loss: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None  # global step of the best validation loss (model.keras)
    epochs_without_improvement: int = 0
    wall_time: float = 0.0  # seconds spent training, over all invocations
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = "running"  # running | completed | time_budget | early_stopped | diverged
    epoch_loss: list[float] | None = None  # (total, count) of the epoch's running-mean train loss so far
    finished: bool = False  # metrics, best model and export written for the final state
    saved_model: str | None = None  # the exported SavedModel directory

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunState:
        values = dict(values)
        if "loss_tracker" in values:  # backup format 1 named epoch_loss after Keras' loss tracker
            values["epoch_loss"] = values.pop("loss_tracker")
        return cls(**values)


def backup_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "backup" / BACKUP_FILE


def save_backup(path: str | Path, model: Any, state: RunState, identity_hash: str) -> None:
    """Atomically write model variables (weights, dropout RNG states), optimizer variables and the
    run state to one .npz file (`atomic_file`: streamed to a temporary file, synced, renamed into place)."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for i, v in enumerate(model.variables):
        arrays[f"model/{i}"] = np.asarray(v.numpy())
    for i, v in enumerate(model.optimizer.variables):
        arrays[f"optimizer/{i}"] = np.asarray(v.numpy())
    meta = {"state": state.to_dict(), "identity": identity_hash, "format": BACKUP_FORMAT}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        np.savez(f, **arrays)


def read_backup_meta(path: str | Path) -> dict[str, Any]:
    """{"state": RunState fields, "identity": settings hash, "format": n} of a backup."""
    with _reading_backup(path), np.load(path) as z:
        return json.loads(bytes(z["meta"]).decode())


@contextlib.contextmanager
def _reading_backup(path: str | Path) -> Iterator[None]:
    """Turn what a truncated or damaged backup raises (zip, zlib, EOF, a missing or bad meta entry) into one
    RunError line that says what to do."""
    import zipfile
    import zlib

    try:
        yield
    except RunError:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunError(
            f"backup {path} is damaged ({reason}); delete {Path(path).parent} to train the run again from "
            "step 0, or choose another --run-name"
        ) from None


def load_backup(path: str | Path, model: Any) -> RunState:
    """Restore what `save_backup` wrote into a compiled model (optimizer built); returns the state.
    RunError when the backup is damaged or belongs to another configuration."""
    with _reading_backup(path), np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        for prefix, variables in (("model", model.variables), ("optimizer", model.optimizer.variables)):
            n_saved = sum(1 for k in z.files if k.startswith(prefix + "/"))
            if n_saved != len(variables):
                raise RunError(
                    f"backup {path} holds {n_saved} {prefix} variables, this model has {len(variables)}; "
                    "it belongs to another configuration: use another --run-name"
                )
            for i, v in enumerate(variables):
                value = z[f"{prefix}/{i}"]
                if tuple(value.shape) != tuple(v.shape):
                    raise RunError(
                        f"backup {path}: {prefix} variable {v.path} has shape {value.shape}, expected "
                        f"{tuple(v.shape)}; use another --run-name"
                    )
                v.assign(value)
    return RunState.from_dict(meta["state"])


def write_run_file(run_dir: str | Path, name: str, record: dict[str, Any]) -> None:
    """Write runs/<run>/<name> (config.json, metrics.json) atomically, creating the directory."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(run_dir) / name, record)
