"""The transformer, written out: every component of a GPT as its own Keras layer.

Symbols (the report uses the same): B batch, T sequence length, S cache length, D = d_model,
H = n_heads, d_k = D/H, F = d_ff, V = vocab_size, L = n_layers. Shapes are given as (B, T, D) etc.

The attention, feed-forward and decoder-block layers are built from the one `GPTConfig` (nanoGPT's
`Block(config)`): the hyperparameters are listed once, in tfgpt/config.py, and `get_config` is
`{"config": config.to_dict()}`. Their element-wise and row-wise math (LayerNorm, GELU, masked softmax)
runs in the fused kernels of `tfgpt.kernels` (hand-written gradients).

Mixed precision: matmuls run in the layer's compute dtype (e.g. bfloat16); the softmax, the
LayerNorm statistics and (in the model) the logits are computed in float32.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import ops

from tfgpt import kernels
from tfgpt.config import GPTConfig

_PACKAGE = "tfgpt"
#: GPT-2 initialisation: weights ~ N(0, 0.02²); the residual output projections use `residual_init_std`.
INIT_STD = 0.02
#: Query row blocks of the causal attention (2 skips the fully masked quarter of QKᵀ; 4 measured no
#: better, bench/RESULTS.md).
QUERY_BLOCKS = 2


def _normal(std: float) -> keras.initializers.Initializer:
    return keras.initializers.RandomNormal(mean=0.0, stddev=std)


def as_config(config: GPTConfig | dict[str, Any]) -> GPTConfig:
    """A GPTConfig from a GPTConfig or its `to_dict()` form (as `from_config` passes it)."""
    return config if isinstance(config, GPTConfig) else GPTConfig.from_dict(dict(config))


def residual_init_std(config: GPTConfig) -> float:
    """GPT-2's std of the residual output projections (W_O, W₂): 0.02/√(2L)."""
    return INIT_STD / math.sqrt(2 * config.n_layers)


class _ConfigLayer(keras.layers.Layer):
    """A layer whose hyperparameters are one GPTConfig; `get_config` round-trips it."""

    def __init__(self, config: GPTConfig | dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = as_config(config)

    def get_config(self) -> dict:
        return {**super().get_config(), "config": self.config.to_dict()}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LayerNorm(keras.layers.Layer):
    """Layer normalisation over the last axis.

        LN(x) = γ ⊙ (x − μ) / √(σ² + ε) + β,   μ = mean(x), σ² = mean((x − μ)²) over D.

    γ and β are float32 variables (never autocast); μ, σ² and the normalisation are computed in
    float32 and the result is cast back to the compute dtype (`kernels.layer_norm`, whose backward
    reuses μ and 1/σ).

    Input (..., D) -> output (..., D).
    """

    def __init__(self, epsilon: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape: tuple) -> None:
        dim = input_shape[-1]
        self.gamma = self.add_weight(name="gamma", shape=(dim,), initializer="ones", autocast=False)
        self.beta = self.add_weight(name="beta", shape=(dim,), initializer="zeros", autocast=False)

    def call(self, x):
        return kernels.layer_norm(ops.cast(x, self.compute_dtype), self.gamma, self.beta, self.epsilon)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}


