"""The from-scratch layers: shapes, dtypes, numerics against NumPy references, serialisation.

Attention, feed-forward and decoder block are built from a GPTConfig (`cfg()` below)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from keras import ops

from tfgpt.config import GPTConfig
from tfgpt.layers import (
    CausalSelfAttention,
    DecoderBlock,
    FeedForward,
    LayerNorm,
    TokenAndPositionEmbedding,
    causal_mask,
    sinusoidal_table,
)

B, T, D, H, F, V, CTX = 2, 7, 32, 4, 48, 50, 16
RNG = np.random.default_rng(0)


def cfg(**overrides) -> GPTConfig:
    """The test sizes as the GPTConfig the attention / feed-forward / block layers are built from."""
    return GPTConfig(**{"vocab_size": V, "context": CTX, "d_model": D, "n_heads": H, "d_ff": F, **overrides})


# ----------------------------------------------------------------- NumPy references
def np_layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def np_gelu_tanh(u: np.ndarray) -> np.ndarray:
    return 0.5 * u * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))


def np_softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def np_attention(layer: CausalSelfAttention, x: np.ndarray) -> np.ndarray:
    """Masked multi-head attention written head by head with explicit loops over heads."""
    w_qkv, b_qkv = (v.numpy().astype(np.float64) for v in (layer.qkv.kernel, layer.qkv.bias))
    w_o, b_o = (v.numpy().astype(np.float64) for v in (layer.out_proj.kernel, layer.out_proj.bias))
    d, h = layer.d_model, layer.n_heads
    dk = d // h
    qkv = x.astype(np.float64) @ w_qkv + b_qkv
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    t = x.shape[1]
    mask = np.tril(np.ones((t, t), bool))
    heads = []
    for i in range(h):
        sl = slice(i * dk, (i + 1) * dk)
        scores = q[..., sl] @ np.swapaxes(k[..., sl], -1, -2) / math.sqrt(dk)  # (B, T, T)
        scores = np.where(mask, scores, -np.inf)
        heads.append(np_softmax(scores) @ v[..., sl])
    return np.concatenate(heads, -1) @ w_o + b_o


def np_ffn(layer: FeedForward, x: np.ndarray) -> np.ndarray:
    w1, b1, w2, b2 = (
        v.numpy().astype(np.float64)
        for v in (layer.fc_in.kernel, layer.fc_in.bias, layer.fc_out.kernel, layer.fc_out.bias)
    )
    return np_gelu_tanh(x.astype(np.float64) @ w1 + b1) @ w2 + b2


def randomize(layer: keras.layers.Layer, scale: float = 0.3) -> None:
    """Non-trivial weights everywhere (biases and LayerNorm β are zero at init)."""
    rng = np.random.default_rng(1)
    for var in layer.weights:
        var.assign(
            rng.normal(0.0, scale, var.shape).astype("float32") + (1.0 if "gamma" in var.path else 0.0)
        )


def x_input(*shape: int) -> np.ndarray:
    return RNG.normal(0.0, 1.0, shape).astype("float32")


# ----------------------------------------------------------------------- LayerNorm
def test_layer_norm_matches_numpy() -> None:
    ln = LayerNorm(epsilon=1e-3)
    x = x_input(B, T, D) * 3.0 + 1.5
    ln.build(x.shape)
    randomize(ln)
    y = ln(x)
    assert tuple(y.shape) == (B, T, D) and y.dtype == "float32"
    expected = np_layer_norm(x, ln.gamma.numpy(), ln.beta.numpy(), 1e-3)
    np.testing.assert_allclose(ops.convert_to_numpy(y), expected, atol=1e-5, rtol=1e-5)


def test_layer_norm_defaults_normalise() -> None:
    ln = LayerNorm()
    y = ops.convert_to_numpy(ln(x_input(3, D) * 5.0 - 2.0))
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1.0, atol=1e-3)  # var/(var+1e-5)
    assert [v.name for v in ln.weights] == ["gamma", "beta"]


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_layer_norm_mixed_precision(policy: str) -> None:
    keras.mixed_precision.set_global_policy(policy)
    ln = LayerNorm()
    x = x_input(B, T, D) * 100.0 + 300.0  # a large mean: variance must be computed in float32
    y = ln(ops.cast(x, ln.compute_dtype))
    assert ln.gamma.dtype == "float32" and ln.beta.dtype == "float32"
    assert y.dtype == ln.compute_dtype
    x_half = ops.convert_to_numpy(ops.cast(ops.cast(x, ln.compute_dtype), "float32"))
    expected = np_layer_norm(x_half, 1.0, 0.0, 1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(y, "float32")), expected, atol=0.05)


# ------------------------------------------------------------------ position tables
def test_sinusoidal_table_matches_formula() -> None:
    length, dim = 11, 8
    table = sinusoidal_table(length, dim)
    assert table.shape == (length, dim) and table.dtype == np.float32
    for pos in range(length):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert table[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("encoding", ["learned", "sinusoidal"])
@pytest.mark.parametrize("start_index", [0, 5])
def test_token_and_position_embedding(encoding: str, start_index: int) -> None:
    emb = TokenAndPositionEmbedding(V, CTX, D, position_encoding=encoding)
    ids = RNG.integers(0, V, (B, T)).astype("int32")
    h = emb(ids, start_index=start_index)
    assert tuple(h.shape) == (B, T, D) and h.dtype == "float32"
    E = emb.token_embeddings.numpy()
    if encoding == "learned":
        P = emb.position_embeddings.numpy()
        assert [w.name for w in emb.weights] == ["token_embeddings", "position_embeddings"]
    else:
        P = sinusoidal_table(CTX, D)
        assert [w.name for w in emb.weights] == ["token_embeddings"]  # the table is not a weight
    np.testing.assert_allclose(ops.convert_to_numpy(emb.position_table()), P)
    expected = E[ids] + P[start_index : start_index + T][None]
    np.testing.assert_allclose(ops.convert_to_numpy(h), expected, atol=1e-6)


def test_embedding_project_is_transpose_of_table() -> None:
    emb = TokenAndPositionEmbedding(V, CTX, D)
    emb.build()
    h = x_input(B, T, D)
    logits = emb.project(h)
    assert tuple(logits.shape) == (B, T, V)
    np.testing.assert_allclose(ops.convert_to_numpy(logits), h @ emb.token_embeddings.numpy().T, atol=1e-5)


def test_embedding_rejects_unknown_encoding() -> None:
    with pytest.raises(ValueError, match="position_encoding must be 'learned' or 'sinusoidal', got 'rope'"):
        TokenAndPositionEmbedding(V, CTX, D, position_encoding="rope")


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_embedding_mixed_precision_dtypes(policy: str) -> None:
    keras.mixed_precision.set_global_policy(policy)
    emb = TokenAndPositionEmbedding(V, CTX, D, position_encoding="sinusoidal")
    h = emb(np.zeros((B, T), "int32"))
    assert h.dtype == emb.compute_dtype != "float32"
    assert emb.token_embeddings.dtype == "float32"


# ---------------------------------------------------------------------- attention
def test_causal_mask() -> None:
    np.testing.assert_array_equal(ops.convert_to_numpy(causal_mask(4, 4)), np.tril(np.ones((4, 4), bool)))
    # queries at positions 2, 3 over 6 cache slots: key j allowed iff j <= 2 + i
    expected = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(ops.convert_to_numpy(causal_mask(2, 6, 2)), expected)


@pytest.mark.parametrize("length", [T, 8])  # 8: two query blocks
def test_attention_matches_numpy_reference(length: int) -> None:
    attn = CausalSelfAttention(cfg())
    x = x_input(B, length, D)
    attn.build(x.shape)
    randomize(attn)
    y = attn(x)
    assert tuple(y.shape) == (B, length, D) and y.dtype == "float32"
    assert [w.shape for w in attn.weights] == [(D, 3 * D), (3 * D,), (D, D), (D,)]
    np.testing.assert_allclose(ops.convert_to_numpy(y), np_attention(attn, x), atol=1e-4, rtol=1e-4)


def test_attention_is_causal() -> None:
    attn = CausalSelfAttention(cfg())
    x = x_input(1, T, D)
    attn.build(x.shape)
    randomize(attn)
    y = ops.convert_to_numpy(attn(x))
    for t in range(T - 1):
        x2 = x.copy()
        x2[:, t + 1 :] = x_input(1, T - t - 1, D)
        y2 = ops.convert_to_numpy(attn(x2))
        np.testing.assert_allclose(y2[:, : t + 1], y[:, : t + 1], atol=1e-6)
        assert not np.allclose(y2[:, t + 1 :], y[:, t + 1 :], atol=1e-3)


def test_attention_without_bias() -> None:
    attn = CausalSelfAttention(cfg(use_bias=False))
    attn.build((None, None, D))
    assert [w.shape for w in attn.weights] == [(D, 3 * D), (D, D)]


def test_attention_rejects_indivisible_heads() -> None:
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by n_heads \(4\)"):
        CausalSelfAttention({"d_model": 30, "n_heads": 4})


def test_attention_with_cache_returns_updated_cache() -> None:
    attn = CausalSelfAttention(cfg())
    x = x_input(B, 3, D)
    attn.build(x.shape)
    cache = attn.init_cache(B, 10)  # (Kᵀ (B·H, d_k, S), V (B·H, S, d_k))
    y, new_cache = attn(x, cache=cache, cache_index=4)
    assert tuple(y.shape) == (B, 3, D) and [tuple(c.shape) for c in new_cache] == [(B * H, D // H, 10),
                                                                                   (B * H, 10, D // H)]
    keys = ops.convert_to_numpy(new_cache[0]).reshape(B, H, D // H, 10).transpose(0, 1, 3, 2)  # (B, H, S, d_k)
    values = ops.convert_to_numpy(new_cache[1]).reshape(B, H, 10, D // H)
    qkv = x @ attn.qkv.kernel.numpy() + attn.qkv.bias.numpy()
    for got, part in ((keys, qkv[..., D : 2 * D]), (values, qkv[..., 2 * D :])):
        expected = part.reshape(B, 3, H, D // H).transpose(0, 2, 1, 3)  # (B, H, 3, d_k)
        np.testing.assert_allclose(got[:, :, 4:7], expected, atol=1e-5)  # written at slots 4..6
        assert not got[:, :, :4].any() and not got[:, :, 7:].any()


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_masking_is_exact_with_large_half_precision_scores(policy: str) -> None:
    """Raw scores q·k of ~±3·10⁴ in half precision: masked keys get probability exactly 0, no NaN.

    (An additive mask (1 − m)·(−1e9) built in float16 is 0·(−inf) = NaN on the allowed keys.)"""
    keras.mixed_precision.set_global_policy(policy)
    attn = CausalSelfAttention(cfg())
    attn.build((None, None, D))
    dk, t = D // H, 5
    q = np.full((H, t, dk), 60.0, "float32")  # attend's layout: (B·H, T, d_k), K as Kᵀ
    k = np.full((H, t, dk), -60.0, "float32")  # q·k = −28800
    k[:, 0] = 60.0  # q·k = +28800: the only key queries 0..2 may prefer
    k[:, 3] = 65.0  # q·k = +31200, the largest score, but only queries 3, 4 may see key 3
    v = np.zeros((H, t, dk), "float32")
    v[:, 3] = 1.0
    cast = attn.compute_dtype
    kt = k.transpose(0, 2, 1)
    y = attn.attend(ops.cast(q, cast), ops.cast(kt, cast), ops.cast(v, cast), causal_mask(t, t))
    y = ops.convert_to_numpy(ops.cast(y, "float32"))
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[:, :3], 0.0)  # queries 0..2 never see key 3
    np.testing.assert_allclose(y[:, 3:], 1.0)


# -------------------------------------------------------------------- feed-forward
def test_feed_forward_matches_numpy() -> None:
    ffn = FeedForward(cfg())
    x = x_input(B, T, D)
    ffn.build(x.shape)
    randomize(ffn)
    y = ffn(x)
    assert tuple(y.shape) == (B, T, D) and y.dtype == "float32"
    assert [w.shape for w in ffn.weights] == [(D, F), (F,), (F, D), (D,)]
    np.testing.assert_allclose(ops.convert_to_numpy(y), np_ffn(ffn, x), atol=1e-4, rtol=1e-4)


def test_feed_forward_dropout_only_in_training() -> None:
    ffn = FeedForward(cfg(dropout=0.5))
    x = x_input(B, T, D)
    ffn.build(x.shape)
    np.testing.assert_allclose(ops.convert_to_numpy(ffn(x)), np_ffn(ffn, x), atol=1e-5)
    y = ops.convert_to_numpy(ffn(x, training=True))
    assert 0.3 < np.mean(y == 0.0) < 0.7


# -------------------------------------------------------------------- decoder block
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_decoder_block_matches_reference(norm_position: str) -> None:
    block = DecoderBlock(cfg(norm_position=norm_position, layer_norm_epsilon=1e-5))
    x = x_input(B, T, D)
    block.build(x.shape)
    randomize(block, scale=0.2)
    y = block(x)
    assert tuple(y.shape) == (B, T, D) and y.dtype == "float32"

    def ln(layer: LayerNorm, z: np.ndarray) -> np.ndarray:
        return np_layer_norm(z, layer.gamma.numpy(), layer.beta.numpy(), 1e-5)

    if norm_position == "pre":
        h = x + np_attention(block.attn, ln(block.ln_1, x))
        expected = h + np_ffn(block.ffn, ln(block.ln_2, h))
    else:
        h = ln(block.ln_1, x + np_attention(block.attn, x))
        expected = ln(block.ln_2, h + np_ffn(block.ffn, h))
    np.testing.assert_allclose(ops.convert_to_numpy(y), expected, atol=2e-4, rtol=2e-4)


def test_decoder_block_rejects_bad_norm_position() -> None:
    with pytest.raises(ValueError, match=r"norm_position must be one of \('pre', 'post'\), got 'sandwich'"):
        DecoderBlock({"norm_position": "sandwich"})


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_decoder_block_mixed_precision(policy: str, norm_position: str) -> None:
    keras.mixed_precision.set_global_policy(policy)
    block = DecoderBlock(cfg(norm_position=norm_position))
    y = block(ops.cast(x_input(B, T, D), block.compute_dtype))
    assert y.dtype == block.compute_dtype
    assert np.isfinite(ops.convert_to_numpy(ops.cast(y, "float32"))).all()
    assert all(w.dtype == "float32" for w in block.weights)
    assert block.ln_1.gamma.dtype == "float32" and block.ln_2.beta.dtype == "float32"


# ------------------------------------------------------------------ serialisation
LAYER_CASES = [
    (LayerNorm, {"epsilon": 1e-3}, (B, T, D)),
    (TokenAndPositionEmbedding, {"vocab_size": V, "context": CTX, "d_model": D}, None),
    (
        TokenAndPositionEmbedding,
        {"vocab_size": V, "context": CTX, "d_model": D, "position_encoding": "sinusoidal", "init_std": 0.1},
        None,
    ),
    (CausalSelfAttention, {"config": cfg(attention_dropout=0.1, use_bias=False, fast_attention=True).to_dict()},
     (B, T, D)),
    (FeedForward, {"config": cfg(dropout=0.2, n_layers=3).to_dict()}, (B, T, D)),
    (DecoderBlock, {"config": cfg(norm_position="post").to_dict()}, (B, T, D)),
    (DecoderBlock, {"config": cfg(layer_norm_epsilon=1e-6).to_dict()}, (B, T, D)),
]


@pytest.mark.parametrize(("cls", "kwargs", "shape"), LAYER_CASES)
def test_layer_config_round_trip(cls: type, kwargs: dict, shape: tuple | None) -> None:
    layer = cls(**kwargs, name="orig")
    x = RNG.integers(0, V, (B, T)).astype("int32") if shape is None else x_input(*shape)
    y = layer(x)
    config = layer.get_config()
    for key, value in kwargs.items():
        assert config[key] == value
    clone = cls.from_config(config)
    assert clone.get_config() == config
    clone(x)  # build
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(ops.convert_to_numpy(clone(x)), ops.convert_to_numpy(y), atol=1e-6)
    # registered: generic Keras (de)serialisation finds the class by its registered name
    assert keras.saving.get_registered_object(f"tfgpt>{cls.__name__}") is cls
    assert keras.saving.get_registered_name(cls) == f"tfgpt>{cls.__name__}"
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(again) is cls and again.get_config() == config


@pytest.mark.parametrize("fast_attention", [False, True])
def test_attention_dropout_applies_in_training(fast_attention: bool) -> None:
    """attention_dropout acts on the probabilities in training (also when the fused kernel is on)."""
    attn = CausalSelfAttention(cfg(attention_dropout=0.5, fast_attention=fast_attention))
    x = x_input(B, T, D)
    attn.build(x.shape)
    randomize(attn)
    inference = ops.convert_to_numpy(attn(x))
    np.testing.assert_allclose(inference, np_attention(attn, x), atol=1e-4, rtol=1e-4)
    training = ops.convert_to_numpy(attn(x, training=True))
    assert np.abs(training - inference).max() > 1e-2
