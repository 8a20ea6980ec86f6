"""Training: optimizer, learning-rate schedule, loss, callbacks, strategies and run directories.

`train(TrainConfig(...))` is what `python train_keras.py` runs: one `model.fit` job that

* builds the model and compiles it inside a `tf.distribute` strategy (default / mirrored /
  multi-worker / TPU), under a Keras precision policy, with or without XLA (`jit_compile`);
* optimises next-token cross-entropy (float32 logits) with AdamW (β₂ = 0.95, decoupled weight decay
  on matrices only, global-norm clipping 1.0) and a linear-warmup + cosine-to-10% schedule;
* logs to TensorBoard (`logs/<run>/`), keeps the best-by-validation `model.keras`, writes
  `config.json` and `metrics.json` under `runs/<run>/`, and exports a SavedModel at the end;
* backs up model + optimizer + position every `backup_every` steps, atomically, so that a killed
  job (even `kill -9`) rerun with the same command continues from the last backup and ends with
  the weights an uninterrupted run would have had (the batch stream is a pure function of
  (seed, epoch, step): `tfgpt.data.make_dataset(first_epoch=e, skip_batches=s)`).

Keras' own `BackupAndRestore` is not used: it restarts an interrupted epoch at batch 0 with the
wrong shuffle order (measured on TF 2.21 / Keras 3.15), so its resumed runs train on different data.

Symbols: B = global batch size, T = context, S = steps per epoch = ⌊(N−1)/T⌋ // B for N tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfgpt.common import HF_SOURCE, make_readable, write_json
from tfgpt.config import PRESETS, ConfigError, GPTConfig
from tfgpt.model import GPT, build_model

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("auto", "default", "mirrored", "multiworker", "tpu")
DEFAULT_DATA_SOURCE = HF_SOURCE

#: What `--precision auto` / `--xla auto` resolve to on a CPU: the fastest combination measured by
#: bench/train_throughput_modes.py (bench-6m, B=32, T=256, 2 shared cores): float32 + XLA, ~1.5x
#: float32 without XLA; mixed_bfloat16 was no faster with or without XLA (see the bench's docstring).
CPU_AUTO_PRECISION = "float32"
CPU_AUTO_XLA = True

#: Fixed prompts for the sampled stories logged at each epoch end.
SAMPLE_PROMPTS = ("Once upon a time", "One day, a little girl named Lily", "The big dog")

#: TrainConfig fields that do not change what is trained; they may differ when a run is resumed.
RUN_CONTROL_FIELDS = frozenset(
    {"time_budget", "run_name", "logdir", "out", "verbose", "log_every", "backup_every", "cache_dir", "export"}
)

BACKUP_FILE = "state.npz"


class TrainingError(RuntimeError):
    """Training stopped abnormally (e.g. the loss became NaN); the message says what to do."""


class TrainConfigError(ConfigError):
    """A training setting, path or resume request is invalid; the message names it and the fix."""


# =========================================================================== configuration
@dataclass
class TrainConfig:
    """Everything `train` needs; every field is a `train_keras.py` flag of the same name.

    Attributes:
        preset: model preset (`tfgpt.config.PRESETS`); its vocab size is replaced by the tokenizer's.
        data: story source for `tfgpt.data` (HF dataset id, local dataset dir, or text file(s)).
        val_data: separate validation source; None = the validation split of `data`.
        tokenizer: directory holding tokenizer.model (or the .model file).
        epochs: passes over the training tokens.
        max_steps: stop after this many optimizer steps in total (the schedule then ends there).
        time_budget: wall-clock seconds for this invocation; when spent, training stops cleanly,
            backs up, and the run is finished (metrics, best model, export). Rerun to continue.
        batch_size: B, global batch size (split over replicas).
        context: T, tokens per training window; None = the preset's context.
        lr: peak learning rate; warmup: linear warm-up steps; min_lr_ratio: final lr / peak lr.
        weight_decay: AdamW decoupled weight decay, applied to weight matrices only.
        beta1, beta2: Adam moment decay rates; clipnorm: global gradient-norm clip.
        dropout: overrides the preset's dropout when not None.
        precision: Keras dtype policy, or "auto" (GPU/TPU: mixed_bfloat16, older GPUs mixed_float16,
            CPU: `CPU_AUTO_PRECISION`).
        xla: `jit_compile` for the train step; None = auto (on for GPU/TPU, `CPU_AUTO_XLA` on CPU).
        strategy: "auto" (TPU if present, else mirrored over >1 GPU, else default), "default",
            "mirrored" (all local GPUs, or logical CPU devices), "multiworker" (TF_CONFIG), "tpu".
        run_name: runs/<run_name>; None = "<preset>-<hash of the settings>", so rerunning the same
            command finds the same run and resumes it.
        logdir / out: roots of the TensorBoard logs and of the run directories.
        seed: initialisation, data order and dropout seed.
        log_every: steps between TensorBoard train scalars (and NaN checks).
        backup_every: steps between resumable backups (also at every epoch end).
        val_steps: validation batches per evaluation (None = the whole validation split).
        sample_tokens: tokens per sampled story at each epoch end (0 = no samples).
        patience: stop when the validation loss has not improved for this many epochs (None = off).
        val_fraction: held-out fraction when `data` has no validation split.
        cache_dir: token cache directory (tfgpt.data.token_stream).
        verbose: Keras progress bar: 0 silent, 1 bar, 2 one line per epoch, "auto".
        export: write runs/<run>/saved_model at the end.
    """

    preset: str = "cpu-small"
    data: str = DEFAULT_DATA_SOURCE
    val_data: str | None = None
    tokenizer: str = "tokenizer"
    epochs: int = 5
    max_steps: int | None = None
    time_budget: float | None = None
    batch_size: int = 32
    context: int | None = None
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clipnorm: float = 1.0
    dropout: float | None = None
    precision: str = "auto"
    xla: bool | None = None
    strategy: str = "auto"
    run_name: str | None = None
    logdir: str = "logs"
    out: str = "runs"
    seed: int = 1337
    log_every: int = 20
    backup_every: int = 200
    val_steps: int | None = None
    sample_tokens: int = 128
    patience: int | None = None
    val_fraction: float = 0.05
    cache_dir: str = ".cache/tokens"
    verbose: int | str = "auto"
    export: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into config.json

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_none: bool = False, minimum: int = 1) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                flag = "--" + name.replace("_", "-")
                raise TrainConfigError(f"{flag} must be an integer >= {minimum}, got {value!r}")

        positive_int("epochs")
        positive_int("max_steps", allow_none=True)
        positive_int("batch_size")
        positive_int("context", allow_none=True)
        positive_int("warmup", minimum=0)
        positive_int("log_every")
        positive_int("backup_every")
        positive_int("val_steps", allow_none=True)
        positive_int("sample_tokens", minimum=0)
        positive_int("patience", allow_none=True)
        positive_int("seed", minimum=0)
        if self.preset not in PRESETS:
            raise TrainConfigError(f"unknown preset {self.preset!r}; known presets: {', '.join(PRESETS)}")
        if self.context is not None and self.context > PRESETS[self.preset].context:
            raise TrainConfigError(
                f"--context {self.context} is larger than preset {self.preset!r} allows "
                f"({PRESETS[self.preset].context} positions); use --context <= {PRESETS[self.preset].context}"
            )
        if self.time_budget is not None and not float(self.time_budget) > 0:
            raise TrainConfigError(f"--time-budget must be > 0 seconds, got {self.time_budget!r}")
        for name in ("lr", "clipnorm"):
            if not float(getattr(self, name)) > 0:
                raise TrainConfigError(f"--{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.min_lr_ratio) <= 1.0:
            raise TrainConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if float(self.weight_decay) < 0:
            raise TrainConfigError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise TrainConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.dropout is not None and not 0.0 <= float(self.dropout) < 1.0:
            raise TrainConfigError(f"--dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise TrainConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.precision not in PRECISIONS:
            raise TrainConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise TrainConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.xla not in (None, True, False):
            raise TrainConfigError(f"xla must be true, false or null (auto), got {self.xla!r}")
        if self.verbose not in (0, 1, 2, "auto"):
            raise TrainConfigError(f"--verbose must be 0, 1, 2 or auto, got {self.verbose!r}")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name in (".", "..")):
            raise TrainConfigError(f"--run-name must be a plain directory name, got {self.run_name!r}")

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainConfigError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def identity(self) -> dict[str, Any]:
        """The settings that determine the trained weights (all but `RUN_CONTROL_FIELDS`)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_CONTROL_FIELDS}

    def identity_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:8]

    @property
    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.preset}-{self.identity_hash()}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.resolved_run_name

    @property
    def log_dir(self) -> Path:
        return Path(self.logdir) / self.resolved_run_name

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The preset with the tokenizer's vocab size, `context` and `dropout` applied."""
        overrides: dict[str, Any] = {"vocab_size": int(vocab_size)}
        if self.context is not None:
            overrides["context"] = self.context
        if self.dropout is not None:
            overrides["dropout"] = float(self.dropout)
        return GPTConfig.from_preset(self.preset, **overrides)


