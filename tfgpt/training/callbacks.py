"""The callbacks of a training run: bookkeeping and stopping (`RunMonitor`), TensorBoard at the global step
(`StepTensorBoard`), the best model (`BestModelCheckpoint`) and resumable backups (`StateBackup`).

They share one `RunState` (tfgpt.runs), which the backups save and a resumed run restores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from tfgpt.common import atomic_path
from tfgpt.runs import RunState, save_backup, write_run_file
from tfgpt.training.optim import WarmupCosine


def loss_metric(model: keras.Model) -> keras.metrics.Metric:
    """The running mean of the training loss over the epoch so far, which `fit` logs as "loss"."""
    for metric in model.metrics:
        if metric.name == "loss":
            return metric
    raise ValueError("the model has no 'loss' metric; compile it with a loss first")


def read_epoch_loss(model: keras.Model) -> list[float]:
    """(total, count) of the epoch's running-mean loss: what a resumed epoch continues from."""
    return [float(v.numpy()) for v in loss_metric(model).variables]


class RunMonitor(keras.callbacks.Callback):
    """Step/epoch bookkeeping of a run: counts steps, stops at `total_steps`, on the time budget, on
    early stopping (patience) and on a NaN/inf loss (checked every `check_every` steps and at
    epoch ends, with a clear message); adds `val_perplexity` to the epoch logs; records the epoch
    in `state.history` and writes metrics.json.

    A run resumed in the middle of an epoch continues the epoch's mean train loss from the
    (total, count) its backup holds (`state.epoch_loss`), so it logs the numbers of an uninterrupted run.
    """

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
        run_dir: Path | None = None,
        summary: Callable[[], dict[str, Any]] | None = None,
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
        self.run_dir = run_dir
        self.summary = summary
        self.nan_message: str | None = None
        self.last_tick = time.monotonic()
        self.epoch_start_step = 0
        self.epoch_wall = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        self.state.wall_time += now - self.last_tick
        self.epoch_wall += now - self.last_tick
        self.last_tick = now

    def on_train_begin(self, logs=None):
        self.last_tick = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        st = self.state
        if epoch != st.epoch:  # a fresh epoch (fit numbers epochs absolutely: initial_epoch)
            st.epoch, st.step_in_epoch = epoch, 0
        if st.step_in_epoch and st.epoch_loss:  # resuming mid-epoch: continue the epoch's mean loss
            for variable, value in zip(loss_metric(self.model).variables, st.epoch_loss, strict=True):
                variable.assign(value)
        else:
            st.epoch_loss = None
        self.epoch_start_step = st.global_step - st.step_in_epoch
        self.epoch_wall = 0.0
        self.last_tick = time.monotonic()

    def diverged(self, loss: float) -> None:
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
        self.tick()
        if st.global_step % self.check_every == 0 and logs and "loss" in logs:
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                self.diverged(loss)
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
        self.tick()
        train_loss = float(logs.get("loss", float("nan")))
        if not math.isfinite(train_loss) and st.status != "diverged":
            self.diverged(train_loss)
        if st.status == "diverged":
            return
        val_loss = logs.get("val_loss")
        val_loss = float(val_loss) if val_loss is not None else None
        if val_loss is not None:
            logs["val_perplexity"] = math.exp(min(val_loss, 80.0))
        epoch_steps = st.global_step - self.epoch_start_step
        partial = st.step_in_epoch < self.steps_per_epoch
        st.epoch_loss = read_epoch_loss(self.model) if partial else None
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
            "epoch_time_s": round(self.epoch_wall, 3),
            "tokens_per_sec": round(epoch_steps * self.tokens_per_step / max(self.epoch_wall, 1e-9), 1),
            "wall_time_s": round(st.wall_time, 3),
        }
        st.history = [r for r in st.history if r["epoch"] != epoch + 1] + [record]
        if not partial:
            st.epoch, st.step_in_epoch = epoch + 1, 0
        if self.patience is not None and st.epochs_without_improvement >= self.patience and not partial:
            st.status = "early_stopped"
            self.model.stop_training = True
        if self.run_dir is not None and self.summary is not None:
            write_run_file(self.run_dir, "metrics.json", self.summary())


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
        self.summary_writer = None
        self.window: tuple[int, float, float] | None = None  # (steps in the epoch's mean, that mean, time)
        self.mean_steps = 0

    @property
    def writer(self):
        if self.summary_writer is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.summary_writer = tf.summary.create_file_writer(str(self.log_dir))
        return self.summary_writer

    def on_epoch_begin(self, epoch, logs=None):
        # The running mean of the epoch's loss starts afresh, or continues a restored partial epoch
        # (RunMonitor restores it before this runs): remember where the first window starts.
        total_count = self.state.epoch_loss if self.state.step_in_epoch else None
        self.mean_steps = self.state.step_in_epoch if total_count else 0
        mean0 = total_count[0] / total_count[1] if total_count and total_count[1] else 0.0
        self.window = (self.mean_steps, mean0, time.monotonic())

    def on_train_batch_end(self, batch, logs=None):
        self.mean_steps += 1
        step = self.state.global_step
        if step % self.log_every or not logs or "loss" not in logs or self.window is None:
            return
        # logs["loss"] is the mean over the k steps of the epoch so far: the window's mean is
        # (mean_k·k − mean_k0·k0) / (k − k0).
        mean, k = float(logs["loss"]), self.mean_steps
        k0, mean0, t0 = self.window
        now = time.monotonic()
        window_loss = (mean * k - mean0 * k0) / max(k - k0, 1)
        with self.writer.as_default(step=step):
            tf.summary.scalar("train/loss", window_loss)
            tf.summary.scalar("train/learning_rate", self.schedule.value(step - 1))
            tf.summary.scalar("train/tokens_per_sec", (k - k0) * self.tokens_per_step / max(now - t0, 1e-9))
        self.window = (k, mean, now)

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
        if self.summary_writer is not None:
            self.summary_writer.flush()

    def close(self) -> None:
        if self.summary_writer is not None:
            self.summary_writer.close()
            self.summary_writer = None


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
        self.plain: keras.Model | None = None  # an uncompiled twin that receives the weights

    def on_epoch_end(self, epoch, logs=None):
        if self.state.status == "diverged" or self.state.best_step != self.state.global_step:
            return
        if self.plain is None:
            self.plain = type(self.model).from_config(self.model.get_config())
        self.plain.set_weights(self.model.get_weights())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path, suffix=".keras") as tmp:
            self.plain.save(tmp)


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
        st.epoch_loss = read_epoch_loss(self.model)  # so a resumed epoch reports the same train loss
        self.save()

    def on_epoch_end(self, epoch, logs=None):
        self.save()
