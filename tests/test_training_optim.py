"""tfgpt.training.optim: the schedule, AdamW (weight decay on matrices only, exact Adam on gather
embeddings), loss scaling under mixed_float16 checked against float32 with a scale-sensitive update, and
the loss."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfgpt.config import GPTConfig
from tfgpt.model import GPT, build_model
from tfgpt.training import (
    WarmupCosine,
    WholeGradientMixin,
    build_optimizer,
    compile_model,
    next_token_loss,
    no_decay_variables,
)


class SGD(WholeGradientMixin, keras.optimizers.SGD):
    """Plain SGD, w ← w − lr·g: an update that shows any constant factor on the gradient (Adam and
    clipping hide one)."""


def random_ids(batch: int, length: int, vocab: int = 512, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype("int32")


# ------------------------------------------------------------------------------------------ schedule
def test_warmup_cosine_matches_formula_and_serialises():
    peak, warmup, total, r = 1e-3, 10, 110, 0.1
    sched = WarmupCosine(peak, warmup, total, r)

    def formula(s):
        if s < warmup:
            return peak * (s + 1) / warmup
        return peak * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / (total - warmup)))))

    for s in (0, 4, 9, 10, 35, 60, 85, 109, 110, 500):
        assert float(sched(s)) == pytest.approx(formula(s), rel=1e-5), s
        assert sched.value(s) == pytest.approx(formula(s), rel=1e-12), s
    assert float(sched(0)) == pytest.approx(peak / warmup, rel=1e-6)  # first update is not wasted
    assert float(sched(warmup - 1)) == pytest.approx(peak, rel=1e-6)  # linear up to the peak
    assert float(sched(60)) == pytest.approx(peak * (r + (1 - r) * 0.5), rel=1e-5)  # half-way: mean
    assert float(sched(total)) == pytest.approx(r * peak, rel=1e-5)  # ends at 10% of the peak
    values = [sched.value(s) for s in range(total + 1)]
    assert all(a < b for a, b in zip(values[: warmup - 1], values[1:warmup], strict=True))
    assert all(a >= b for a, b in zip(values[warmup:-1], values[warmup + 1 :], strict=True))
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sched))
    assert isinstance(restored, WarmupCosine) and restored.get_config() == sched.get_config()


# ------------------------------------------------------------------------------------------ optimizer
def test_weight_decay_applies_to_matrices_only():
    model = build_model(GPTConfig.from_preset("tiny"))
    exempt = {v.path for v in no_decay_variables(model)}
    decayed = {v.path for v in model.trainable_variables} - exempt
    assert decayed and all(p.endswith("/kernel") for p in decayed)
    assert {p.rsplit("/", 1)[1] for p in exempt} == {"token_embeddings", "position_embeddings", "gamma", "beta", "bias"}

    lr, wd = 0.1, 0.5
    optimizer = build_optimizer(model, lr=lr, weight_decay=wd)
    assert optimizer.beta_2 == 0.95 and optimizer.global_clipnorm == 1.0
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    # Zero gradients: Adam's step is 0, so only the decoupled decay w <- w (1 - lr wd) moves weights.
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])
    for v in model.trainable_variables:
        expected = before[v.path] * (1 - lr * wd) if v.path in decayed else before[v.path]
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, atol=1e-8, err_msg=v.path)


def test_float16_gets_loss_scaling():
    model = build_model(GPTConfig.from_preset("tiny"))
    optimizer = build_optimizer(model, lr=1e-3, loss_scale=True)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert optimizer.inner_optimizer.weight_decay == pytest.approx(0.1)


def test_global_clipnorm_clips_the_whole_gradient_on_one_device():
    v = keras.Variable(np.zeros(4, "float32"))
    w = keras.Variable(np.zeros((2, 2), "float32"))
    sgd = SGD(learning_rate=1.0, global_clipnorm=1.0)
    g_v, g_w = np.array([3.0, 0, 0, 0], "float32"), np.array([[0, 4.0], [0, 0]], "float32")  # norm 5
    sgd.apply([tf.constant(g_v), tf.constant(g_w)], [v, w])
    np.testing.assert_allclose(v.numpy(), -g_v / 5, rtol=1e-6)
    np.testing.assert_allclose(w.numpy(), -g_w / 5, rtol=1e-6)


def _adam_first_step(grad_sum: np.ndarray, grad_sq_sum: np.ndarray, lr: float, b1: float, b2: float, eps: float):
    """Keras' Adam update Δ = α·m/(√v + ε) after one step from m = v = 0, α = lr·√(1−β₂)/(1−β₁)."""
    alpha = lr * math.sqrt(1 - b2) / (1 - b1)
    m = (1 - b1) * grad_sum
    v = (1 - b2) * grad_sq_sum
    return alpha * m / (np.sqrt(v) + eps)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "graph"])
