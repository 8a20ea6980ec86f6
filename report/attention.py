"""Attention probabilities of a trained tfgpt model, recomputed from its weights (for the report's figure).

The model's own layers never return their attention probabilities, so this module runs the stack by
hand: h₀ = embedding(x), h_l = block_l(h_{l−1}) with the model's own layers, and for a chosen block it
recomputes, in NumPy from the block's weights,

    a = LN₁(h)                                   (pre-LN; the block input itself for post-LN)
    [Q | K | V] = a W_QKV + b_QKV,   split into H heads of d_k columns
    P_h = softmax(Q_h K_hᵀ / √d_k + M),   M_ij = 0 if j ≤ i else −∞
    MHA = Concat(P_1 V_1, …, P_H V_H) W_O + b_O

and checks that LN₁ and MHA equal what the block's own `ln_1` and `attn` layers return for the same
input (`AttentionMismatch` otherwise), so the probabilities P_h drawn in the figure are provably the
ones the model computes. Only weight attributes are read (`block.ln_1.gamma/beta/epsilon`,
`block.attn.qkv.kernel/bias`, `block.attn.out_proj.kernel/bias`), never the layers' internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Largest |difference| allowed between the recomputed and the layer's own output, relative to the
#: largest |entry| of the layer's output (float32 arithmetic in both).
TOLERANCE = 1e-4


class AttentionMismatch(AssertionError):
    """The recomputed attention does not reproduce the model's own layer output."""


@dataclass
class LayerAttention:
    """Attention of one block on one token sequence."""

    layer: int  # 0-based block index
    probs: np.ndarray  # (H, T, T): P_h[i, j], query i, key j
    max_abs_diff: float  # recomputed MHA vs the layer's own output
    ln_max_abs_diff: float  # recomputed LN₁ vs the layer's own output
    scale: float  # max |MHA| of the layer's own output
    head_stats: list[dict[str, float]] = field(default_factory=list)


def _np(x: Any) -> np.ndarray:
    from keras import ops

    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, epsilon: float) -> np.ndarray:
    """LN(x) = γ ⊙ (x − μ)/√(σ² + ε) + β over the last axis."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return gamma * (x - mu) / np.sqrt(var + epsilon) + beta


def causal_attention(a: np.ndarray, w_qkv: np.ndarray, b_qkv: np.ndarray, w_o: np.ndarray, b_o: np.ndarray,
                     n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(MHA output (T, D), probabilities (H, T, T)) for one sequence a (T, D), from the weights."""
    t, d = a.shape
    d_k = d // n_heads
    qkv = (a @ w_qkv + b_qkv).reshape(t, 3, n_heads, d_k)  # columns [Q | K | V], head h at h·d_k …
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # each (T, H, d_k)
    scores = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(d_k)  # (H, T, T)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)  # M: key j ≤ query i
    scores -= scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    heads = np.einsum("hij,jhd->ihd", probs, v).reshape(t, d)  # Concat(head_1 … head_H)
    return heads @ w_o + b_o, probs


def head_statistics(probs: np.ndarray) -> list[dict[str, float]]:
    """Per head, averaged over the queries i ≥ 1 (query 0 can only see itself): the attention on the
    previous token (j = i−1), on the first position (j = 0, the end-of-text token that starts every
    story), on itself (j = i), and the mean distance i − j."""
    t = probs.shape[-1]
    rows = np.arange(1, t)
    dist = (np.arange(t)[:, None] - np.arange(t)[None, :]).clip(min=0)
    out = []
    for p in probs:
        out.append({
            "previous": float(p[rows, rows - 1].mean()),
            "first": float(p[rows, 0].mean()),
            "self": float(p[rows, rows].mean()),
            "mean_distance": float((p * dist)[rows].sum(-1).mean()),
        })
    return out


def attention_maps(model: Any, token_ids: list[int], layers: list[int]) -> list[LayerAttention]:
    """Recompute the attention probabilities of `layers` (0-based) of `model` (a tfgpt GPT, float32
    policy) on one sequence of token ids, each checked against the block's own output."""
    ids = np.asarray([token_ids], dtype=np.int32)
    x = model.embedding(ids)  # h₀ = E[x] + P[0 … T−1] (the embedding dropout is the identity here)
    wanted = set(layers)
    out: list[LayerAttention] = []
    for index, block in enumerate(model.blocks):
        if index in wanted:
            out.append(_check_block(block, x, index))
        x = block(x, training=False)  # h_l = DecoderBlock_l(h_{l−1})
        if index >= max(wanted):
            break
    missing = wanted - {a.layer for a in out}
    if missing:
        raise ValueError(f"layers {sorted(missing)} not in a {len(model.blocks)}-layer model")
    return out


def _bias(dense: Any) -> np.ndarray | float:
    return 0.0 if dense.bias is None else _np(dense.bias)


def _check_block(block: Any, x: Any, index: int) -> LayerAttention:
    x_np = _np(x)[0]
    pre_ln = block.norm_position != "post"
    if pre_ln:
        ln = block.ln_1
        a = layer_norm(x_np, _np(ln.gamma), _np(ln.beta), float(ln.epsilon))
        a_layer = block.ln_1(x)
        ln_diff = float(np.abs(a - _np(a_layer)[0]).max())
    else:  # post-LN: MHA reads the block input itself
        a, a_layer, ln_diff = x_np, x, 0.0
    att = block.attn
    y, probs = causal_attention(a, _np(att.qkv.kernel), _bias(att.qkv), _np(att.out_proj.kernel), _bias(att.out_proj),
                                int(block.n_heads))
    y_layer = _np(att(a_layer, training=False))[0]
    diff, scale = float(np.abs(y - y_layer).max()), float(np.abs(y_layer).max())
    if not diff <= TOLERANCE * max(scale, 1.0) or not ln_diff <= TOLERANCE * max(float(np.abs(a).max()), 1.0):
        raise AttentionMismatch(
            f"block {index}: recomputed attention differs from the layer's output by {diff:.3g} (LN₁ {ln_diff:.3g}; "
            f"allowed {TOLERANCE:g} x {max(scale, 1.0):.3g}): the weight layout read here no longer matches tfgpt/layers.py"
        )
    return LayerAttention(index, probs, diff, ln_diff, scale, head_statistics(probs))