def sinusoidal_table(length: int, dim: int) -> np.ndarray:
    """PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(pos / 10000^(2i/D)); shape (length, D)."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    table = np.zeros((length, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(pos * inv_freq)
    table[:, 1::2] = np.cos(pos * inv_freq)
    return table.astype(np.float32)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token embedding plus position encoding.

        h₀ = E[x] + P[p₀ … p₀+T−1]

    E ∈ ℝ^{V×D} is the token embedding matrix (also the output projection when embeddings are tied:
    logits = h Eᵀ, see `project`). P ∈ ℝ^{T_max×D} is either learned or the fixed sinusoidal table
    PE(pos, 2i) = sin(pos/10000^{2i/D}), PE(pos, 2i+1) = cos(pos/10000^{2i/D}). p₀ is `start_index`,
    the position of the first token (non-zero when decoding with a key/value cache).

    Lookups use `ops.take` (a gather, so the position may be a traced value without recompiling).

    Input (B, T) int token ids -> output (B, T, D).
    """

    def __init__(self, vocab_size: int, context: int, d_model: int, position_encoding: str = "learned",
                 init_std: float = INIT_STD, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if position_encoding not in ("learned", "sinusoidal"):
            raise ValueError(f"position_encoding must be 'learned' or 'sinusoidal', got {position_encoding!r}")
        self.vocab_size = int(vocab_size)
        self.context = int(context)
        self.d_model = int(d_model)
        self.position_encoding = position_encoding
        self.init_std = float(init_std)
        self._sinusoid = sinusoidal_table(self.context, self.d_model) if position_encoding == "sinusoidal" else None

    def build(self, input_shape: tuple | None = None) -> None:
        self.token_embeddings = self.add_weight(name="token_embeddings", shape=(self.vocab_size, self.d_model),
                                                initializer=_normal(self.init_std))
        if self.position_encoding == "learned":
            self.position_embeddings = self.add_weight(name="position_embeddings", shape=(self.context, self.d_model),
                                                       initializer=_normal(self.init_std))

    def position_table(self):
        """P, shape (T_max, D)."""
        if self.position_encoding == "learned":
            return self.position_embeddings
        return ops.convert_to_tensor(self._sinusoid, dtype=self.compute_dtype)

    def call(self, token_ids, start_index=0):
        seq_len = ops.shape(token_ids)[-1]
        static_len = token_ids.shape[-1]
        known = isinstance(static_len, int) and isinstance(start_index, int)
        if known and start_index + static_len > self.context:
            # Out-of-range positions would fail deep in a gather on CPU and read zeros on GPU.
            raise ValueError(
                f"{static_len} tokens from position {start_index} exceed the context of {self.context}; "
                f"feed at most the last {self.context - start_index} tokens (or use a larger context)"
            )
        tok = ops.take(self.token_embeddings, token_ids, axis=0)  # (B, T, D)
        positions = ops.arange(seq_len, dtype="int32") + ops.cast(start_index, "int32")
        pos = ops.take(self.position_table(), positions, axis=0)  # (T, D)
        return ops.cast(tok, self.compute_dtype) + ops.cast(pos, self.compute_dtype)

    def project(self, h):
        """Tied output projection: logits = h Eᵀ, (B, T, D) -> (B, T, V), in h's dtype."""
        return ops.matmul(h, ops.transpose(ops.cast(self.token_embeddings, h.dtype)))

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "context": self.context,
            "d_model": self.d_model,
            "position_encoding": self.position_encoding,
            "init_std": self.init_std,
        }


