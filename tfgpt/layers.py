"""The transformer, written out: every component of a GPT as its own Keras layer.

Symbols (the report uses the same): B batch, T sequence length, S cache length, D = d_model,
H = n_heads, d_k = D/H, F = d_ff, V = vocab_size. Shapes are given as (B, T, D) etc.

Mixed precision: matmuls run in the layer's compute dtype (e.g. bfloat16); the softmax, the
LayerNorm statistics and (in the model) the logits are computed in float32.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import ops

_PACKAGE = "tfgpt"


def _normal(std: float) -> keras.initializers.Initializer:
    return keras.initializers.RandomNormal(mean=0.0, stddev=std)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LayerNorm(keras.layers.Layer):
    """Layer normalisation over the last axis.

        LN(x) = γ ⊙ (x − μ) / √(σ² + ε) + β,   μ = mean(x), σ² = mean((x − μ)²) over D.

    γ and β are float32 variables (never autocast); μ, σ² and the normalisation are computed in
    float32 and the result is cast back to the compute dtype.

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
        x32 = ops.cast(x, "float32")
        mu = ops.mean(x32, axis=-1, keepdims=True)
        var = ops.mean(ops.square(x32 - mu), axis=-1, keepdims=True)
        y = (x32 - mu) * ops.rsqrt(var + self.epsilon) * self.gamma + self.beta
        return ops.cast(y, self.compute_dtype)

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

    def __init__(
        self,
        vocab_size: int,
        context: int,
        d_model: int,
        position_encoding: str = "learned",
        init_std: float = 0.02,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if position_encoding not in ("learned", "sinusoidal"):
            raise ValueError(f"position_encoding must be 'learned' or 'sinusoidal', got {position_encoding!r}")
        self.vocab_size = int(vocab_size)
        self.context = int(context)
        self.d_model = int(d_model)
        self.position_encoding = position_encoding
        self.init_std = float(init_std)
        self._sinusoid = (
            sinusoidal_table(self.context, self.d_model) if position_encoding == "sinusoidal" else None
        )

    def build(self, input_shape: tuple | None = None) -> None:
        self.token_embeddings = self.add_weight(
            name="token_embeddings",
            shape=(self.vocab_size, self.d_model),
            initializer=_normal(self.init_std),
        )
        if self.position_encoding == "learned":
            self.position_embeddings = self.add_weight(
                name="position_embeddings",
                shape=(self.context, self.d_model),
                initializer=_normal(self.init_std),
            )

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
class CausalSelfAttention(keras.layers.Layer):
    """Masked multi-head scaled dot-product self-attention.

        [Q | K | V] = x W_QKV + b_QKV            (one fused projection, W_QKV ∈ ℝ^{D×3D})
        head_h = Attention(Q_h, K_h, V_h) = softmax(Q_h K_hᵀ / √d_k + M) V_h,   h = 1 … H
        y = Concat(head_1, …, head_H) W_O + b_O

    M is the causal mask: M_ij = 0 where key j ≤ query i, −∞ otherwise (applied in float32 with
    `where`, so no large constant ever meets half precision). The scores and the softmax are computed
    in float32; dropout (rate `attention_dropout`) is applied to the attention probabilities.

    `fast_attention=True` uses `keras.ops.dot_product_attention` (the backend's fused kernel) instead,
    except while training with attention dropout, which that kernel does not support.

    Incremental decoding: with `cache` (B, 2, S, H, d_k) holding keys and values of earlier
    positions, the new keys/values of the T input tokens are written at `cache_index` (with
    `slice_update`) and the queries attend over all S cached slots under the same causal rule
    j ≤ cache_index + i; returns (y, updated cache).

    Input (B, T, D) -> output (B, T, D).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        attention_dropout: float = 0.0,
        use_bias: bool = True,
        init_std: float = 0.02,
        output_init_std: float = 0.02,
        fast_attention: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = int(d_model)
        self.n_heads = int(n_heads)
        self.head_dim = self.d_model // self.n_heads
        self.attention_dropout = float(attention_dropout)
        self.use_bias = bool(use_bias)
        self.init_std = float(init_std)
        self.output_init_std = float(output_init_std)
        self.fast_attention = bool(fast_attention)
        self.qkv = keras.layers.Dense(
            3 * self.d_model,
            use_bias=self.use_bias,
            kernel_initializer=_normal(self.init_std),
            name="qkv",
            dtype=self.dtype_policy,
        )
        self.out_proj = keras.layers.Dense(
            self.d_model,
            use_bias=self.use_bias,
            kernel_initializer=_normal(self.output_init_std),
            name="out_proj",
            dtype=self.dtype_policy,
        )
        self.probs_dropout = keras.layers.Dropout(self.attention_dropout, dtype=self.dtype_policy)

    def build(self, input_shape: tuple) -> None:
        self.qkv.build(input_shape)
        self.out_proj.build(tuple(input_shape[:-1]) + (self.d_model,))

    def attend(self, q, k, v, mask, training=None):
        """softmax(Q Kᵀ/√d_k + M) V for q (B, T, H, d_k), k and v (B, S, H, d_k), mask (T, S) -> (B, T, H, d_k)."""
        scores = ops.einsum("bqhd,bkhd->bhqk", q, k)  # (B, H, T, S)
        scores = ops.cast(scores, "float32") * (1.0 / math.sqrt(self.head_dim))
        scores = ops.where(mask, scores, -1e9)  # float32, so -1e9 cannot overflow
        probs = ops.softmax(scores, axis=-1)
        probs = self.probs_dropout(probs, training=training)
        return ops.einsum("bhqk,bkhd->bqhd", ops.cast(probs, v.dtype), v)

    def call(self, x, training=None, cache=None, cache_index=None):
        batch, seq_len = ops.shape(x)[0], ops.shape(x)[1]
        qkv = self.qkv(x)  # (B, T, 3D)
        qkv = ops.reshape(qkv, (batch, seq_len, 3, self.n_heads, self.head_dim))
        # unstack, not qkv[:, :, i]: three strided-slice gradients each write a zero-filled (B, T, 3, H, d_k)
        # tensor (16 % of a bf16 training step, bench/RESULTS.md); unstack's gradient is one stack.
        q, k, v = ops.unstack(qkv, 3, axis=2)  # each (B, T, H, d_k)

        if cache is None:
            # The fused kernel has no dropout: with attention dropout active, use the explicit path.
            if self.fast_attention and not (training and self.attention_dropout > 0):
                y = ops.dot_product_attention(q, k, v, is_causal=True)
            else:
                y = self.attend(q, k, v, causal_mask(seq_len, seq_len), training=training)
        else:
            start = ops.cast(cache_index, "int32")
            zero = ops.zeros((), "int32")
            new_kv = ops.cast(ops.stack([k, v], axis=1), cache.dtype)  # (B, 2, T, H, d_k)
            cache = ops.slice_update(cache, (zero, zero, start, zero, zero), new_kv)
            keys, values = cache[:, 0], cache[:, 1]  # (B, S, H, d_k)
            mask = causal_mask(seq_len, ops.shape(keys)[1], start)
            y = self.attend(q, ops.cast(keys, q.dtype), ops.cast(values, q.dtype), mask, training=training)

        y = ops.reshape(y, (batch, seq_len, self.d_model))  # Concat(head_1..head_H)
        y = self.out_proj(y)
        return y if cache is None else (y, cache)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "attention_dropout": self.attention_dropout,
            "use_bias": self.use_bias,
            "init_std": self.init_std,
            "output_init_std": self.output_init_std,
            "fast_attention": self.fast_attention,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FeedForward(keras.layers.Layer):
    """Position-wise feed-forward network.

        FFN(x) = Dropout(GELU(x W₁ + b₁) W₂ + b₂),   W₁ ∈ ℝ^{D×F}, W₂ ∈ ℝ^{F×D}

    GELU is GPT-2's tanh approximation: GELU(u) = ½u(1 + tanh(√(2/π)(u + 0.044715u³))).

    Input (B, T, D) -> output (B, T, D).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        dropout: float = 0.0,
        use_bias: bool = True,
        init_std: float = 0.02,
        output_init_std: float = 0.02,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.d_model = int(d_model)
        self.d_ff = int(d_ff)
        self.dropout = float(dropout)
        self.use_bias = bool(use_bias)
        self.init_std = float(init_std)
        self.output_init_std = float(output_init_std)
        self.fc_in = keras.layers.Dense(
            self.d_ff,
            use_bias=self.use_bias,
            kernel_initializer=_normal(self.init_std),
            name="fc_in",
            dtype=self.dtype_policy,
        )
        self.fc_out = keras.layers.Dense(
            self.d_model,
            use_bias=self.use_bias,
            kernel_initializer=_normal(self.output_init_std),
            name="fc_out",
            dtype=self.dtype_policy,
        )
        self.out_dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)

    def build(self, input_shape: tuple) -> None:
        self.fc_in.build(input_shape)
        self.fc_out.build(tuple(input_shape[:-1]) + (self.d_ff,))

    def call(self, x, training=None):
        h = keras.activations.gelu(self.fc_in(x), approximate=True)  # (B, T, F)
        return self.out_dropout(self.fc_out(h), training=training)  # (B, T, D)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "dropout": self.dropout,
            "use_bias": self.use_bias,
            "init_std": self.init_std,
            "output_init_std": self.output_init_std,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DecoderBlock(keras.layers.Layer):
    """One decoder block: self-attention and feed-forward sub-layers with residual connections.

    Pre-LN (GPT-2, `norm_position="pre"`):
        x ← x + Dropout(MHA(LN₁(x)))
        x ← x + FFN(LN₂(x))
    Post-LN (Vaswani et al., `norm_position="post"`):
        x ← LN₁(x + Dropout(MHA(x)))
        x ← LN₂(x + FFN(x))

    MHA is `CausalSelfAttention`, FFN is `FeedForward`. With a `cache`, returns (x, cache).

    Input (B, T, D) -> output (B, T, D).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        layer_norm_epsilon: float = 1e-5,
        norm_position: str = "pre",
        use_bias: bool = True,
        init_std: float = 0.02,
        output_init_std: float = 0.02,
        fast_attention: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post', got {norm_position!r}")
        self.d_model = int(d_model)
        self.n_heads = int(n_heads)
        self.d_ff = int(d_ff)
        self.dropout = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.norm_position = norm_position
        self.use_bias = bool(use_bias)
        self.init_std = float(init_std)
        self.output_init_std = float(output_init_std)
        self.fast_attention = bool(fast_attention)
        policy = self.dtype_policy
        self.ln_1 = LayerNorm(self.layer_norm_epsilon, name="ln_1", dtype=policy)
        self.attn = CausalSelfAttention(
            self.d_model,
            self.n_heads,
            attention_dropout=self.attention_dropout,
            use_bias=self.use_bias,
            init_std=self.init_std,
            output_init_std=self.output_init_std,
            fast_attention=self.fast_attention,
            name="attn",
            dtype=policy,
        )
        self.attn_dropout = keras.layers.Dropout(self.dropout, dtype=policy)
        self.ln_2 = LayerNorm(self.layer_norm_epsilon, name="ln_2", dtype=policy)
        self.ffn = FeedForward(
            self.d_model,
            self.d_ff,
            dropout=self.dropout,
            use_bias=self.use_bias,
            init_std=self.init_std,
            output_init_std=self.output_init_std,
            name="ffn",
            dtype=policy,
        )

    def build(self, input_shape: tuple) -> None:
        for layer in (self.ln_1, self.attn, self.ln_2, self.ffn):
            layer.build(input_shape)

    def _attention(self, x, training, cache, cache_index):
        if cache is None:
            return self.attn(x, training=training), None
        return self.attn(x, training=training, cache=cache, cache_index=cache_index)

    def call(self, x, training=None, cache=None, cache_index=None):
        if self.norm_position == "pre":
            a, cache = self._attention(self.ln_1(x), training, cache, cache_index)
            x = x + self.attn_dropout(a, training=training)
            x = x + self.ffn(self.ln_2(x), training=training)
        else:
            a, cache = self._attention(x, training, cache, cache_index)
            x = self.ln_1(x + self.attn_dropout(a, training=training))
            x = self.ln_2(x + self.ffn(x, training=training))
        return x if cache is None else (x, cache)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "d_ff": self.d_ff,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "norm_position": self.norm_position,
            "use_bias": self.use_bias,
            "init_std": self.init_std,
            "output_init_std": self.output_init_std,
            "fast_attention": self.fast_attention,
        }
