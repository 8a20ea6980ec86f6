"""`GPT(keras.Model)`: embeddings → L decoder blocks → final LayerNorm → (tied) output projection.

The one place that builds a model: `build_model(config)` (or `GPT(config)`).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from tfgpt.config import GPTConfig
from tfgpt.layers import INIT_STD, DecoderBlock, LayerNorm, TokenAndPositionEmbedding


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
        self.embedding = TokenAndPositionEmbedding(
            c.vocab_size, c.context, c.d_model, c.position_encoding, name="embedding", dtype=policy
        )
        self.embedding_dropout = keras.layers.Dropout(c.dropout, dtype=policy)
        self.blocks = [DecoderBlock(c, name=f"block_{i}", dtype=policy) for i in range(c.n_layers)]
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
                kernel_initializer=keras.initializers.RandomNormal(stddev=INIT_STD),
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
    def _logits(self, h):
        """Final hidden states (after LN_f) (B, T, D) -> float32 logits (B, T, V): h E^T (tied) or the lm_head."""
        logits = self.lm_head(h) if self.lm_head is not None else self.embedding.project(h)
        return ops.cast(logits, "float32")

    def hidden_states(self, token_ids, training=None):
        """Final hidden states LN_f(h_L) (pre-LN) or h_L (post-LN): (B, T) -> (B, T, D)."""
        x = self.embedding_dropout(self.embedding(token_ids), training=training)  # h_0
        for block in self.blocks:
            x = block(x, training=training)  # h_l = DecoderBlock_l(h_{l-1})
        return self.final_norm(x) if self.final_norm is not None else x

    def call(self, token_ids, training=None):
        """(B, T) token ids -> float32 logits (B, T, V)."""
        return self._logits(self.hidden_states(token_ids, training=training))

    # ------------------------------------------------------- key/value cache
    def init_cache(self, batch_size, length=None, dtype: str | None = None) -> list:
        """One zeroed (Kᵀ, V) pair per block, Kᵀ (B·H, d_k, S) and V (B·H, S, d_k) (heads folded into
        the batch); S defaults to the context.

        Separate per-layer tensors (not one stacked tensor): in the compiled decoding loop each is
        updated in place with `slice_update`, where a stacked cache is sliced and re-stacked (copied)
        at every step.
        """
        length = self.config.context if length is None else length
        return [block.attn.init_cache(batch_size, length, dtype) for block in self.blocks]

    def call_with_cache(self, token_ids, caches, cache_index):
        """Incremental forward pass.

        token_ids (B, T) sit at positions cache_index … cache_index+T−1; their keys and values are
        written into each block's (Kᵀ, V) cache (`init_cache`). Returns (float32 logits (B, T, V),
        the updated caches). Prefill with the whole prompt at cache_index 0, then feed one token per step.
        """
        x = self.embedding(token_ids, start_index=cache_index)
        new_caches = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block(x, cache=tuple(cache), cache_index=cache_index)
            new_caches.append(cache)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self._logits(x), new_caches

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