def causal_mask(query_len, key_len, start_index=0):
    """Boolean (T, S) mask, True where query i (at absolute position start_index + i) may attend to
    key j: j ≤ start_index + i. Equivalent to the additive mask M_ij = 0 if allowed else −∞."""
    q_pos = ops.arange(query_len, dtype="int32")[:, None] + ops.cast(start_index, "int32")
    k_pos = ops.arange(key_len, dtype="int32")[None, :]
    return k_pos <= q_pos


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CausalSelfAttention(_ConfigLayer):
    """Masked multi-head scaled dot-product self-attention.

        [Q | K | V] = x W_QKV + b_QKV            (one fused projection, W_QKV ∈ ℝ^{D×3D})
        Attention(Q, K, V) = softmax(Q Kᵀ / √d_k + M) V,   M_ij = 0 if key j ≤ query i, else −∞
        head_h = Attention(Q_h, K_h, V_h),   h = 1 … H
        MHA(x) = Dropout(Concat(head_1, …, head_H) W_O + b_O)

    `call` reads as these lines: Q, K, V split into H heads of size d_k, the heads (`attention_fast_path`:
    the equation, computed the fast way), W_O and the residual dropout. `attend` is the equation itself:
    Q Kᵀ, the mask, the softmax, the product with V (scale, mask and float32 softmax are one fused kernel,
    `kernels.masked_softmax`: masked scores become the most negative float32, so nothing overflows in
    half precision and masked keys get probability exactly 0).
    Dropout: rate `config.attention_dropout` on the attention probabilities (nanoGPT's `attn_dropout`),
    rate `config.dropout` on the output (the residual dropout, nanoGPT's `resid_dropout`).

    Incremental decoding: `cache` is this layer's (Kᵀ, V) pair, Kᵀ (B·H, d_k, S) and V (B·H, S, d_k),
    holding the keys and values of earlier positions (`init_cache`); the T new keys/values are written
    at slots `cache_index` … `cache_index`+T−1 and the queries attend over all S slots under the same
    causal rule j ≤ cache_index + i; returns (y, updated (Kᵀ, V)).

    Input (B, T, D) -> output (B, T, D).
    """

    def __init__(self, config: GPTConfig | dict[str, Any], **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        self.d_model, self.n_heads, self.head_dim = c.d_model, c.n_heads, c.head_dim
        self.qkv = keras.layers.Dense(
            3 * c.d_model, use_bias=c.use_bias, kernel_initializer=_normal(INIT_STD), name="qkv",
            dtype=self.dtype_policy,
        )
        self.out_proj = keras.layers.Dense(
            c.d_model, use_bias=c.use_bias, kernel_initializer=_normal(residual_init_std(c)), name="out_proj",
            dtype=self.dtype_policy,
        )
        self.probs_dropout = keras.layers.Dropout(c.attention_dropout, dtype=self.dtype_policy)
        self.resid_dropout = keras.layers.Dropout(c.dropout, dtype=self.dtype_policy)

    def build(self, input_shape: tuple) -> None:
        self.qkv.build(input_shape)
        self.out_proj.build(tuple(input_shape[:-1]) + (self.d_model,))

    def call(self, x, training=None, cache=None, cache_index=None):
        batch, seq_len = ops.shape(x)[0], ops.shape(x)[1]
        qkv = ops.reshape(self.qkv(x), (batch, seq_len, 3, self.n_heads, self.head_dim))  # (B, T, 3, H, d_k)
        # unstack, not qkv[:, :, i]: strided-slice gradients each write a zero-filled copy of the whole
        # tensor (measured in bench/RESULTS.md); unstack's gradient is one stack.
        q, k, v = ops.unstack(qkv, 3, axis=2)  # Q, K, V: each (B, T, H, d_k)
        heads, cache = self.attention_fast_path(q, k, v, training, cache, cache_index)  # (B, T, H, d_k)
        y = self.out_proj(ops.reshape(heads, (batch, seq_len, self.d_model)))  # Concat(head_1 … head_H) W_O
        y = self.resid_dropout(y, training=training)
        return y if cache is None else (y, cache)

    def attend(self, q, kt, v, mask, training=None):
        """softmax(Q Kᵀ/√d_k + M) V for q (B·H, T, d_k), kt = Kᵀ (B·H, d_k, S), v (B·H, S, d_k),
        mask (T, S) bool (True = may attend, i.e. M = 0) -> (B·H, T, d_k)."""
        scores = ops.matmul(q, kt)  # Q Kᵀ (B·H, T, S), compute dtype
        probs = kernels.masked_softmax(scores, mask, 1.0 / math.sqrt(self.head_dim))  # float32 inside
        probs = self.probs_dropout(probs, training=training)
        return ops.matmul(probs, v)  # (B·H, T, d_k)

    # ------------------------------------------------------------------ the fast path
    def attention_fast_path(self, q, k, v, training=None, cache=None, cache_index=None):
        """The heads softmax(Q Kᵀ/√d_k + M) V of q, k, v (B, T, H, d_k) -> ((B, T, H, d_k), updated cache
        or None), computed the fast way:

        * `config.fast_attention`: `keras.ops.dot_product_attention`, the backend's fused kernel (not
          while training with attention dropout, which it does not support, nor with a cache);
        * otherwise the heads are folded into the batch, Q and V as (B·H, T, d_k) and K as Kᵀ
          (B·H, d_k, T), so Q Kᵀ and P V are plain 3-D batched matmuls (a transposed operand, or a 4-D
          one that XLA reshapes, makes XLA copy the key/value cache at every decoding step), and `attend`
          runs on them: over the cache (`_cached`) or, without one, in query blocks (`_query_blocks`).
        """
        batch, seq_len = ops.shape(q)[0], ops.shape(q)[1]
        dropout_active = bool(training) and self.config.attention_dropout > 0
        if self.config.fast_attention and cache is None and not dropout_active:
            return ops.dot_product_attention(q, k, v, is_causal=True), None

        rows = batch * self.n_heads
        q = ops.reshape(ops.transpose(q, (0, 2, 1, 3)), (rows, seq_len, self.head_dim))  # (B·H, T, d_k)
        v = ops.reshape(ops.transpose(v, (0, 2, 1, 3)), (rows, seq_len, self.head_dim))
        kt = ops.reshape(ops.transpose(k, (0, 2, 3, 1)), (rows, self.head_dim, seq_len))  # Kᵀ (B·H, d_k, T)
        if cache is None:
            y = self._query_blocks(q, kt, v, training)
        else:
            y, cache = self._cached(q, kt, v, cache, cache_index, training)
        y = ops.reshape(y, (batch, self.n_heads, seq_len, self.head_dim))
        return ops.transpose(y, (0, 2, 1, 3)), cache  # (B, T, H, d_k)

    def _query_blocks(self, q, kt, v, training=None):
        """Causal attention of T queries over the same T keys: q, v (B·H, T, d_k), kt (B·H, d_k, T)
        -> (B·H, T, d_k). With a static T divisible by `QUERY_BLOCKS`, the queries are cut into row
        blocks and block i attends only to the keys it can see, skipping the fully masked upper-right
        blocks of the (T, T) score matrix."""
        seq_len = q.shape[1]
        if not isinstance(seq_len, int) or seq_len % QUERY_BLOCKS or seq_len < 2 * QUERY_BLOCKS:
            length = ops.shape(q)[1]
            return self.attend(q, kt, v, causal_mask(length, length), training=training)
        rows = seq_len // QUERY_BLOCKS
        outputs = []
        # split (not slicing): the gradient of a split is one concat, a slice's writes a zero-filled copy
        for i, q_i in enumerate(ops.split(q, QUERY_BLOCKS, axis=1)):
            end = (i + 1) * rows  # block i (queries i·rows … end−1) sees keys 0 … end−1
            kt_i = kt if end == seq_len else ops.split(kt, [end], axis=2)[0]
            v_i = v if end == seq_len else ops.split(v, [end], axis=1)[0]
            mask = np.arange(end)[None, :] <= np.arange(i * rows, end)[:, None]  # (rows, end)
            outputs.append(self.attend(q_i, kt_i, v_i, mask, training=training))
        return ops.concatenate(outputs, axis=1)

    def _cached(self, q, kt, v, cache, cache_index, training=None):
        """Write the T new keys Kᵀ (B·H, d_k, T) and values (B·H, T, d_k) into the (Kᵀ, V) cache at slots
        cache_index … with `slice_update` (in place under XLA, at a traced index) and attend over all S
        slots: -> ((B·H, T, d_k), updated (Kᵀ, V))."""
        keys_t, values = cache
        start = ops.cast(cache_index, "int32")
        zero = ops.zeros((), "int32")
        keys_t = ops.slice_update(keys_t, (zero, zero, start), ops.cast(kt, keys_t.dtype))  # (B·H, d_k, S)
        values = ops.slice_update(values, (zero, start, zero), ops.cast(v, values.dtype))  # (B·H, S, d_k)
        mask = causal_mask(ops.shape(q)[1], ops.shape(values)[1], start)
        y = self.attend(q, ops.cast(keys_t, q.dtype), ops.cast(values, q.dtype), mask, training=training)
        return y, (keys_t, values)

    def init_cache(self, batch_size, length, dtype: str | None = None) -> tuple:
        """A zeroed (Kᵀ, V) cache of S = `length` slots: Kᵀ (B·H, d_k, S), V (B·H, S, d_k), in the
        compute dtype by default."""
        dtype = dtype or self.compute_dtype
        rows = batch_size * self.n_heads
        return ops.zeros((rows, self.head_dim, length), dtype), ops.zeros((rows, length, self.head_dim), dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FeedForward(_ConfigLayer):
    """Position-wise feed-forward network.

        FFN(x) = Dropout(GELU(x W₁ + b₁) W₂ + b₂),   W₁ ∈ ℝ^{D×F}, W₂ ∈ ℝ^{F×D}

    GELU is GPT-2's tanh approximation, GELU(u) = ½u(1 + tanh(√(2/π)(u + 0.044715u³))), one fused
    kernel (`kernels.gelu`). Dropout rate `config.dropout`.

    Input (B, T, D) -> output (B, T, D).
    """

    def __init__(self, config: GPTConfig | dict[str, Any], **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        self.fc_in = keras.layers.Dense(
            c.d_ff, use_bias=c.use_bias, kernel_initializer=_normal(INIT_STD), name="fc_in",
            dtype=self.dtype_policy,
        )
        self.fc_out = keras.layers.Dense(
            c.d_model, use_bias=c.use_bias, kernel_initializer=_normal(residual_init_std(c)), name="fc_out",
            dtype=self.dtype_policy,
        )
        self.out_dropout = keras.layers.Dropout(c.dropout, dtype=self.dtype_policy)

    def build(self, input_shape: tuple) -> None:
        self.fc_in.build(input_shape)
        self.fc_out.build(tuple(input_shape[:-1]) + (self.config.d_ff,))

    def call(self, x, training=None):
        h = kernels.gelu(self.fc_in(x))  # (B, T, F)
        return self.out_dropout(self.fc_out(h), training=training)  # (B, T, D)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DecoderBlock(_ConfigLayer):
    """One decoder block: self-attention and feed-forward sub-layers with residual connections.

    Pre-LN (GPT-2, `norm_position="pre"`), as nanoGPT's `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`:
        x ← x + MHA(LN₁(x))
        x ← x + FFN(LN₂(x))
    Post-LN (Vaswani et al., `norm_position="post"`, `_post_ln`):
        x ← LN₁(x + MHA(x))
        x ← LN₂(x + FFN(x))

    MHA is `CausalSelfAttention`, FFN is `FeedForward` (each ends in its residual dropout), built from the
    same `config`.
    With a `cache` (this block's attention cache: Kᵀ and V, see `CausalSelfAttention`), returns
    (x, updated cache).

    Input (B, T, D) -> output (B, T, D).
    """

    def __init__(self, config: GPTConfig | dict[str, Any], **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        self.d_model, self.n_heads, self.norm_position = c.d_model, c.n_heads, c.norm_position
        policy = self.dtype_policy
        self.ln_1 = LayerNorm(c.layer_norm_epsilon, name="ln_1", dtype=policy)
        self.attn = CausalSelfAttention(c, name="attn", dtype=policy)
        self.ln_2 = LayerNorm(c.layer_norm_epsilon, name="ln_2", dtype=policy)
        self.ffn = FeedForward(c, name="ffn", dtype=policy)

    def build(self, input_shape: tuple) -> None:
        for layer in (self.ln_1, self.attn, self.ln_2, self.ffn):
            layer.build(input_shape)

    def mha(self, x, training, cache, cache_index):
        """(MHA(x), updated cache): one return type, with or without a cache (None without one)."""
        if cache is None:
            return self.attn(x, training=training), None
        return self.attn(x, training=training, cache=cache, cache_index=cache_index)

    def call(self, x, training=None, cache=None, cache_index=None):
        if self.norm_position == "post":
            return self._post_ln(x, training, cache, cache_index)
        a, cache = self.mha(self.ln_1(x), training, cache, cache_index)
        x = x + a
        x = x + self.ffn(self.ln_2(x), training=training)
        return x if cache is None else (x, cache)

    def _post_ln(self, x, training, cache, cache_index):
        a, cache = self.mha(x, training, cache, cache_index)
        x = self.ln_1(x + a)
        x = self.ln_2(x + self.ffn(x, training=training))
        return x if cache is None else (x, cache)
