"""Training: `train(TrainConfig(...))` is what `python train_keras.py` runs: one `model.fit` job that

* builds the model and compiles it inside a `tf.distribute` strategy (default / mirrored /
  multi-worker / TPU), under a Keras precision policy, with or without XLA (`jit_compile`);
* optimises next-token cross-entropy (float32 logits) with AdamW (β₂ = 0.95, decoupled weight decay
  on matrices only, global-norm clipping 1.0 of the all-replica gradient) and a linear-warmup +
  cosine-to-10% schedule;
* logs to TensorBoard (`logs/<run>/`), keeps the best-by-validation `model.keras`, writes
  `config.json` and `metrics.json` under `runs/<run>/`, and exports a SavedModel at the end;
* backs up model + optimizer + position every `backup_every` steps, atomically, so that a killed
  job (even `kill -9`) rerun with the same command continues from the last backup and ends with
  the weights an uninterrupted run would have had (the batch stream is a pure function of
  (seed, epoch, step): `tfgpt.data.make_dataset(first_epoch=e, skip_batches=s)`).

Keras' own `BackupAndRestore` is not used: it restarts an interrupted epoch at batch 0 with the
wrong shuffle order (measured on TF 2.21 / Keras 3.15), so its resumed runs train on different data.

Modules, in the order a run uses them:
  config     TrainConfig, its checks, and how flags / --config / --resume combine (no TensorFlow)
  optim      loss, AdamW (dense, globally clipped gradients), weight-decay exclusion, WarmupCosine
  strategy   tf.distribute strategy, precision, XLA; compile_model (the one model set-up)
  callbacks  RunMonitor, StepTensorBoard, BestModelCheckpoint, StateBackup
  resume     which run a job continues: find_run, a finished run, a changed tokenizer refused
  setup      a run's data (token streams, batches), plan (steps, schedule) and hardware
  job        train(): the steps of a run, each a function
Run directories on disk (backups, RunState, config.json) are `tfgpt.runs`, a floor below this package:
`tfgpt.runs` never imports `tfgpt.training`.

`import tfgpt.training` and `tfgpt.training.config` do not import TensorFlow; the other names load
their module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tfgpt.training.config import (
    DEFAULT_WARMUP,
    PRECISIONS,
    RUN_CONTROL_FIELDS,
    STRATEGIES,
    TrainConfig,
    TrainConfigError,
    TrainingError,
    config_differences,
    settings_from_flags,
)

_LAZY = {
    "optim": ("WarmupCosine", "AdamW", "WholeGradientMixin", "build_optimizer", "next_token_loss",
              "no_decay_variables"),
    "strategy": ("CPU_AUTO_PRECISION", "CPU_AUTO_XLA", "MultiWorkerStrategy", "compile_model", "resolve_strategy",
                 "resolve_precision", "resolve_xla", "strategy_kind", "is_chief", "on_cpu"),
    "callbacks": ("RunMonitor", "StepTensorBoard", "BestModelCheckpoint", "StateBackup"),
    "job": ("train", "fit_plan", "SAMPLE_PROMPTS"),
    "setup": ("HubUnavailableError",),
    "resume": ("find_run",),
}
_WHERE = {name: f"tfgpt.training.{module}" for module, names in _LAZY.items() for name in names}

if TYPE_CHECKING:  # what the lazy names are, for IDEs and type checkers (importing them needs TensorFlow)
    from tfgpt.training.callbacks import BestModelCheckpoint, RunMonitor, StateBackup, StepTensorBoard
    from tfgpt.training.job import SAMPLE_PROMPTS, fit_plan, train
    from tfgpt.training.optim import (
        AdamW,
        WarmupCosine,
        WholeGradientMixin,
        build_optimizer,
        next_token_loss,
        no_decay_variables,
    )
    from tfgpt.training.resume import find_run
    from tfgpt.training.setup import HubUnavailableError
    from tfgpt.training.strategy import (
        CPU_AUTO_PRECISION,
        CPU_AUTO_XLA,
        MultiWorkerStrategy,
        compile_model,
        is_chief,
        on_cpu,
        resolve_precision,
        resolve_strategy,
        resolve_xla,
        strategy_kind,
    )

__all__ = [  # the names of _LAZY are listed too (a test checks they agree)
    "DEFAULT_WARMUP", "PRECISIONS", "RUN_CONTROL_FIELDS", "STRATEGIES", "TrainConfig", "TrainConfigError",
    "TrainingError", "config_differences", "settings_from_flags", "WarmupCosine", "AdamW", "WholeGradientMixin",
    "build_optimizer", "next_token_loss", "no_decay_variables", "CPU_AUTO_PRECISION", "CPU_AUTO_XLA",
    "MultiWorkerStrategy", "compile_model", "resolve_strategy", "resolve_precision", "resolve_xla", "strategy_kind",
    "is_chief", "on_cpu", "RunMonitor", "StepTensorBoard", "BestModelCheckpoint", "StateBackup", "train",
    "fit_plan", "HubUnavailableError", "SAMPLE_PROMPTS", "find_run",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'tfgpt.training' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
