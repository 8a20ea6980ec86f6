"""`GPT(keras.Model)`: embeddings → L decoder blocks → final LayerNorm → (tied) output projection.

The one place that builds a model: `build_model(config)` (or `GPT(config)`).
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from tfgpt.config import GPTConfig
from tfgpt.layers import DecoderBlock, LayerNorm, TokenAndPositionEmbedding


@keras.saving.register_keras_serializable(package="tfgpt")
class GPT(keras.Model):
    """A GPT-2-style decoder-only language model.

        h₀ = E[x] + P[positions]                       (TokenAndPositionEmbedding)
        h_l = DecoderBlock_l(h_{l−1}),  l = 1 … L
        logits = LN_f(h_L) Eᵀ                          (tied; W_out when untied; no LN_f for post-LN)

    Logits are float32 under every precision policy. GPT-2 initialisation: weights ~ N(0, 0.02²),
    biases 0, and the residual output projections (W_O of attention, W₂ of the feed-forward)
    ~ N(0, (0.02/√(2L))²).

    Input (B, T) int token ids, T ≤ context -> logits (B, T, V) float32.

    Example:
        >>> model = GPT(GPTConfig.from_preset("tiny"))
        >>> logits = model(ops.zeros((2, 16), "int32"))   # (2, 16, 512)
    """

    def __init__(self, config: GPTConfig | dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = GPTConfig.from_dict(config)
        self.config = config
        c = config
        policy = self.dtype_policy
        residual_std = 0.02 / math.sqrt(2 * c.n_layers)
        self.embedding = TokenAndPositionEmbedding(
            c.vocab_size, c.context, c.d_model, c.position_encoding, name="embedding", dtype=policy
        )
        self.embedding_dropout = keras.layers.Dropout(c.dropout, dtype=policy)
        self.blocks = [
            DecoderBlock(
                c.d_model,
                c.n_heads,
                c.d_ff,
                dropout=c.dropout,
                attention_dropout=c.attention_dropout,
                layer_norm_epsilon=c.layer_norm_epsilon,
                norm_position=c.norm_position,
                use_bias=c.use_bias,
                output_init_std=residual_std,
                fast_attention=c.fast_attention,
                name=f"block_{i}",
                dtype=policy,
            )
            for i in range(c.n_layers)
        ]
        self.final_norm = (
            LayerNorm(c.layer_norm_epsilon, name="final_norm", dtype=policy)
            if c.norm_position == "pre"
            else None
        )
        self.lm_head = (
            None
            if c.tie_embeddings
            else keras.layers.Dense(
                c.vocab_size,
                use_bias=False,
                kernel_initializer=keras.initializers.RandomNormal(stddev=0.02),
                name="lm_head",
                dtype=policy,
            )
        )
        self.build()

    def build(self, input_shape: Any = None) -> None:
        hidden = (None, None, self.config.d_model)
        self.embedding.build((None, None))
        for block in self.blocks:
            block.build(hidden)
        if self.final_norm is not None:
            self.final_norm.build(hidden)
        if self.lm_head is not None:
            self.lm_head.build(hidden)
        self.built = True

    # ----------------------------------------------------------------- forward
    def _head(self, h):
        """(B, T, D) -> float32 logits (B, T, V)."""
        if self.final_norm is not None:
            h = self.final_norm(h)
        logits = self.lm_head(h) if self.lm_head is not None else self.embedding.project(h)
        return ops.cast(logits, "float32")

    def hidden_states(self, token_ids, training=None):
        """Final hidden states LN_f(h_L) (pre-LN) or h_L (post-LN): (B, T) -> (B, T, D)."""
        x = self.embedding_dropout(self.embedding(token_ids), training=training)
        for block in self.blocks:
            x = block(x, training=training)
        return self.final_norm(x) if self.final_norm is not None else x

    def call(self, token_ids, training=None):
        x = self.embedding_dropout(self.embedding(token_ids), training=training)
        for block in self.blocks:
            x = block(x, training=training)
        return self._head(x)

    # ------------------------------------------------------- key/value cache
    def init_cache(self, batch_size: int, length: int | None = None, dtype: str | None = None):
        """Zeroed key/value cache, shape (B, L, 2, S, H, d_k); S defaults to the context."""
        c = self.config
        length = c.context if length is None else length
        shape = (batch_size, c.n_layers, 2, length, c.n_heads, c.head_dim)
        return ops.zeros(shape, dtype=dtype or self.compute_dtype)

    def call_with_cache(self, token_ids, cache, cache_index):
        """Incremental forward pass.

        token_ids (B, T) sit at positions cache_index … cache_index+T−1; their keys and values are
        written into `cache` (B, L, 2, S, H, d_k). Returns (float32 logits (B, T, V), new cache).
        Prefill with the whole prompt at cache_index 0, then feed one token per step.
        """
        x = self.embedding(token_ids, start_index=cache_index)
        layer_caches = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, cache=cache[:, i], cache_index=cache_index)
            layer_caches.append(layer_cache)
        return self._head(x), ops.stack(layer_caches, axis=1)

    # --------------------------------------------------------------- training
    def train_step(self, data):
        """Keras' TensorFlow train step, with sparse (IndexedSlices) gradients made dense.

        Keras Adam/AdamW applied to an IndexedSlices gradient with repeated rows (a gather-based
        embedding that is not tied) accumulates Σg² instead of (Σg)²; densifying first gives the
        exact Adam update. Other backends produce dense gradients already.
        """
        if keras.backend.backend() != "tensorflow":
            return super().train_step(data)
        import tensorflow as tf
        from keras.src import tree
        from keras.src.losses import loss as loss_module
        from keras.src.trainers import data_adapters

        x, y, sample_weight = data_adapters.data_adapter_utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            self._loss_tracker.update_state(
                loss_module.unscale_loss_for_distribution(loss),
                sample_weight=tf.shape(tree.flatten(x)[0])[0],
            )
            if self.optimizer is not None:
                loss = self.optimizer.scale_loss(loss)
        weights = self.trainable_weights
        grads = tape.gradient(loss, weights)
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        self.optimizer.apply_gradients(zip(grads, weights, strict=True))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    # ----------------------------------------------------------- serialising
    def get_config(self) -> dict:
        return {"config": self.config.to_dict(), "name": self.name}

    @classmethod
    def from_config(cls, config: dict) -> GPT:
        config = dict(config)
        return cls(config.pop("config"), **{k: v for k, v in config.items() if k in ("name",)})


def build_model(config: GPTConfig, name: str = "gpt") -> GPT:
    """Build a GPT (weights created) under the current dtype policy and distribution scope."""
    return GPT(config, name=name)
