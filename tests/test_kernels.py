"""tfgpt.kernels: each fused kernel, forward AND backward, against readable references.

The references are written here, not in the package: NumPy in float64 for the forward values, and for
the gradients either NumPy (central differences or the textbook formula) or TensorFlow's automatic
differentiation of the plain math in float64. Inputs are rounded to the tested dtype first, so the
references see exactly what the kernel sees.

Tolerances are on the largest error relative to the largest reference entry, max|got − ref| / max|ref|:
  float32   1e-5 (forward), 1e-4 (backward: sums over 256..4096 terms in float32)
  bfloat16  2e-2 (forward and backward: the result is rounded to bfloat16 once (2⁻⁸ = 0.4 %), and the
            backward also reads bfloat16 inputs such as the kept probabilities; 2e-2 is ~5 bf16 ulps)
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from tfgpt import kernels

RNG = np.random.default_rng(0)
DTYPES = ["float32", "bfloat16"]
FWD_TOL = {"float32": 1e-5, "bfloat16": 2e-2}
BWD_TOL = {"float32": 1e-4, "bfloat16": 2e-2}
C, A = math.sqrt(2.0 / math.pi), 0.044715


def rounded(x: np.ndarray, dtype: str) -> tf.Tensor:
    """x in `dtype` (the kernel's input)."""
    return tf.cast(tf.constant(x, tf.float32), dtype)


def f64(t) -> np.ndarray:
    return ops.convert_to_numpy(ops.cast(t, "float32")).astype(np.float64)


def assert_close(got, ref: np.ndarray, tol: float) -> None:
    got = f64(got)
    assert got.shape == ref.shape
    assert np.isfinite(got).all()
    err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def grads(fn, *inputs, upstream=None):
    """(value, d<Σ upstream·value>/d inputs) by tf.GradientTape, eagerly."""
    inputs = [tf.convert_to_tensor(x) for x in inputs]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        y = fn(*inputs)
        target = y if upstream is None else tf.cast(y, tf.float32) * tf.cast(upstream, tf.float32)
        target = tf.reduce_sum(tf.cast(target, tf.float32))
    return y, tape.gradient(target, inputs)


# ----------------------------------------------------------------------------- NumPy references
def np_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(C * (x + A * x**3)))


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_layer_norm(x, gamma, beta, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * gamma + beta


def np_cross_entropy(labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    return lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]


# ----------------------------------------------------------------------------------------- GELU
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_forward_and_backward(dtype: str) -> None:
    x = rounded(RNG.normal(0.0, 2.0, (4, 9, 64)), dtype)
    dy = rounded(RNG.normal(size=(4, 9, 64)), dtype)
    y, (dx,) = grads(kernels.gelu, x, upstream=dy)
    assert y.dtype == dx.dtype == dtype
    xd = f64(x)
    assert_close(y, np_gelu(xd), FWD_TOL[dtype])
    h = 1e-6  # central differences of the float64 NumPy GELU: a reference independent of the formula
    assert_close(dx, f64(dy) * (np_gelu(xd + h) - np_gelu(xd - h)) / (2 * h), BWD_TOL[dtype])


def test_gelu_is_the_tanh_approximation_keras_uses() -> None:
    x = tf.constant(RNG.normal(0.0, 3.0, (1000,)), tf.float32)
    expected = f64(keras.activations.gelu(x, approximate=True))
    np.testing.assert_allclose(f64(kernels.gelu(x)), expected, atol=1e-6)


# ------------------------------------------------------------------------------ masked softmax
def causal(t: int, s: int) -> np.ndarray:
    return np.arange(s)[None, :] <= np.arange(s - t, s)[:, None]  # the last t queries of s positions


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "s"), [(16, 16), (8, 16), (1, 16)])  # full, a query block, one decode step
def test_masked_softmax_forward_and_backward(dtype: str, t: int, s: int) -> None:
    scale = 1.0 / math.sqrt(32)
    scores = rounded(RNG.normal(0.0, 8.0, (2, 3, t, s)), dtype)
    dp = rounded(RNG.normal(size=(2, 3, t, s)), dtype)
    mask = causal(t, s)
    p, (ds,) = grads(lambda z: kernels.masked_softmax(z, mask, scale), scores, upstream=dp)
    assert p.dtype == ds.dtype == dtype

    z = np.where(mask, f64(scores) * scale, -np.inf)
    ref_p = np_softmax(z)
    assert_close(p, ref_p, FWD_TOL[dtype])
    assert not f64(p)[..., ~mask].any()  # masked keys: exactly 0
    dpd = f64(dp)
    ref_ds = scale * ref_p * (dpd - (dpd * ref_p).sum(-1, keepdims=True))  # the softmax Jacobian-vector product
    assert_close(ds, ref_ds, BWD_TOL[dtype])

    # and TensorFlow's own autodiff of the plain math, in float64
    _, (auto,) = grads(lambda z: tf.nn.softmax(tf.where(mask, z * scale, -np.inf)), tf.constant(f64(scores)),
                       upstream=tf.constant(dpd))
    assert_close(ds, auto.numpy(), BWD_TOL[dtype])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_masked_softmax_is_safe_in_half_precision(dtype: str) -> None:
    """Scores near the float16 limit, masked keys with the largest scores, and a fully masked row:
    no NaN or inf, masked keys exactly 0, a fully masked row uniform (not NaN); gradients finite."""
    scores = np.full((1, 1, 4, 4), -30000.0, np.float32)
    scores[..., 0] = 30000.0
    scores[..., 3] = 60000.0  # the largest score, visible to query 3 only
    mask = causal(4, 4)
    mask_rows = np.concatenate([mask, np.zeros((1, 4), bool)])  # row 4: nothing visible
    s = tf.cast(tf.constant(np.concatenate([scores, scores[..., :1, :]], axis=2)), dtype)
    p, (ds,) = grads(lambda z: kernels.masked_softmax(z, mask_rows, 0.5), s, upstream=tf.ones_like(s))
    p, ds = f64(p)[0, 0], f64(ds)
    assert np.isfinite(p).all() and np.isfinite(ds).all()
    np.testing.assert_array_equal(p[:3], np.eye(4)[[0, 0, 0]])  # queries 0..2: all mass on key 0
    np.testing.assert_array_equal(p[3], [0, 0, 0, 1])
    np.testing.assert_allclose(p[4], 0.25)