def config_differences(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """`name: saved -> current` for every weight-determining setting that differs."""
    now = current.identity()
    keys = sorted(set(now) | {k for k in saved if k not in RUN_CONTROL_FIELDS})
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


# =========================================================================== schedule
@keras.saving.register_keras_serializable(package="tfgpt")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak_lr`, then cosine decay to `min_ratio · peak_lr` at `total_steps`.

    With s the optimizer step (0 for the first update), W = warmup_steps, N = total_steps:

        lr(s) = peak · (s + 1) / W                                         s < W
        lr(s) = peak · (r + (1 − r) · ½(1 + cos(π · min(1, (s − W) / (N − W)))))    s ≥ W

    with r = min_ratio (0.1: the schedule ends at 10% of the peak). The first update already has a
    non-zero rate (peak/W) and step W−1 reaches the peak.
    """

    def __init__(self, peak_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> None:
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
        self.peak_lr = float(peak_lr)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        peak = tf.constant(self.peak_lr, tf.float32)
        warm = tf.constant(float(max(self.warmup_steps, 1)), tf.float32)
        decay_len = tf.constant(float(max(self.total_steps - self.warmup_steps, 1)), tf.float32)
        progress = tf.clip_by_value((step - float(self.warmup_steps)) / decay_len, 0.0, 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        decayed = peak * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
        warmup = peak * (step + 1.0) / warm
        return tf.where(step < float(self.warmup_steps), warmup, decayed)

    def value(self, step: int) -> float:
        """The same formula in plain Python (for logging and tests)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / max(self.warmup_steps, 1)
        progress = min(1.0, (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1))
        return self.peak_lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def get_config(self) -> dict[str, Any]:
        return {
            "peak_lr": self.peak_lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_ratio": self.min_ratio,
        }


# =========================================================================== optimizer and loss
def no_decay_variables(model: keras.Model) -> list[keras.Variable]:
    """Trainable variables exempt from weight decay: LayerNorm γ/β, biases and embeddings.

    The rule: a variable is decayed iff it is a weight matrix (ndim ≥ 2) that does not belong to an
    embedding layer. (The tied token embedding is also the output projection; it is not decayed.)
    """
    out = []
    for v in model.trainable_variables:
        if len(v.shape) < 2 or "embedding" in v.path.split("/")[-2] or "embeddings" in v.name:
            out.append(v)
    return out


@keras.saving.register_keras_serializable(package="tfgpt")
class AdamW(keras.optimizers.AdamW):
    """Keras AdamW whose `global_clipnorm` clips the all-reduced gradient under a multi-replica strategy.

    Keras 3.15 clips inside each replica, before the gradients are summed over replicas, so with R
    replicas each replica's share (≈ 1/R of the gradient) is clipped on its own and the clip barely
    acts. Here the gradients are all-reduced first, clipped by their true global norm, and the
    later all-reduce is skipped: the same update as on one device. With one replica nothing changes.
    """

    def _reduces_in_clip(self) -> bool:
        ctx = tf.distribute.get_replica_context()
        return bool(self.global_clipnorm) and ctx is not None and ctx.num_replicas_in_sync > 1

    def _clip_gradients(self, grads):
        if self._reduces_in_clip():
            index = [i for i, g in enumerate(grads) if g is not None]
            reduced = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, [grads[i] for i in index]
            )
            grads = list(grads)
            for i, g in zip(index, reduced, strict=True):
                grads[i] = g
        return super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        if self._reduces_in_clip():  # already summed in _clip_gradients
            return list(grads_and_vars)
        return super()._all_reduce_sum_gradients(grads_and_vars)


def build_optimizer(
    model: keras.Model,
    *,
    lr: float | keras.optimizers.schedules.LearningRateSchedule,
    weight_decay: float = 0.1,
    beta1: float = 0.9,
    beta2: float = 0.95,
    clipnorm: float = 1.0,
    loss_scale: bool = False,
) -> keras.optimizers.Optimizer:
    """AdamW(β₁, β₂, ε=1e-8, decoupled weight decay on matrices only, global-norm clipping of the
    whole (all-replica) gradient).

    Weight decay skips `no_decay_variables(model)` (via `exclude_from_weight_decay`, by variable and
    by name, so that the distributed copies of a strategy are matched too).
    With `loss_scale` (mixed_float16) the AdamW is wrapped in a dynamic `LossScaleOptimizer`.
    Call inside the strategy scope that holds the model.
    """
    optimizer = AdamW(
        learning_rate=lr,
        weight_decay=weight_decay,
        beta_1=beta1,
        beta_2=beta2,
        epsilon=1e-8,
        global_clipnorm=clipnorm,
    )
    exempt_vars = no_decay_variables(model)
    exempt = {v.name for v in exempt_vars}
    decayed = {v.name for v in model.trainable_variables if all(v is not e for e in exempt_vars)}
    if decayed & exempt:  # a name used by both kinds: names cannot separate them
        raise TrainingError(f"variable names {sorted(decayed & exempt)} are both decayed and exempt")
    # The TF backend matches names against the tf.Variable's full name ("gpt/block_0/ln_1/gamma:0",
    # "…/gamma/replica_1:0" under MirroredStrategy), so match the last path component exactly.
    optimizer.exclude_from_weight_decay(
        var_list=exempt_vars,
        var_names=[rf"(^|/){re.escape(name)}(/replica_\d+)?(:\d+)?$" for name in sorted(exempt)],
    )
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def next_token_loss(ignore_id: int | None = None) -> keras.losses.Loss:
    """Mean next-token cross-entropy −log softmax(logits)[target] over all (B, T) positions.

    The model returns float32 logits under every precision policy, so the softmax and the loss are
    float32. `ignore_id` masks a padding id out of the mean; tfgpt's training windows are contiguous
    token spans without padding, so `train` passes None (masking would cost an extra pass over the
    (B, T, V) logits).
    """
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=ignore_id, name="loss")


# =========================================================================== devices and strategies
def _cpu_logical_devices() -> list[str]:
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def resolve_strategy(name: str) -> tf.distribute.Strategy:
    """The `tf.distribute` strategy for `--strategy name` (see `TrainConfig.strategy`)."""
    if name == "auto":
        if os.environ.get("TPU_NAME") or tf.config.list_logical_devices("TPU"):
            name = "tpu"
        elif _tf_config_workers() > 1:
            name = "multiworker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = _cpu_logical_devices()
        # Several logical CPU devices (tf.config.set_logical_device_configuration): mirror over them.
        return tf.distribute.MirroredStrategy(devices=cpus, cross_device_ops=tf.distribute.ReductionToOneDevice())
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise TrainConfigError(
                "--strategy multiworker needs the TF_CONFIG environment variable (cluster + task) on every "
                "worker; see README 'Distributed training'"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", "local"))
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as exc:
            raise TrainConfigError(
                f"--strategy tpu found no TPU ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                "run on a TPU VM or set TPU_NAME"
            ) from None
        return tf.distribute.TPUStrategy(resolver)
    raise TrainConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")


def _tf_config_workers() -> int:
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    except json.JSONDecodeError:
        return 0
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def strategy_kind(strategy: tf.distribute.Strategy) -> str:
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "multiworker"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "mirrored"
    return "default"


def _strategy_on_cpu(strategy: tf.distribute.Strategy) -> bool:
    if strategy_kind(strategy) == "tpu":
        return False
    if strategy_kind(strategy) == "mirrored":
        return all("CPU" in d.upper() for d in strategy.extended.worker_devices)
    return not tf.config.list_logical_devices("GPU")


def resolve_precision(precision: str, strategy: tf.distribute.Strategy) -> str:
    """`--precision auto`: TPU and GPUs with compute capability ≥ 8 (Ampere+) mixed_bfloat16, older
    GPUs mixed_float16, CPU the fastest measured setting (`CPU_AUTO_PRECISION`)."""
    if precision != "auto":
        return precision
    if strategy_kind(strategy) == "tpu":
        return "mixed_bfloat16"
    if _strategy_on_cpu(strategy):
        return CPU_AUTO_PRECISION
    gpus = tf.config.list_physical_devices("GPU")
    capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0)) if gpus else (0, 0)
    return "mixed_bfloat16" if tuple(capability) >= (8, 0) else "mixed_float16"


def resolve_xla(xla: bool | None, strategy: tf.distribute.Strategy, notify: Callable[[str], None] = print) -> bool:
    """`--xla auto`: on for GPU/TPU, `CPU_AUTO_XLA` on CPU. Forced off for MirroredStrategy over CPU
    devices, where the compiled step fails (a resource lives on another device)."""
    on_cpu = _strategy_on_cpu(strategy)
    if xla is None:
        xla = CPU_AUTO_XLA if on_cpu else True
    if xla and on_cpu and strategy.num_replicas_in_sync > 1:
        notify("notice: XLA is off: MirroredStrategy over CPU devices cannot run a jit-compiled step")
        xla = False
    return bool(xla)


# =========================================================================== model set-up
def compile_model(
    model_config: GPTConfig,
    *,
    strategy: tf.distribute.Strategy,
    precision: str,
    xla: bool,
    lr: float,
    total_steps: int,
    warmup: int,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    beta1: float = 0.9,
    beta2: float = 0.95,
    clipnorm: float = 1.0,
    seed: int = 0,
) -> GPT:
    """Build and compile a GPT inside `strategy.scope()` under the `precision` policy (set globally:
    the caller restores it). The optimizer's variables are created here, so state can be restored
    before the first step. This is the one training set-up (train() and the bench use it)."""
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        model = build_model(model_config)
        schedule = WarmupCosine(lr, warmup, total_steps, min_lr_ratio)
        optimizer = build_optimizer(
            model,
            lr=schedule,
            weight_decay=weight_decay,
            beta1=beta1,
            beta2=beta2,
            clipnorm=clipnorm,
            loss_scale=precision == "mixed_float16",
        )
        model.compile(optimizer=optimizer, loss=next_token_loss(), jit_compile=xla)
        optimizer.build(model.trainable_variables)
        # Build the compiled loss/metrics from an int32 batch now: under a tf.distribute strategy, fit()
        # would build them from the strategy's MEAN-reduced first batch, which is float32 and fails
        # in the embedding gather (Keras 3.15).
        ids = np.zeros((1, model_config.context), np.int32)
        model._symbolic_build(data_batch=(ids, ids))
    return model


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
    loss_tracker: list[float] | None = None  # Keras' running (total, count) of a partial epoch
    finished: bool = False  # metrics, best model and export written for the final state
    saved_model: str | None = None  # the exported SavedModel directory

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunState:
        return cls(**json.loads(text))


def save_backup(path: Path, model: keras.Model, state: RunState, identity_hash: str) -> None:
    """Atomically write model variables (weights, dropout RNG states), optimizer variables and the
    run state to one .npz file."""
    arrays: dict[str, np.ndarray] = {}
    for i, v in enumerate(model.variables):
        arrays[f"model/{i}"] = np.asarray(v.numpy())
    for i, v in enumerate(model.optimizer.variables):
        arrays[f"optimizer/{i}"] = np.asarray(v.numpy())
    meta = {"state": json.loads(state.to_json()), "identity": identity_hash, "format": 1}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_backup_meta(path: Path) -> dict[str, Any]:
    with np.load(path) as z:
        return json.loads(bytes(z["meta"]).decode())


def load_backup(path: Path, model: keras.Model) -> RunState:
    """Restore what `save_backup` wrote into a compiled model (optimizer built); returns the state."""
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        for prefix, variables in (("model", model.variables), ("optimizer", model.optimizer.variables)):
            n_saved = sum(1 for k in z.files if k.startswith(prefix + "/"))
            if n_saved != len(variables):
                raise TrainConfigError(
                    f"backup {path} holds {n_saved} {prefix} variables, this model has {len(variables)}; "
                    "it belongs to another configuration: use another --run-name"
                )
            for i, v in enumerate(variables):
                value = z[f"{prefix}/{i}"]
                if tuple(value.shape) != tuple(v.shape):
                    raise TrainConfigError(
                        f"backup {path}: {prefix} variable {v.path} has shape {value.shape}, expected "
                        f"{tuple(v.shape)}; use another --run-name"
                    )
                v.assign(value)
    return RunState(**meta["state"])


# =========================================================================== callbacks
class RunMonitor(keras.callbacks.Callback):
    """Step/epoch bookkeeping of a run: counts steps, stops at `total_steps`, on the time budget, on
    early stopping (patience) and on a NaN/inf loss (checked every `check_every` steps and at
    epoch ends, with a clear message); adds `val_perplexity` to the epoch logs; records the epoch
    in `state.history` and writes metrics.json."""

    def __init__(
        self,
        state: RunState,
        *,
        steps_per_epoch: int,
        total_steps: int,
        tokens_per_step: int,
        schedule: WarmupCosine,
        check_every: int = 20,
        time_budget: float | None = None,
        start_time: float | None = None,
        patience: int | None = None,
        metrics_path: Path | None = None,
        summary: Callable[[], dict[str, Any]] | None = None,
        restore_loss_tracker: bool = True,
    ) -> None:
        super().__init__()
        self.state = state
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.schedule = schedule
        self.check_every = check_every
        self.time_budget = time_budget
        self.start_time = time.monotonic() if start_time is None else start_time
        self.patience = patience
        self.metrics_path = metrics_path
        self.summary = summary
        self.restore_loss_tracker = restore_loss_tracker
        self.nan_message: str | None = None
        self._last = time.monotonic()
        self._epoch_start_step = 0
        self._epoch_wall = 0.0

    def _tick(self) -> None:
        now = time.monotonic()
        self.state.wall_time += now - self._last
        self._epoch_wall += now - self._last
        self._last = now

    def on_train_begin(self, logs=None):
        self._last = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        st = self.state
        if epoch != st.epoch:  # a fresh epoch (fit numbers epochs absolutely: initial_epoch)
            st.epoch, st.step_in_epoch = epoch, 0
        if st.step_in_epoch and st.loss_tracker and self.restore_loss_tracker:
            # Resuming mid-epoch: continue Keras' running mean of the epoch's train loss.
            for var, value in zip(self.model._loss_tracker.variables, st.loss_tracker, strict=True):
                var.assign(value)
        else:  # the running mean starts from scratch (several replicas: their sums are not restored)
            st.loss_tracker = None
        self._epoch_start_step = st.global_step - st.step_in_epoch
        self._epoch_wall = 0.0
        self._last = time.monotonic()

    def _diverged(self, loss: float) -> None:
        st = self.state
        st.status = "diverged"
        self.model.stop_training = True
        self.nan_message = (
            f"the training loss became {loss} by step {st.global_step} (learning rate "
            f"{self.schedule.value(max(st.global_step - 1, 0)):.3g}); training stopped without saving this state. "
            "Lower --lr, raise --warmup or use --precision float32, then start a new --run-name "
            "(or rerun to continue from the last backup)"
        )

    def on_train_batch_end(self, batch, logs=None):
        st = self.state
        st.global_step += 1
        st.step_in_epoch += 1
        self._tick()
        if st.global_step % self.check_every == 0 and logs and "loss" in logs:
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                self._diverged(loss)
                return
        if st.global_step >= self.total_steps:
            st.status = "completed"
            self.model.stop_training = True
        elif self.time_budget is not None and time.monotonic() - self.start_time >= self.time_budget:
            st.status = "time_budget"
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        st = self.state
        logs = logs if logs is not None else {}
        self._tick()
        train_loss = float(logs.get("loss", float("nan")))
        if not math.isfinite(train_loss) and st.status != "diverged":
            self._diverged(train_loss)
        if st.status == "diverged":
            return
        val_loss = logs.get("val_loss")
        val_loss = float(val_loss) if val_loss is not None else None
        if val_loss is not None:
            logs["val_perplexity"] = math.exp(min(val_loss, 80.0))
        epoch_steps = st.global_step - self._epoch_start_step
        partial = st.step_in_epoch < self.steps_per_epoch
        # Keras' loss tracker holds the running mean over the epoch so far (kept in backups).
        tracker = self.model._loss_tracker.variables
        st.loss_tracker = [float(v.numpy()) for v in tracker] if partial else None
        improved = val_loss is not None and math.isfinite(val_loss) and (
            st.best_val_loss is None or val_loss < st.best_val_loss
        )
        if improved:
            st.best_val_loss, st.best_epoch, st.best_step = val_loss, epoch + 1, st.global_step
            st.epochs_without_improvement = 0
        elif not partial:
            st.epochs_without_improvement += 1
        record = {
            "epoch": epoch + 1,
            "step": st.global_step,
            "partial": partial,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_perplexity": logs.get("val_perplexity"),
            "learning_rate": self.schedule.value(max(st.global_step - 1, 0)),
            "tokens_seen": st.global_step * self.tokens_per_step,
            "epoch_steps": epoch_steps,
            "epoch_time_s": round(self._epoch_wall, 3),
            "tokens_per_sec": round(epoch_steps * self.tokens_per_step / max(self._epoch_wall, 1e-9), 1),
            "wall_time_s": round(st.wall_time, 3),
        }
        st.history = [r for r in st.history if r["epoch"] != epoch + 1] + [record]
        if not partial:
            st.epoch, st.step_in_epoch = epoch + 1, 0
        if self.patience is not None and st.epochs_without_improvement >= self.patience and not partial:
            st.status = "early_stopped"
            self.model.stop_training = True
        if self.metrics_path is not None and self.summary is not None:
            write_json(self.metrics_path, self.summary())


class StepTensorBoard(keras.callbacks.Callback):
    """TensorBoard scalars and texts under logs/<run>/, at the global step (continues after resume).

    Every `log_every` steps: train/loss (mean over those steps), train/learning_rate,
    train/tokens_per_sec. Every epoch: epoch/train_loss, epoch/val_loss, epoch/val_perplexity,
    epoch/tokens_per_sec and text summaries samples/greedy, samples/temperature_0.8 (from
    `sampler(epoch)` -> {tag: [markdown strings]}).
    """

    def __init__(
        self,
        log_dir: Path,
        state: RunState,
        *,
        log_every: int,
        tokens_per_step: int,
        schedule: WarmupCosine,
        sampler: Callable[[int], dict[str, list[str]]] | None = None,
    ) -> None:
        super().__init__()
        self.log_dir = Path(log_dir)
        self.state = state
        self.log_every = log_every
        self.tokens_per_step = tokens_per_step
        self.schedule = schedule
        self.sampler = sampler
        self._writer = None
        self._window: tuple[int, float, float] | None = None  # (tracker steps, their mean loss, time)
        self._tracker_steps = 0

    @property
    def writer(self):
        if self._writer is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        return self._writer

    def on_epoch_begin(self, epoch, logs=None):
        # Keras' running mean of the loss restarts each epoch, or continues a restored partial epoch
        # (RunMonitor restores it before this runs): remember where the first window starts.
        tracker = self.state.loss_tracker if self.state.step_in_epoch else None
        self._tracker_steps = self.state.step_in_epoch if tracker else 0
        mean0 = tracker[0] / tracker[1] if tracker and tracker[1] else 0.0
        self._window = (self._tracker_steps, mean0, time.monotonic())

    def on_train_batch_end(self, batch, logs=None):
        self._tracker_steps += 1
        step = self.state.global_step
        if step % self.log_every or not logs or "loss" not in logs or self._window is None:
            return
        # logs["loss"] is the mean over the k steps since the tracker reset: the window's mean is
        # (mean_k·k − mean_k0·k0) / (k − k0).
        mean, k = float(logs["loss"]), self._tracker_steps
        k0, mean0, t0 = self._window
        now = time.monotonic()
        window_loss = (mean * k - mean0 * k0) / max(k - k0, 1)
        with self.writer.as_default(step=step):
            tf.summary.scalar("train/loss", window_loss)
            tf.summary.scalar("train/learning_rate", self.schedule.value(step - 1))
            tf.summary.scalar("train/tokens_per_sec", (k - k0) * self.tokens_per_step / max(now - t0, 1e-9))
        self._window = (k, mean, now)

    def on_epoch_end(self, epoch, logs=None):
        if self.state.status == "diverged" or not logs:
            return
        step = self.state.global_step
        record = self.state.history[-1] if self.state.history else {}
        with self.writer.as_default(step=step):
            for tag, key in (
                ("epoch/train_loss", "loss"),
                ("epoch/val_loss", "val_loss"),
                ("epoch/val_perplexity", "val_perplexity"),
            ):
                if logs.get(key) is not None:
                    tf.summary.scalar(tag, float(logs[key]))
            if "tokens_per_sec" in record:
                tf.summary.scalar("epoch/tokens_per_sec", record["tokens_per_sec"])
            if self.sampler is not None:
                for tag, texts in self.sampler(epoch).items():
                    tf.summary.text(tag, tf.constant(texts))
        self.writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class BestModelCheckpoint(keras.callbacks.Callback):
    """Save the model (`.keras`) when the validation loss improves, atomically.

    The file holds the architecture and weights only (no optimizer, no compile settings), so
    `keras.saving.load_model(path)` works after a plain `import tfgpt`; the optimizer state for
    resuming lives in the backup.

    `RunMonitor` (earlier in the callback list) decides whether the epoch improved on the best
    validation loss (`state.best_step == state.global_step`); the best value lives in the run state,
    so it survives a resume.
    """

    def __init__(self, path: Path, state: RunState) -> None:
        super().__init__()
        self.path = Path(path)
        self.state = state
        self._plain: keras.Model | None = None  # an uncompiled twin that receives the weights

    def on_epoch_end(self, epoch, logs=None):
        if self.state.status == "diverged" or self.state.best_step != self.state.global_step:
            return
        if self._plain is None:
            self._plain = type(self.model).from_config(self.model.get_config())
        self._plain.set_weights(self.model.get_weights())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.stem}.tmp.keras")
        self._plain.save(tmp)
        os.replace(tmp, self.path)


class StateBackup(keras.callbacks.Callback):
    """Every `every` steps and at each epoch end: `save_backup` (model + optimizer + run state),
    atomically, unless the loss is not finite. Rerunning the job restores it (exact resume)."""

    def __init__(self, path: Path, state: RunState, identity_hash: str, every: int, enabled: bool = True) -> None:
        super().__init__()
        self.path = Path(path)
        self.state = state
        self.identity_hash = identity_hash
        self.every = every
        self.enabled = enabled
        self.last_saved_step: int | None = None

    def save(self) -> None:
        if not self.enabled or self.state.status == "diverged":
            return
        save_backup(self.path, self.model, self.state, self.identity_hash)
        self.last_saved_step = self.state.global_step

    def on_train_batch_end(self, batch, logs=None):
        st = self.state
        if st.global_step % self.every or st.status == "diverged":
            return
        if logs and "loss" in logs and not math.isfinite(float(logs["loss"])):
            return
        # Keras' epoch-mean loss so far, so a resumed epoch reports the same train loss.
        st.loss_tracker = [float(v.numpy()) for v in self.model._loss_tracker.variables]
        self.save()

    def on_epoch_end(self, epoch, logs=None):
        self.save()


# =========================================================================== the job
def _notify(message: str) -> None:
    print(message, flush=True)


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
    if strategy_kind(strategy) != "multiworker":
        return True
    resolver = strategy.cluster_resolver
    return resolver.task_type in (None, "chief") or (
        resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs
    )


def _existing_run(cfg: TrainConfig, resume: bool | None) -> tuple[dict[str, Any] | None, Path | None]:
    """(saved config.json, backup path or None); errors for a mismatching or impossible resume."""
    run_dir = cfg.run_dir
    config_path = run_dir / "config.json"
    backup = run_dir / "backup" / BACKUP_FILE
    saved = json.loads(config_path.read_text()) if config_path.is_file() else None
    if not backup.is_file():
        if resume:
            raise TrainConfigError(
                f"--resume: {run_dir} has no backup to resume from ({backup} is missing); start it without --resume"
            )
        return saved, None
    meta = read_backup_meta(backup)
    if meta.get("identity") != cfg.identity_hash():
        saved_train = (saved or {}).get("train", {})
        diffs = config_differences(saved_train, cfg) if saved_train else ["(config.json missing)"]
        raise TrainConfigError(
            f"{run_dir} holds a run with different settings ({'; '.join(diffs[:4])}); "
            f"rerun with its settings (--config {config_path}) or choose another --run-name"
        )
    return saved, backup


def train(
    cfg: TrainConfig,
    *,
    resume: bool | None = None,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
    notify: Callable[[str], None] = _notify,
) -> dict[str, Any]:
    """Run (or continue) the training job described by `cfg`; returns the run summary.

    `resume`: None continues runs/<run>/ when it holds a backup made with the same settings (a rerun
    of the same command), True requires such a backup, False refuses to touch an existing backup.
    Raises TrainConfigError (bad settings/paths/resume), DataError/TokenizerError (data), and
    TrainingError if the loss diverges.
    """
    start_time = time.monotonic()
    from tfgpt.data import DataError, make_dataset, steps_per_epoch, token_stream
    from tfgpt.tokenizer import Tokenizer

    run_dir, log_dir = cfg.run_dir, cfg.log_dir
    saved_config, backup_path = _existing_run(cfg, resume)
    if resume is False and backup_path is not None:
        raise TrainConfigError(f"{run_dir} already holds a backup; choose another --run-name")
    if backup_path is not None:
        prior = RunState(**read_backup_meta(backup_path)["state"])
        if prior.finished:
            notify(f"{run_dir} is already complete ({prior.global_step} steps, {prior.status}); nothing to do. "
                   "Choose another --run-name to train again.")
            metrics_path = run_dir / "metrics.json"
            return json.loads(metrics_path.read_text()) if metrics_path.is_file() else {"status": prior.status}

    # ----- tokenizer and data
    tokenizer = Tokenizer.load(cfg.tokenizer)
    model_config = cfg.model_config(tokenizer.vocab_size)
    T, B = model_config.context, cfg.batch_size
    train_tokens = token_stream(cfg.data, tokenizer, "train", cache_dir=cfg.cache_dir, val_fraction=cfg.val_fraction)
    if cfg.val_data:
        val_tokens = token_stream(cfg.val_data, tokenizer, "validation", cache_dir=cfg.cache_dir, val_fraction=cfg.val_fraction)
    else:
        val_tokens = token_stream(cfg.data, tokenizer, "validation", cache_dir=cfg.cache_dir, val_fraction=cfg.val_fraction)
    spe = steps_per_epoch(train_tokens, T, B)
    if spe < 1:
        raise DataError(
            f"{cfg.data} gives {len(train_tokens)} training tokens: not one batch of {B} windows of {T + 1} tokens; "
            "use more data or a smaller --batch-size/--context"
        )
    val_batches = steps_per_epoch(val_tokens, T, B)
    if val_batches < 1:
        raise DataError(
            f"the validation split has {len(val_tokens)} tokens: not one batch of {B} windows of {T + 1} tokens; "
            "pass a larger --val-data or raise --val-fraction"
        )
    if cfg.val_steps is not None:
        val_batches = min(val_batches, cfg.val_steps)
    total_steps = cfg.epochs * spe if cfg.max_steps is None else min(cfg.epochs * spe, cfg.max_steps)
    if cfg.warmup >= total_steps:
        raise TrainConfigError(
            f"--warmup {cfg.warmup} is not smaller than the {total_steps} training steps; lower --warmup"
        )
    n_epochs = math.ceil(total_steps / spe)

    # ----- strategy, precision, XLA, model
    strategy = resolve_strategy(cfg.strategy)
    replicas = strategy.num_replicas_in_sync
    if B % replicas:
        raise TrainConfigError(f"--batch-size {B} must be divisible by the {replicas} replicas of the strategy")
    precision = resolve_precision(cfg.precision, strategy)
    xla = resolve_xla(cfg.xla, strategy, notify)
    chief = _is_chief(strategy)
    previous_policy = keras.mixed_precision.global_policy()
    try:
        model = compile_model(
            model_config,
            strategy=strategy,
            precision=precision,
            xla=xla,
            lr=cfg.lr,
            total_steps=total_steps,
            warmup=cfg.warmup,
            min_lr_ratio=cfg.min_lr_ratio,
            weight_decay=cfg.weight_decay,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            clipnorm=cfg.clipnorm,
            seed=cfg.seed,
        )
        schedule = WarmupCosine(cfg.lr, cfg.warmup, total_steps, cfg.min_lr_ratio)
        state = RunState()
        if backup_path is not None:
            state = load_backup(backup_path, model)
            state.status = "running"
        resumed_from = state.global_step if backup_path is not None else None

        config_record = {
            "model": model_config.to_dict(),
            "train": cfg.to_dict(),
            "run_name": cfg.resolved_run_name,
            "tokenizer": str(cfg.tokenizer),
            "tokenizer_info": {"vocab_size": tokenizer.vocab_size, "sha256": tokenizer.sha256, "eos_id": tokenizer.eos_id},
            "data": {
                "train": cfg.data,
                "validation": cfg.val_data or f"{cfg.data} (validation split)",
                "train_tokens": int(len(train_tokens)),
                "val_tokens": int(len(val_tokens)),
            },
            "schedule": {
                "steps_per_epoch": spe,
                "total_steps": total_steps,
                "epochs": n_epochs,
                "tokens_per_step": B * T,
                "val_batches": val_batches,
            },
            "resolved": {
                "precision": precision,
                "xla": xla,
                "strategy": strategy_kind(strategy),
                "replicas": replicas,
                "parameters": int(model.count_params()),
            },
            "identity": cfg.identity_hash(),
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": sys.version.split()[0]},
        }
        if chief:
            write_json(run_dir / "config.json", config_record)

        # ----- callbacks
        def summary() -> dict[str, Any]:
            last = state.history[-1] if state.history else {}
            return {
                "run_name": cfg.resolved_run_name,
                "run_dir": str(run_dir),
                "status": state.status,
                "global_step": state.global_step,
                "total_steps": total_steps,
                "steps_per_epoch": spe,
                "tokens_seen": state.global_step * B * T,
                "wall_time_s": round(state.wall_time, 3),
                "tokens_per_sec": round(state.global_step * B * T / max(state.wall_time, 1e-9), 1),
                "final_train_loss": last.get("train_loss"),
                "final_val_loss": last.get("val_loss"),
                "final_val_perplexity": last.get("val_perplexity"),
                "best_val_loss": state.best_val_loss,
                "best_epoch": state.best_epoch,
                "resumed_from_step": resumed_from,
                "saved_model": state.saved_model,
                "precision": precision,
                "xla": xla,
                "strategy": strategy_kind(strategy),
                "replicas": replicas,
                "epochs": state.history,
            }

        monitor = RunMonitor(
            state,
            steps_per_epoch=spe,
            total_steps=total_steps,
            tokens_per_step=B * T,
            schedule=schedule,
            check_every=cfg.log_every,
            time_budget=cfg.time_budget,
            start_time=start_time,
            patience=cfg.patience,
            metrics_path=run_dir / "metrics.json" if chief else None,
            summary=summary,
            restore_loss_tracker=replicas == 1,
        )
        sampler = None
        if cfg.sample_tokens and chief:
            # On CPU the XLA-compiled decoding loop takes seconds to compile for little gain at this size
            # (and cannot read variables mirrored over CPU devices); on GPU/TPU it is compiled.
            sampler = _make_sampler(model, tokenizer, cfg, notify, jit_compile=not _strategy_on_cpu(strategy))
        tensorboard = StepTensorBoard(
            log_dir if chief else Path(tempfile.mkdtemp(prefix="tfgpt-worker-logs-")),
            state,
            log_every=cfg.log_every,
            tokens_per_step=B * T,
            schedule=schedule,
            sampler=sampler,
        )
        backup = StateBackup(
            run_dir / "backup" / BACKUP_FILE, state, cfg.identity_hash(), cfg.backup_every, enabled=chief
        )
        callbacks: list[keras.callbacks.Callback] = [monitor, tensorboard]
        if chief:
            callbacks.append(BestModelCheckpoint(run_dir / "model.keras", state))
        callbacks += [backup, *extra_callbacks]

        # ----- fit: one call per run of equal-length epochs (a resumed partial epoch, whole epochs,
        # a last partial epoch under --max-steps); epoch e of the data is Keras epoch e.
        val_ds = make_dataset(val_tokens, T, B, shuffle=False, repeat=False).take(val_batches)
        val_ds = val_ds.apply(tf.data.experimental.assert_cardinality(val_batches))
        notify(
            f"run {cfg.resolved_run_name}: {model_config.name} ({model.count_params():,} parameters, V={model_config.vocab_size}, "
            f"T={T}) | {strategy_kind(strategy)} strategy x{replicas} | {precision} | XLA {'on' if xla else 'off'} | "
            f"{n_epochs} epoch(s) x {spe} steps, {total_steps} steps of {B}x{T} tokens | {run_dir}"
        )
        if resumed_from is not None:
            notify(f"resuming from step {state.global_step} (epoch {state.epoch + 1}, batch {state.step_in_epoch}) "
                   f"of {backup_path}")
        plan = fit_plan(state.global_step, spe, total_steps) if state.status != "early_stopped" else []
        for first_epoch, n_fit_epochs, steps, skip in plan:
            train_ds = make_dataset(
                train_tokens, T, B, seed=cfg.seed, first_epoch=first_epoch, skip_batches=skip, repeat=True
            )
            model.fit(
                train_ds,
                epochs=first_epoch + n_fit_epochs,
                initial_epoch=first_epoch,
                steps_per_epoch=steps,
                shuffle=False,
                validation_data=val_ds,
                callbacks=callbacks,
                verbose=cfg.verbose if chief else 0,
            )
            if model.stop_training or state.status != "running":
                break
        if state.status == "running":  # nothing left to train (resumed at the end)
            state.status = "completed" if state.global_step >= total_steps else state.status
        tensorboard.close()
        if state.status == "diverged":
            if chief:
                write_json(run_dir / "metrics.json", summary())
            raise TrainingError(monitor.nan_message or "the training loss is not finite")

        # ----- finish: export the best model, final metrics, mark the backup finished
        if chief:
            if cfg.export:
                exported = _export(run_dir, tokenizer, notify)
                state.saved_model = str(exported) if exported is not None else None
            # A run stopped by the time budget stays resumable; a completed one is marked finished.
            state.finished = state.status in ("completed", "early_stopped")
            write_json(run_dir / "metrics.json", summary())
            backup.set_model(model)
            backup.save()
        result = summary()
        notify(
            f"{state.status}: step {state.global_step}/{total_steps}, val loss "
            f"{_fmt(result['final_val_loss'])} (best {_fmt(state.best_val_loss)}, epoch {state.best_epoch}), "
            f"{result['tokens_per_sec']:.0f} tokens/s | {run_dir}"
        )
        return result
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def fit_plan(global_step: int, steps_per_epoch: int, total_steps: int) -> list[tuple[int, int, int, int]]:
    """The `model.fit` calls that take a run from `global_step` to `total_steps`.

    Each item is (first epoch, number of epochs, steps per epoch, batches of the first epoch to skip):
    a resumed partial epoch, then the whole epochs, then a last partial epoch (--max-steps), so that
    Keras epoch e is always data epoch e and the progress bar counts the steps actually run.
    """
    plan = []
    g = global_step
    while g < total_steps:
        epoch, skip = divmod(g, steps_per_epoch)
        steps = min(steps_per_epoch - skip, total_steps - g)
        n = (total_steps - g) // steps_per_epoch if skip == 0 and steps == steps_per_epoch else 1
        plan.append((epoch, n, steps, skip))
        g += n * steps
    return plan


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _make_sampler(model: GPT, tokenizer, cfg: TrainConfig, notify: Callable[[str], None], jit_compile: bool = True):
    """Epoch-end stories from `SAMPLE_PROMPTS`: greedy and temperature 0.8 (seeded per epoch)."""
    try:
        from tfgpt.generation import generate_text
    except ImportError:
        notify("notice: tfgpt.generation is not available; no sampled stories in TensorBoard")
        return None

    def sample(epoch: int) -> dict[str, list[str]]:
        out = {}
        for tag, sampling in (
            ("samples/greedy", {"temperature": 0.0}),
            ("samples/temperature_0.8", {"temperature": 0.8, "seed": cfg.seed + epoch}),
        ):
            texts = generate_text(
                model, tokenizer, list(SAMPLE_PROMPTS), max_new_tokens=cfg.sample_tokens, jit_compile=jit_compile,
                **sampling,
            )
            out[tag] = [f"**{p}** {t}" for p, t in zip(SAMPLE_PROMPTS, texts, strict=True)]
        return out

    return sample


def _export(run_dir: Path, tokenizer, notify: Callable[[str], None]) -> Path | None:
    """Export the best model (model.keras) as runs/<run>/saved_model via tfgpt.export."""
    try:
        from tfgpt.export import export_saved_model
    except ImportError:
        notify("notice: tfgpt.export is not available; no SavedModel exported")
        return None
    best = run_dir / "model.keras"
    if not best.is_file():
        notify("notice: no best model (no finite validation loss); no SavedModel exported")
        return None
    keras.mixed_precision.set_global_policy("float32")  # serve in float32 whatever the training precision
    model = keras.saving.load_model(best, compile=False)
    out = export_saved_model(model, tokenizer, run_dir / "saved_model")
    notify(f"exported {out}")
    return out
