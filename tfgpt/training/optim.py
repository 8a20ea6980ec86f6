"""What is optimised and how: next-token cross-entropy, AdamW with decoupled weight decay on matrices only,
global-norm clipping of the whole (all-replica) gradient, and the warm-up + cosine learning-rate schedule.
"""

from __future__ import annotations

import math
import re
from typing import Any

import keras
import tensorflow as tf

from tfgpt import kernels


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


# =========================================================================== optimizer
class WholeGradientMixin:
    """Makes a Keras optimizer update from the whole gradient, through its public `apply`:

    * Sparse gradients become dense. A gather-based embedding (the untied input embedding) gets a
      `tf.IndexedSlices` gradient with one row per occurrence of a token; Keras Adam/AdamW given one with a
      repeated row accumulates Σg² in its second moment instead of (Σg)². Densifying first (summing the
      rows of each token) gives the exact Adam update.
    * Under a strategy with R > 1 replicas, `global_clipnorm` clips the all-replica gradient. Keras clips
      inside each replica *before* it sums the replicas' gradients (`apply` receives each replica's share,
      ≈ 1/R of the gradient, verified on Keras 3.15), so each share would be clipped on its own. Here the
      shares are summed first (`ReplicaContext.all_reduce`), the sum is clipped by its global norm, and each
      replica passes on 1/R of the clipped sum, which Keras' own all-reduce then sums back (its clip is now
      a no-op: the norm of each part is ≤ clipnorm / R). The update is the one-device update; the price is
      a second all-reduce per step when clipping under several replicas.
    """

    def apply(self, grads, trainable_variables=None):
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        if self.global_clipnorm and replicas > 1:
            grads = clipped_replica_shares(grads, context, float(self.global_clipnorm))
        return super().apply(grads, trainable_variables)


def clipped_replica_shares(grads: list, context: tf.distribute.ReplicaContext, clipnorm: float) -> list:
    """Each replica's share (1/R) of the all-replica gradient sum, clipped to global norm `clipnorm`."""
    index = [i for i, g in enumerate(grads) if g is not None]
    total = context.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in index])
    clipped, _ = tf.clip_by_global_norm(total, clipnorm)
    shares = list(grads)
    for i, g in zip(index, clipped, strict=True):
        shares[i] = g / float(context.num_replicas_in_sync)
    return shares


@keras.saving.register_keras_serializable(package="tfgpt")
class AdamW(WholeGradientMixin, keras.optimizers.AdamW):
    """Keras AdamW updating from dense, globally clipped gradients (`WholeGradientMixin`)."""


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


def build_optimizer(
    model: keras.Model,
    *,
    lr: float | keras.optimizers.schedules.LearningRateSchedule,
    weight_decay: float = 0.1,
    beta1: float = 0.9,
    beta2: float = 0.95,
    clipnorm: float | None = 1.0,
    loss_scale: bool = False,
) -> keras.optimizers.Optimizer:
    """AdamW(β₁, β₂, ε=1e-8, decoupled weight decay on matrices only, global-norm clipping of the
    whole (all-replica) gradient; `clipnorm=None`: no clipping).

    Weight decay skips `no_decay_variables(model)` (via `exclude_from_weight_decay`, by variable and
    by name, so that the distributed copies of a strategy are matched too).
    With `loss_scale` (mixed_float16) the AdamW is wrapped in a dynamic `LossScaleOptimizer`.
    Call inside the strategy scope that holds the model.
    """
    from tfgpt.training.config import TrainingError

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


@keras.saving.register_keras_serializable(package="tfgpt")
class NextTokenLoss(keras.losses.Loss):
    """Mean next-token cross-entropy −log softmax(z)[y] over all (B, T) positions, computed by the fused
    kernel `tfgpt.kernels.cross_entropy` (float32; its backward is softmax(z) − onehot(y), with log Σexp
    kept from the forward pass). Keras reduces the per-position losses (mean over B·T)."""

    def __init__(self, name: str = "loss", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        return kernels.cross_entropy(y_true, y_pred, reduction="none")


def next_token_loss(ignore_id: int | None = None) -> keras.losses.Loss:
    """Mean next-token cross-entropy −log softmax(logits)[target] over all (B, T) positions.

    The model returns float32 logits under every precision policy, so the softmax and the loss are
    float32. `ignore_id` masks a padding id out of the mean (Keras' own loss then); tfgpt's training
    windows are contiguous token spans without padding, so `train` passes None and gets the fused
    kernel (`NextTokenLoss`).
    """
    if ignore_id is not None:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=ignore_id, name="loss")
    return NextTokenLoss()
