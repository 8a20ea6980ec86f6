"""tfgpt.training.callbacks: the NaN guard, and a resumed epoch continuing its mean train loss."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfgpt.config import GPTConfig
from tfgpt.runs import RunState
from tfgpt.training import RunMonitor, StateBackup, WarmupCosine, compile_model
from tfgpt.training.callbacks import read_epoch_loss


def tiny_model(lr: float | None = None):
    """A compiled tiny GPT; with `lr`, plain SGD at that rate (0: the weights never change)."""
    optimizer = None if lr is None else (lambda m: keras.optimizers.SGD(learning_rate=lr))
    return compile_model(GPTConfig.from_preset("tiny", context=16, vocab_size=128), strategy=tf.distribute.get_strategy(),
                         precision="float32", xla=False, lr=1e-3, optimizer=optimizer)


def test_nan_loss_stops_training_with_a_clear_message_and_no_backup(tmp_path):
    model = tiny_model()
    state = RunState()
    monitor = RunMonitor(state, steps_per_epoch=10, total_steps=100, tokens_per_step=64,
                         schedule=WarmupCosine(1e-3, 5, 100), check_every=1)  # fmt: skip
    backup = StateBackup(tmp_path / "state.npz", state, "x", every=1)
    for cb in (monitor, backup):
        cb.set_model(model)
    model.stop_training = False
    monitor.on_train_batch_end(0, {"loss": float("nan")})
    backup.on_train_batch_end(0, {"loss": float("nan")})
    backup.on_epoch_end(0, {"loss": float("nan")})
    assert model.stop_training and state.status == "diverged"
    assert "became nan by step 1" in monitor.nan_message and "--lr" in monitor.nan_message
    assert not (tmp_path / "state.npz").exists()


def test_a_resumed_epoch_reports_the_mean_over_the_whole_epoch():
    """4 steps in one go, or 2 steps, a backup, and 2 more steps in a new fit: the epoch's train loss is
    the same mean over the 4 steps (the weights stay fixed, lr = 0, so each step's loss depends on its batch
    only); without the restored (total, count) it would be the mean of the last 2 steps."""
    batches = np.random.default_rng(0).integers(0, 128, (4, 4, 17)).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((batches[..., :-1], batches[..., 1:]))

    def run(dataset, state, epochs=1):
        model = tiny_model(lr=0.0)
        monitor = RunMonitor(state, steps_per_epoch=4, total_steps=4, tokens_per_step=64,
                             schedule=WarmupCosine(1e-3, 1, 4))  # fmt: skip
        model.fit(dataset, epochs=epochs, verbose=0, shuffle=False, callbacks=[monitor])
        return model

    whole = RunState()
    run(data, whole)
    state = RunState()
    model = run(data.take(2), state)  # a partial epoch: its (total, count) is kept
    assert state.step_in_epoch == 2 and state.history[0]["partial"]
    assert state.epoch_loss == read_epoch_loss(model) and state.epoch_loss[1] == 2 * 4  # Keras counts samples
    run(data.skip(2), state)
    assert state.step_in_epoch == 0 and state.epoch == 1 and state.epoch_loss is None
    assert not state.history[0]["partial"]
    assert state.history[0]["train_loss"] == pytest.approx(whole.history[0]["train_loss"], abs=1e-6)
    alone = RunState()
    run(data.skip(2), alone)  # the last two steps without the restored first half
    assert abs(alone.history[0]["train_loss"] - whole.history[0]["train_loss"]) > 1e-3