def test_adam_update_of_gather_embedding_is_exact(compiled: bool) -> None:
    """One fit step with Adam on an untied model and repeated token ids: the embedding update must be
    the Adam update of the dense gradient G (v = (1−β₂)·G²), not of per-occurrence rows (Σg²). The model
    has no custom train_step: the optimizer (`build_optimizer`) densifies the gradient."""
    cfg = GPTConfig.from_preset("tiny", tie_embeddings=False, vocab_size=64, context=16)
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-8
    ids = np.array([[3, 5, 3, 3, 7, 5, 3, 9], [5, 3, 11, 3, 3, 5, 7, 3]], "int32")  # 3 and 5 repeat
    targets = random_ids(2, 8, vocab=64, seed=11)

    model = build_model(cfg)
    E = model.embedding.token_embeddings
    initial = model.get_weights()
    e0 = E.numpy().copy()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(targets, model(ids, training=True))
    (grad,) = tape.gradient(loss, [E])
    assert isinstance(grad, tf.IndexedSlices)  # a gather: one row per occurrence
    dense = tf.convert_to_tensor(grad).numpy().astype(np.float64)
    rows = grad.values.numpy().astype(np.float64)
    sq_sum = np.zeros_like(dense)
    np.add.at(sq_sum, grad.indices.numpy(), rows**2)

    expected = _adam_first_step(dense, dense**2, lr, b1, b2, eps)
    wrong = _adam_first_step(dense, sq_sum, lr, b1, b2, eps)  # the Σg² bug
    repeated = [3, 5]
    assert np.abs(expected[repeated] - wrong[repeated]).max() > 1e-4  # 10% of lr: easily caught

    def one_step(m: GPT, optimizer: keras.optimizers.Optimizer) -> np.ndarray:
        m.compile(optimizer=optimizer, loss=loss_fn, run_eagerly=not compiled, jit_compile=False)
        m.fit(ids, targets, batch_size=2, epochs=1, shuffle=False, verbose=0)
        return e0 - m.embedding.token_embeddings.numpy()

    adam = build_optimizer(model, lr=lr, weight_decay=0.0, beta1=b1, beta2=b2, clipnorm=None)
    update = one_step(model, adam)
    np.testing.assert_allclose(update, expected, atol=1e-6)
    unused = np.setdiff1d(np.arange(cfg.vocab_size), ids)
    assert not update[unused].any()

    # Keras' own Adam, handed the IndexedSlices, reproduces the Σg² variant.
    stock = build_model(cfg)
    stock.set_weights(initial)
    stock_update = one_step(stock, keras.optimizers.Adam(learning_rate=lr, beta_1=b1, beta_2=b2, epsilon=eps))
    np.testing.assert_allclose(stock_update, wrong, atol=1e-6)
    assert np.abs(stock_update - expected).max() > 1e-4


# ------------------------------------------------------------------------------------------ mixed precision
def sgd_run(precision: str, batches: np.ndarray, initial: list | None = None, lr: float = 0.5):
    """(model, its initial weights, the change of each trainable variable) after one SGD step per batch,
    set up by `compile_model` (precision policy, loss scaling)."""
    cfg = GPTConfig.from_preset("tiny", context=16, vocab_size=128)
    model = compile_model(cfg, strategy=tf.distribute.get_strategy(), precision=precision, xla=False, lr=lr,
                          seed=3, optimizer=lambda m: SGD(learning_rate=lr))
    if initial is not None:
        model.set_weights(initial)
    weights = model.get_weights()
    start = [v.numpy().copy() for v in model.trainable_variables]
    dataset = tf.data.Dataset.from_tensor_slices((batches[..., :-1], batches[..., 1:]))
    model.fit(dataset, epochs=1, shuffle=False, verbose=0)
    return model, weights, [v.numpy() - s for v, s in zip(model.trainable_variables, start, strict=True)]


def test_mixed_float16_sgd_matches_float32():
    """Loss scaling must be undone before the update: mixed_float16 with its dynamic loss scale (2¹⁵)
    takes the float32 steps, to float16 accuracy (a missing unscale would move weights 32768x further;
    a step skipped for an overflowing scale would not move them at all)."""
    batches = np.random.default_rng(0).integers(0, 128, (3, 4, 17)).astype("int32")  # 3 steps, B=4, T=16
    _, initial, reference = sgd_run("float32", batches)
    keras.utils.clear_session()
    model, _, updates = sgd_run("mixed_float16", batches, initial)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.compute_dtype == "float16" and all(v.dtype == "float32" for v in model.trainable_variables)
    assert int(model.optimizer.iterations.numpy()) == 3  # no step skipped for an overflow
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**15
    for v, r, u in zip(model.trainable_variables, reference, updates, strict=True):
        assert np.abs(r).max() > 0, v.path
        assert np.abs(u - r).max() < 0.02 * np.abs(r).max(), (v.path, np.abs(u - r).max(), np.abs(r).max())
    moved = np.concatenate([r.ravel() for r in reference])
    assert np.linalg.norm(np.concatenate([u.ravel() for u in updates]) - moved) < 0.005 * np.linalg.norm(moved)


# ------------------------------------------------------------------------------------------ loss
def test_next_token_loss_is_mean_cross_entropy_and_masks_ignore_id():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
    targets[0, :2] = 0
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    assert float(next_token_loss()(targets, logits)) == pytest.approx(nll.mean(), rel=1e-5)
    mask = targets != 0
    assert float(next_token_loss(ignore_id=0)(targets, logits)) == pytest.approx(nll[mask].mean(), rel=1e-5)


def test_next_token_loss_is_keras_cross_entropy_forward_and_backward():
    from tfgpt.training.optim import NextTokenLoss, next_token_loss

    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(0, 3, (3, 7, 11)).astype("float32"))
    labels = tf.constant(rng.integers(0, 11, (3, 7)).astype("int32"))
    ours, reference = next_token_loss(), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert isinstance(ours, NextTokenLoss)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        a, b = ours(labels, logits), reference(labels, logits)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(a, logits).numpy(), tape.gradient(b, logits).numpy(), atol=1e-7)
    restored = keras.losses.deserialize(keras.losses.serialize(ours))
    assert isinstance(restored, NextTokenLoss) and float(restored(labels, logits)) == float(a)
    masked = next_token_loss(ignore_id=0)  # padding masked: Keras' own loss
    assert isinstance(masked, keras.losses.SparseCategoricalCrossentropy)
