"""Fused kernels with hand-written gradients: GELU, masked softmax, LayerNorm, next-token cross-entropy.

These are the element-wise and row-wise parts of a GPT step; the matmuls around them stay with the
caller. On the TensorFlow backend each kernel is a `tf.custom_gradient` whose backward pass reuses what
the forward pass kept (the input for GELU, the probabilities P for softmax, μ and 1/σ for LayerNorm,
log Σexp for the loss), and where it measured faster on CPU the forward and backward are each ONE
XLA-compiled function (`jit_compile=True`, a "jit island"): a chain of element-wise ops becomes one pass
over memory, while the matmuls stay on TensorFlow's oneDNN kernels (which use AMX for bfloat16 on CPU;
XLA's CPU dot does not). The automatic gradient of a jit function is slow, hence hand-written backward
passes (bench/RESULTS.md). Inside an outer XLA function the islands are simply inlined.

tfgpt runs on the TensorFlow backend only (the decoding loop, the data pipeline and the export are
TensorFlow), so there is no second, portable form of these kernels.

Precision: statistics, softmax and the loss are computed in float32 whatever the input dtype; results
and input gradients are cast back to the input's dtype; LayerNorm's γ, β (float32 variables) get float32
gradients. Masked scores are set to the most negative float32 (not −∞, not −1e9 in half precision), so a
fully masked row gives a uniform row instead of NaN and nothing overflows in float16.

This module knows nothing of layers or models. The readable reference math lives in tests/test_kernels.py.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

_C = math.sqrt(2.0 / math.pi)  # GELU tanh approximation: ½u(1 + tanh(C(u + A·u³)))
_A = 0.044715
#: Fill value of masked scores (float32; the softmax is always float32).
MASKED = float(np.finfo(np.float32).min)
REDUCTIONS = ("mean", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# ============================================================================ forward and backward passes
def _jit(fn):
    return tf.function(fn, jit_compile=True, reduce_retracing=True)


def _rows(t):
    """(..., N) -> (rows, N), for sums over every leading axis (the γ and β gradients)."""
    return tf.reshape(t, (-1, tf.shape(t)[-1]))


# ------------------------------------------------------------------ GELU
def _gelu_core(u):
    return 0.5 * u * (1.0 + tf.tanh(_C * (u + _A * u * u * u)))


def _gelu_slope(u):
    t = tf.tanh(_C * (u + _A * u * u * u))
    return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * _C * (1.0 + 3.0 * _A * u * u)


@_jit
def _gelu_fwd(x):
    return tf.cast(_gelu_core(tf.cast(x, tf.float32)), x.dtype)


@_jit
def _gelu_bwd(dy, x):
    return tf.cast(tf.cast(dy, tf.float32) * _gelu_slope(tf.cast(x, tf.float32)), x.dtype)


@tf.custom_gradient
def _gelu(x):
    return _gelu_fwd(x), lambda dy: _gelu_bwd(dy, x)


# ------------------------------------------------------------------ masked softmax
@_jit
def _softmax_fwd(scores, mask, scale):
    z = tf.where(mask, tf.cast(scores, tf.float32) * scale, MASKED)
    return tf.cast(tf.nn.softmax(z, axis=-1), scores.dtype)


@_jit
def _softmax_bwd(dp, p, scale):
    pf, dpf = tf.cast(p, tf.float32), tf.cast(dp, tf.float32)
    ds = pf * (dpf - tf.reduce_sum(dpf * pf, axis=-1, keepdims=True)) * scale
    return tf.cast(ds, dp.dtype)


# ------------------------------------------------------------------ LayerNorm
# Plain TensorFlow ops, no jit island: XLA's CPU row reductions made the island slower than these
# (bench/RESULTS.md); the gain is the hand-written backward that reuses μ and 1/σ.
def _ln_fwd(x, gamma, beta, epsilon):
    xf = tf.cast(x, tf.float32)
    mu = tf.reduce_mean(xf, axis=-1, keepdims=True)
    xc = xf - mu
    rstd = tf.math.rsqrt(tf.reduce_mean(xc * xc, axis=-1, keepdims=True) + epsilon)
    return tf.cast(xc * rstd * gamma + beta, x.dtype), mu, rstd


def _ln_bwd(dy, x, gamma, mu, rstd):
    xhat = (tf.cast(x, tf.float32) - mu) * rstd
    dyf = tf.cast(dy, tf.float32)
    g = dyf * gamma
    dx = rstd * (g - tf.reduce_mean(g, axis=-1, keepdims=True)
                 - xhat * tf.reduce_mean(g * xhat, axis=-1, keepdims=True))
    return tf.cast(dx, x.dtype), tf.reduce_sum(_rows(dyf * xhat), axis=0), tf.reduce_sum(_rows(dyf), axis=0)


# ------------------------------------------------------------------ cross-entropy
@_jit
def _xent_fwd(logits, labels):
    lf = tf.cast(logits, tf.float32)
    lse = tf.reduce_logsumexp(lf, axis=-1)
    picked = tf.reduce_sum(lf * tf.one_hot(labels, tf.shape(lf)[-1], dtype=tf.float32), axis=-1)
    return lse - picked, lse


@_jit
def _xent_bwd(dl, logits, labels, lse):
    lf = tf.cast(logits, tf.float32)
    onehot = tf.one_hot(labels, tf.shape(lf)[-1], dtype=tf.float32)
    return tf.cast((tf.exp(lf - lse[..., None]) - onehot) * dl[..., None], logits.dtype)


# ============================================================================ the kernels
def gelu(x):
    """GELU, GPT-2's tanh approximation:

        GELU(x) = ½x(1 + tanh(√(2/π)(x + 0.044715x³)))
        GELU'(x) = ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²),   t = tanh(√(2/π)(x + 0.044715x³))

    x (..., F) any float dtype -> (..., F) in x's dtype, computed in float32. The backward recomputes t
    from the saved input (cheaper than storing it). Folding the preceding bias add into the kernel
    measured slower on CPU (the bias gradient, a column sum, is slow in XLA), so the caller adds it.
    """
    return _gelu(tf.convert_to_tensor(x))


def masked_softmax(scores, mask, scale=1.0):
    """Masked, scaled softmax over the last axis:

        P = softmax(where(mask, scale·S, MASKED)),   dS = scale · P ⊙ (dP − Σ_k dP_k P_k)

    scores S (..., T, K) any float dtype; mask bool, broadcastable to S, True where a query may attend
    to a key; scale a Python float (1/√d_k). Computed in float32, returned in S's dtype. Masked entries
    get probability exactly 0. The backward uses the kept P (in S's dtype), no recomputation.
    """
    mask = tf.cast(mask, tf.bool)
    scale = float(scale)

    @tf.custom_gradient
    def f(s):
        p = _softmax_fwd(s, mask, scale)
        return p, lambda dp: _softmax_bwd(dp, p, scale)

    return f(tf.convert_to_tensor(scores))


def layer_norm(x, gamma, beta, epsilon):
    """Layer normalisation over the last axis:

        y = γ ⊙ x̂ + β,   x̂ = (x − μ)·r,   μ = mean(x),   r = 1/√(mean((x − μ)²) + ε)
        dx = r · (g − mean(g) − x̂ · mean(g ⊙ x̂)),   g = γ ⊙ dy;   dγ = Σ dy ⊙ x̂,   dβ = Σ dy

    x (..., D) any float dtype; γ, β (D,) float32. μ and r (float32, one per row) are kept from the
    forward pass for the backward (keeping x̂ instead measured no faster and costs a float32 (..., D)
    tensor per LayerNorm); y and dx in x's dtype, dγ and dβ (sums over all leading axes) in float32.
    """
    epsilon = float(epsilon)

    @tf.custom_gradient
    def f(x, g, b):
        y, mu, rstd = _ln_fwd(x, g, b, epsilon)
        return y, lambda dy: _ln_bwd(dy, x, g, mu, rstd)

    return f(tf.convert_to_tensor(x), tf.cast(gamma, tf.float32), tf.cast(beta, tf.float32))


def cross_entropy(labels, logits, reduction="mean"):
    """Next-token cross-entropy from logits, `sparse_categorical_crossentropy(from_logits=True)`:

        ℓ = log Σ_v exp(z_v) − z_label,   dℓ/dz = softmax(z) − onehot(label)

    labels (...,) int token ids; logits (..., V) any float dtype. Returns float32: the mean over every
    position (reduction="mean", a scalar) or one loss per position ("none", shape (...,)). log Σexp is
    kept from the forward pass; the gradient is in the logits' dtype. Labels must lie in [0, V) (they
    are not checked inside the compiled kernel).
    """
    _check_reduction(reduction)
    labels, logits = tf.cast(labels, tf.int32), tf.convert_to_tensor(logits)
    if not labels.shape.is_compatible_with(logits.shape[:-1]):
        raise ValueError(f"labels {tuple(labels.shape)} and logits {tuple(logits.shape)} do not match: "
                         "labels must have the shape of logits without its last (vocabulary) axis")

    @tf.custom_gradient
    def f(z):
        losses, lse = _xent_fwd(z, labels)
        if reduction == "none":
            return losses, lambda dl: _xent_bwd(dl, z, labels, lse)
        count = tf.cast(tf.size(losses), tf.float32)

        def grad(dl):
            return _xent_bwd(tf.fill(tf.shape(losses), dl / count), z, labels, lse)

        return tf.reduce_sum(losses) / count, grad

    return f(logits)
