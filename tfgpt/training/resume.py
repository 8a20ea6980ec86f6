"""Which run a training job continues, and whether it may: the backup of the same settings, a finished run
(nothing to do), a tokenizer that changed since the run started (refused).

The files themselves (backups, config.json, the pinned tokenizer) are `tfgpt.runs`; this module adds what
only training knows: the settings (`TrainConfig`) a run was made with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tfgpt.runs import (
    PINNED_TOKENIZER,
    RunError,
    RunState,
    backup_path,
    read_backup_meta,
    read_run_config,
    recorded_tokenizer_hash,
)
from tfgpt.tokenizer import Tokenizer
from tfgpt.training.config import TrainConfig, TrainConfigError, config_differences


def find_run(cfg: TrainConfig, resume: bool | None) -> Path | None:
    """The backup to continue the run of `cfg` (a TrainConfig) from, or None for a new run.

    `resume`: None continues runs/<run>/ when it holds a backup made with the same settings (a rerun of the
    same command), True requires such a backup, False refuses an existing one. Raises TrainConfigError.
    """
    run_dir = cfg.run_dir
    config_path = run_dir / "config.json"
    backup = backup_path(run_dir)
    if not backup.is_file():
        if resume:
            raise TrainConfigError(
                f"--resume: {run_dir} has no backup to resume from ({backup} is missing); start it without --resume"
            )
        return None
    if resume is False:
        raise TrainConfigError(f"{run_dir} already holds a backup; choose another --run-name")
    try:  # a damaged backup or config.json: one line
        same = read_backup_meta(backup).get("identity") == cfg.identity_hash()
        saved = {} if same else (read_run_config(run_dir) or {}).get("train") or {}
    except RunError as exc:
        raise TrainConfigError(str(exc)) from None
    if not same:
        diffs = config_differences(saved, cfg) if saved else ["(config.json missing)"]
        raise TrainConfigError(
            f"{run_dir} holds a run with different settings ({'; '.join(diffs[:4])}); "
            f"rerun with its settings (--config {config_path}) or choose another --run-name"
        )
    return backup


def finished_result(cfg: TrainConfig, backup_file: Path, notify: Callable[[str], None]) -> dict[str, Any] | None:
    """The summary of a run that is already complete (nothing to do), else None."""
    prior = RunState.from_dict(read_backup_meta(backup_file)["state"])
    if not prior.finished:
        return None
    notify(f"{cfg.run_dir} is already complete ({prior.global_step} steps, {prior.status}); nothing to do. "
           "Choose another --run-name to train again.")
    metrics = cfg.run_dir / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.is_file() else {"status": prior.status}


def check_resume_tokenizer(cfg: TrainConfig, tokenizer: Tokenizer) -> None:
    """Refuse to resume a run whose tokenizer (at the configured path) changed since it started: its weights
    belong to the ids of the old one (kept in runs/<run>/tokenizer/)."""
    try:
        trained_with = recorded_tokenizer_hash(cfg.run_dir)
    except RunError as exc:
        raise TrainConfigError(str(exc)) from None
    if trained_with is not None and tokenizer.sha256 != trained_with:
        raise TrainConfigError(
            f"the tokenizer at {cfg.tokenizer} (sha256 {tokenizer.sha256[:12]}) is not the one {cfg.run_dir} was "
            f"trained with (sha256 {trained_with[:12]}); put that one back (a copy is in "
            f"{cfg.run_dir / PINNED_TOKENIZER}) to resume, or start a new run with another --run-name"
        )
