"""Trained runs on disk: where they are and how to load one.

A run directory (`runs/<name>/`, written by `tfgpt.training`) holds `model.keras` (weights of the best
validation epoch), `config.json` (every setting, the tokenizer path, the model config), `metrics.json`
and, once exported, `saved_model/`. `load_model(run_dir)` gives back (model, tokenizer); `generate.py`,
`evaluate.py`, `python -m tfgpt.export` and the report load runs through it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tfgpt.common import REPO_ROOT, SHIPPED_RUN

#: The model `generate.py` and `evaluate.py` use when no --model is given (a run directory).
DEFAULT_MODEL = REPO_ROOT / SHIPPED_RUN


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
    if tokenizer_path is None:
        tokenizer_path = _tokenizer_from_run(run_dir)
    try:
        tokenizer = Tokenizer.load(tokenizer_path)
    except TokenizerError as exc:
        raise RunError(f"{exc} (pass the tokenizer with --tokenizer)") from None
    try:
        model = keras.saving.load_model(model_file, compile=False)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise RunError(f"cannot load {model_file}: {str(exc).splitlines()[0]}") from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise RunError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but the model only "
            f"{model.config.vocab_size}; pass the tokenizer the model was trained with"
        )
    return model, tokenizer


def _tokenizer_from_run(run_dir: Path) -> Path:
    """The tokenizer named by run_dir/config.json (keys "tokenizer", "tokenizer_path", "tokenizer_dir",
    at the top level or under "data"/"train"), resolved against run_dir, the working directory, then
    the repository root (training writes paths relative to where it ran); else run_dir/tokenizer."""
    config_file = run_dir / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for section in (config, config.get("data") or {}, config.get("train") or {}):
            for key in ("tokenizer", "tokenizer_path", "tokenizer_dir"):
                value = section.get(key) if isinstance(section, dict) else None
                if isinstance(value, str) and value:
                    for candidate in (run_dir / value, Path(value), REPO_ROOT / value):
                        if candidate.exists():
                            return candidate
                    return Path(value)
    return run_dir / "tokenizer"