# ----------------------------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_forward_and_backward(dtype: str) -> None:
    d, eps = 64, 1e-5
    x = rounded(RNG.normal(0.0, 3.0, (3, 7, d)) + 2.0, dtype)
    gamma = tf.constant(RNG.normal(1.0, 0.3, d), tf.float32)
    beta = tf.constant(RNG.normal(0.0, 0.3, d), tf.float32)
    dy = rounded(RNG.normal(size=(3, 7, d)), dtype)
    y, (dx, dg, db) = grads(lambda x, g, b: kernels.layer_norm(x, g, b, eps), x, gamma, beta, upstream=dy)
    assert y.dtype == dx.dtype == dtype and dg.dtype == db.dtype == "float32"
    assert_close(y, np_layer_norm(f64(x), f64(gamma), f64(beta), eps), FWD_TOL[dtype])

    # reference gradients: TensorFlow's autodiff of the plain LayerNorm, in float64
    def plain(x, g, b):
        mu = tf.reduce_mean(x, -1, keepdims=True)
        return (x - mu) / tf.sqrt(tf.reduce_mean((x - mu) ** 2, -1, keepdims=True) + eps) * g + b

    _, refs = grads(plain, *(tf.constant(f64(t)) for t in (x, gamma, beta)), upstream=tf.constant(f64(dy)))
    for got, ref in zip((dx, dg, db), refs, strict=True):
        assert_close(got, ref.numpy(), BWD_TOL[dtype])


def test_layer_norm_large_mean_in_float16() -> None:
    """Statistics in float32: a mean of 3·10⁴ with unit spread still normalises (float16 x² overflows)."""
    x = tf.cast(tf.constant(RNG.normal(30000.0, 50.0, (2, 64)), tf.float32), "float16")
    y, (dx,) = grads(lambda x: kernels.layer_norm(x, tf.ones(64), tf.zeros(64), 1e-5), x)
    assert y.dtype == "float16" and np.isfinite(f64(y)).all() and np.isfinite(f64(dx)).all()
    np.testing.assert_allclose(f64(y), np_layer_norm(f64(x), 1.0, 0.0, 1e-5), atol=1e-2)


# ------------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_forward_and_backward(dtype: str) -> None:
    b, t, v = 3, 11, 97
    logits = rounded(RNG.normal(0.0, 3.0, (b, t, v)), dtype)
    labels = RNG.integers(0, v, (b, t)).astype(np.int32)
    loss, (dz,) = grads(lambda z: kernels.cross_entropy(labels, z), logits)
    assert loss.dtype == "float32" and loss.shape == () and dz.dtype == dtype
    zd = f64(logits)
    per_token = np_cross_entropy(labels, zd)
    assert_close(loss, np.array(per_token.mean()), FWD_TOL["float32"])  # computed in float32 either way
    onehot = np.eye(v)[labels]
    assert_close(dz, (np_softmax(zd) - onehot) / (b * t), BWD_TOL[dtype])

    dl = RNG.normal(size=(b, t))  # per-position losses with an arbitrary upstream gradient
    losses, (dz_none,) = grads(lambda z: kernels.cross_entropy(labels, z, reduction="none"), logits,
                               upstream=tf.constant(dl, tf.float32))
    assert losses.shape == (b, t) and losses.dtype == "float32"
    assert_close(losses, per_token, FWD_TOL["float32"])
    assert_close(dz_none, (np_softmax(zd) - onehot) * dl[..., None], BWD_TOL[dtype])


def test_cross_entropy_equals_keras_sparse_categorical_crossentropy() -> None:
    logits = tf.constant(RNG.normal(0.0, 4.0, (4, 16, 200)), tf.float32)
    labels = tf.constant(RNG.integers(0, 200, (4, 16)), tf.int32)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    loss, (dz,) = grads(lambda z: kernels.cross_entropy(labels, z), logits)
    ref, (ref_dz,) = grads(lambda z: loss_fn(labels, z), logits)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    np.testing.assert_allclose(dz.numpy(), ref_dz.numpy(), rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="reduction must be one of"):
        kernels.cross_entropy(labels, logits, reduction="sum")
    with pytest.raises(ValueError, match=r"labels \(4,\) and logits \(4, 16, 200\) do not match"):
        kernels.cross_entropy(labels[:, 0], logits)


# ------------------------------------------------------------------ eager, graph and XLA
CASES = {
    "gelu": lambda x: kernels.gelu(x),
    "softmax": lambda x: kernels.masked_softmax(x, causal(16, 16), 0.3),
    "layer_norm": lambda x: kernels.layer_norm(x, tf.fill([16], 1.5), tf.fill([16], 0.2), 1e-5),
    "cross_entropy": lambda x: kernels.cross_entropy(tf.reshape(tf.range(32) % 5, (2, 16)), x),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_values_eager_graph_and_xla(name: str) -> None:
    fused = CASES[name]
    x = tf.constant(RNG.normal(0.0, 2.0, (2, 16, 16)), tf.float32)
    w = tf.constant(RNG.normal(size=(2, 16, 16)) if name != "cross_entropy" else 1.0, tf.float32)

    def value_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(fused(x), tf.float32) * w)
        return loss, tape.gradient(loss, x)

    eager = value_and_grad(x)
    for compiled in (tf.function(value_and_grad), tf.function(value_and_grad, jit_compile=True)):
        for got, ref in zip(compiled(x), eager, strict=True):
            assert_close(got, f64(ref), FWD_TOL["float32"])
