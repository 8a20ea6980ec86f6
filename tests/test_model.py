"""GPT model: shapes, causality, key/value cache, saving, tied embeddings, mixed precision,
training (overfit), forbidden layers, fused attention, XLA. (The optimizer's exact Adam on gather
embeddings and loss scaling against float32 are tested in test_training_optim.py.)"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import tfgpt
from tfgpt.config import GPTConfig
from tfgpt.model import GPT, build_model

PACKAGE_DIR = Path(tfgpt.__file__).resolve().parent
VARIANTS = [
    ("pre", "learned"),
    ("pre", "sinusoidal"),
    ("post", "learned"),
    ("post", "sinusoidal"),
]
VARIANT_IDS = [f"{n}-{p}" for n, p in VARIANTS]


def tiny(**overrides) -> GPTConfig:
    return GPTConfig.from_preset("tiny", **overrides)


def random_ids(batch: int, length: int, vocab: int = 512, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype("int32")


def to_np(x) -> np.ndarray:
    return ops.convert_to_numpy(ops.cast(x, "float32"))


def perturb(model: keras.Model, scale: float = 0.05, seed: int = 1) -> None:
    """Non-zero biases and LayerNorm β, γ ≠ 1, so every weight takes part in the comparison."""
    rng = np.random.default_rng(seed)
    for var in model.weights:
        if var.path.endswith(("bias", "beta", "gamma")):
            var.assign(var.numpy() + rng.normal(0.0, scale, var.shape).astype("float32"))


# ----------------------------------------------------------------- shapes & dtypes
@pytest.mark.parametrize(("norm", "pos"), VARIANTS, ids=VARIANT_IDS)
def test_model_shapes_and_dtypes(norm: str, pos: str) -> None:
    cfg = tiny(norm_position=norm, position_encoding=pos)
    model = build_model(cfg)
    ids = random_ids(3, 10)
    logits = model(ids)
    assert tuple(logits.shape) == (3, 10, cfg.vocab_size) and logits.dtype == "float32"
    hidden = model.hidden_states(ids)
    assert tuple(hidden.shape) == (3, 10, cfg.d_model) and hidden.dtype == "float32"
    # tied head: logits = hidden · Eᵀ
    expected = to_np(hidden) @ model.embedding.token_embeddings.numpy().T
    np.testing.assert_allclose(to_np(logits), expected, atol=1e-5)
    assert (model.final_norm is None) == (norm == "post")
    assert len(model.blocks) == cfg.n_layers
    assert model.count_params() == cfg.num_parameters()


def test_full_context_and_batch_of_one() -> None:
    cfg = tiny()
    model = build_model(cfg)
    assert tuple(model(random_ids(1, cfg.context)).shape) == (1, cfg.context, cfg.vocab_size)


def test_initialisation_follows_gpt2() -> None:
    cfg = tiny(n_layers=8, d_model=128, n_heads=4, vocab_size=2048)
    model = build_model(cfg)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    stds = {v.path: float(np.std(v.numpy())) for v in model.weights if v.path.endswith("kernel")}
    assert model.embedding.token_embeddings.numpy().std() == pytest.approx(0.02, rel=0.05)
    for path, std in stds.items():
        expected = residual_std if path.endswith(("out_proj/kernel", "fc_out/kernel")) else 0.02
        assert std == pytest.approx(expected, rel=0.1), path
    for var in model.weights:
        if var.path.endswith(("bias", "beta")):
            assert not var.numpy().any(), var.path


# ------------------------------------------------------------------------ causality
@pytest.mark.parametrize(("norm", "pos"), [("pre", "learned"), ("post", "sinusoidal")])
def test_future_tokens_never_change_past_logits(norm: str, pos: str) -> None:
    cfg = tiny(norm_position=norm, position_encoding=pos, context=16)
    model = build_model(cfg)
    perturb(model)
    ids = random_ids(2, 16)
    base = to_np(model(ids))
    for t in (0, 3, 9, 14):
        changed = ids.copy()
        changed[:, t + 1 :] = (ids[:, t + 1 :] + 1 + np.arange(16 - t - 1)) % cfg.vocab_size
        out = to_np(model(changed))
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6)
        assert np.abs(out[:, t + 1 :] - base[:, t + 1 :]).max() > 1e-3  # the future did change


# --------------------------------------------------------------------- KV cache
@pytest.mark.parametrize(("norm", "pos"), VARIANTS, ids=VARIANT_IDS)
def test_cached_forward_equals_full_forward(norm: str, pos: str) -> None:
    cfg = tiny(norm_position=norm, position_encoding=pos, context=16)
    model = build_model(cfg)
    perturb(model)
    B, T = 2, 12
    ids = random_ids(B, T)
    full = to_np(model(ids))

    cache = model.init_cache(B)  # one (Kᵀ, V) pair per block: Kᵀ (B·H, d_k, S), V (B·H, S, d_k)
    BH, S, dk = B * cfg.n_heads, cfg.context, cfg.head_dim
    assert [(tuple(k.shape), tuple(v.shape)) for k, v in cache] == [((BH, dk, S), (BH, S, dk))] * cfg.n_layers
    logits, cache = model.call_with_cache(ids, cache, 0)  # prefill the whole prompt
    assert logits.dtype == "float32" and len(cache) == cfg.n_layers
    assert [(tuple(k.shape), tuple(v.shape)) for k, v in cache] == [((BH, dk, S), (BH, S, dk))] * cfg.n_layers
    np.testing.assert_allclose(to_np(logits), full, atol=1e-4)

    cache = model.init_cache(B)  # token by token
    for i in range(T):
        logits, cache = model.call_with_cache(ids[:, i : i + 1], cache, i)
        np.testing.assert_allclose(to_np(logits)[:, 0], full[:, i], atol=1e-4)

    cache = model.init_cache(B, length=T)  # prefill part, then step; cache exactly T long
    logits, cache = model.call_with_cache(ids[:, :5], cache, 0)
    np.testing.assert_allclose(to_np(logits), full[:, :5], atol=1e-4)
    for i in range(5, T):
        logits, cache = model.call_with_cache(ids[:, i : i + 1], cache, ops.convert_to_tensor(i))
        np.testing.assert_allclose(to_np(logits)[:, 0], full[:, i], atol=1e-4)


def test_cached_decoding_in_a_compiled_function() -> None:
    """cache_index as a traced tensor: one XLA-compiled step function serves every position."""
    cfg = tiny(context=16)
    model = build_model(cfg)
    ids = random_ids(2, 10)
    full = to_np(model(ids))
    step = tf.function(model.call_with_cache, jit_compile=True)
    cache = model.init_cache(2)
    for i in range(10):
        logits, cache = step(tf.constant(ids[:, i : i + 1]), cache, tf.constant(i))
        np.testing.assert_allclose(to_np(logits)[:, 0], full[:, i], atol=1e-4)
    assert step.experimental_get_tracing_count() == 1  # traced once, not once per position


# ----------------------------------------------------------------- serialisation
@pytest.mark.parametrize(
    "overrides",
    [{}, {"norm_position": "post", "position_encoding": "sinusoidal", "tie_embeddings": False}],
    ids=["tied-pre-learned", "untied-post-sinusoidal"],
)
def test_keras_file_round_trip(tmp_path: Path, overrides: dict) -> None:
    model = build_model(tiny(**overrides))
    perturb(model)
    ids = random_ids(2, 9)
    expected = to_np(model(ids))
    path = tmp_path / "model.keras"
    model.save(path)
    keras.utils.clear_session()
    loaded = keras.models.load_model(path, safe_mode=True)
    assert type(loaded) is GPT
    assert loaded.config == model.config and loaded.config.to_dict() == model.config.to_dict()
    np.testing.assert_array_equal(to_np(loaded(ids)), expected)


def test_model_config_round_trip() -> None:
    cfg = tiny(tie_embeddings=False, norm_position="post", dropout=0.1)
    model = build_model(cfg, name="my_gpt")
    config = model.get_config()
    assert config["config"] == cfg.to_dict()
    clone = GPT.from_config(config)
    assert clone.config == cfg and clone.name == "my_gpt"
    clone.set_weights(model.get_weights())
    ids = random_ids(1, 8)
    np.testing.assert_array_equal(to_np(clone(ids)), to_np(model(ids)))
    assert keras.saving.get_registered_object("tfgpt>GPT") is GPT
    assert GPT(cfg.to_dict()).config == cfg  # a plain dict is accepted too


# ---------------------------------------------------------------- tied embeddings
def test_tied_embedding_is_one_shared_variable() -> None:
    cfg = tiny()
    model = build_model(cfg)
    vd = [v for v in model.weights if tuple(v.shape) == (cfg.vocab_size, cfg.d_model)]
    assert len(vd) == 1 and vd[0] is model.embedding.token_embeddings
    assert model.lm_head is None
    assert not any("lm_head" in v.path for v in model.weights)
    untied = build_model(tiny(tie_embeddings=False))
    assert untied.lm_head.kernel.shape == (cfg.d_model, cfg.vocab_size)

    # Changing the row of a token that is absent from the input changes exactly that logit column:
    # the output projection reads the same variable the embedding lookup reads.
    ids = random_ids(2, 8, vocab=100)  # ids < 100
    before = to_np(model(ids))
    E = model.embedding.token_embeddings
    row = np.random.default_rng(2).normal(0.0, 0.5, cfg.d_model).astype("float32")  # not constant:
    delta = np.zeros((cfg.vocab_size, cfg.d_model), "float32")  # LN output is orthogonal to 1
    delta[300] = row
    E.assign(E.numpy() + delta)
    after = to_np(model(ids))
    changed = np.abs(after - before).max(axis=(0, 1)) > 1e-6
    assert changed.sum() == 1 and (np.abs(after - before)[..., 300] > 1e-3).all()
    # Changing the row of a token that occurs once (sequence 0, position 3) also changes, through the
    # lookup, every logit of sequence 0 from position 3 on; elsewhere only its own column moves.
    token = 250
    ids[0, 3] = token
    before = to_np(model(ids))
    delta = np.zeros((cfg.vocab_size, cfg.d_model), "float32")
    delta[token] = row
    E.assign(E.numpy() + delta)
    diff = np.abs(to_np(model(ids)) - before)
    assert (diff[..., token] > 1e-3).all()  # head path, at every position
    others = np.delete(diff, token, axis=-1)
    assert others[0, :3].max() == 0.0 and others[1].max() == 0.0  # causal; sequence 1 lacks the token
    assert (others[0, 3:].max(axis=-1) > 1e-4).all()  # lookup path


def test_tied_gradient_includes_the_head_contribution() -> None:
    """∂loss/∂E of the tied model = ∂loss/∂E (lookup) + (∂loss/∂W_out)ᵀ (head) of an untied copy."""
    tied = build_model(tiny())
    untied = build_model(tiny(tie_embeddings=False))
    perturb(tied)
    by_path = {v.path.split("/", 1)[1]: v for v in untied.weights}
    for var in tied.weights:
        by_path[var.path.split("/", 1)[1]].assign(var)
    E = tied.embedding.token_embeddings
    untied.lm_head.kernel.assign(ops.transpose(E))

    ids = random_ids(2, 12)
    targets = random_ids(2, 12, seed=5)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    np.testing.assert_allclose(to_np(tied(ids)), to_np(untied(ids)), atol=1e-6)

    with tf.GradientTape() as tape:
        loss_t = loss_fn(targets, tied(ids))
    (g_tied,) = tape.gradient(loss_t, [E])
    with tf.GradientTape() as tape:
        loss_u = loss_fn(targets, untied(ids))
    g_lookup, g_head = tape.gradient(loss_u, [untied.embedding.token_embeddings, untied.lm_head.kernel])
    g_tied, g_lookup, g_head = (to_np(tf.convert_to_tensor(g)) for g in (g_tied, g_lookup, g_head))
    assert np.abs(g_head).max() > 1e-4 and np.abs(g_lookup).max() > 1e-4
    np.testing.assert_allclose(g_tied, g_lookup + g_head.T, atol=1e-6)
    assert np.abs(g_tied - g_lookup).max() > 1e-4  # the head path is not dropped


# ---------------------------------------------------------------- mixed precision
def _compile(model: GPT, optimizer: keras.optimizers.Optimizer, **kwargs) -> None:
    model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), **kwargs
    )


def test_mixed_bfloat16_training_step() -> None:
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build_model(tiny())
    assert model.compute_dtype == "bfloat16"
    _compile(model, keras.optimizers.AdamW(learning_rate=1e-3))
    ids, targets = random_ids(4, 32), random_ids(4, 32, seed=3)
    before = [v.numpy().copy() for v in model.trainable_variables]
    history = model.fit(ids, targets, batch_size=4, epochs=1, verbose=0)
    loss = history.history["loss"][0]
    assert np.isfinite(loss) and 5.0 < loss < 8.0  # ≈ ln 512 = 6.24 at initialisation
    logits = model(ids)
    assert logits.dtype == "float32" and np.isfinite(to_np(logits)).all()
    assert all(v.dtype == "float32" for v in model.variables)
    assert all(v.dtype == "float32" for v in model.optimizer.variables if v.dtype.startswith(("float", "bf")))
    moved = [not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables, strict=True)]
    assert all(moved)


def first_block_raw_scores(model: GPT, ids: np.ndarray) -> np.ndarray:
    """q·k (before the 1/√d_k scale) of block 0, computed in float32 from the model's weights."""
    block = model.blocks[0]
    x = to_np(model.embedding(ids))
    if block.norm_position == "pre":
        x = to_np(block.ln_1(ops.cast(x, block.compute_dtype)))
    qkv = x @ block.attn.qkv.kernel.numpy() + block.attn.qkv.bias.numpy()
    d, h = block.d_model, block.n_heads
    q = qkv[..., :d].reshape(*ids.shape, h, d // h)
    k = qkv[..., d : 2 * d].reshape(*ids.shape, h, d // h)
    return np.einsum("bqhd,bkhd->bhqk", q, k)


@pytest.mark.parametrize(("norm", "qkv_scale"), [("pre", 150.0), ("post", 15.0)])
def test_mixed_float16_forward_is_finite_with_large_activations(norm: str, qkv_scale: float) -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    cfg = tiny(norm_position=norm, context=16)
    model = build_model(cfg)
    emb = model.embedding.token_embeddings
    emb.assign(emb * 500.0)  # embeddings of order 10 (GPT-2 init: 0.02)
    for block in model.blocks:
        block.attn.qkv.kernel.assign(block.attn.qkv.kernel * qkv_scale)
    ids = random_ids(2, 16)
    raw = np.abs(first_block_raw_scores(model, ids)).max()
    assert 1e3 < raw < 6e4  # large scores, yet representable in float16 (max 65504)
    logits = model(ids)
    assert logits.dtype == "float32"
    out = to_np(logits)
    assert np.isfinite(out).all() and np.abs(out).max() > 20.0
    for ln in [model.final_norm] * (norm == "pre") + [b.ln_1 for b in model.blocks]:
        assert ln.gamma.dtype == "float32" and ln.beta.dtype == "float32"
    changed = ids.copy()
    changed[:, 8:] = (ids[:, 8:] + 7) % cfg.vocab_size
    np.testing.assert_array_equal(to_np(model(changed))[:, :8], out[:, :8])  # still exactly causal


# --------------------------------------------------------------------- training
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_overfits_one_batch(norm: str) -> None:
    cfg = tiny(norm_position=norm, context=32, vocab_size=128)
    model = build_model(cfg)
    _compile(model, keras.optimizers.AdamW(learning_rate=3e-3, weight_decay=0.0))
    ids = random_ids(4, 33, vocab=128, seed=7)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    start = float(loss_fn(targets, model(inputs)))
    assert start == pytest.approx(math.log(128), rel=0.1)
    dataset = tf.data.Dataset.from_tensors((inputs, targets)).repeat()
    history = model.fit(dataset, steps_per_epoch=60, epochs=1, shuffle=False, verbose=0)
    end = float(loss_fn(targets, model(inputs)))
    assert end < 0.1 * start, (start, end, history.history["loss"])


# ---------------------------------------------------------- no borrowed layers
FORBIDDEN = [
    "keras.layers.MultiHeadAttention",
    "MultiHeadAttention(",
    "LayerNormalization",
    "layers.Embedding",
    "keras_hub.layers",
    "keras_hub.src.layers",
    "torch.nn.Transformer",
]


def package_sources() -> dict[str, str]:
    sources = {p.name: p.read_text(encoding="utf-8") for p in sorted(PACKAGE_DIR.glob("*.py"))}
    assert {"config.py", "layers.py", "model.py"} <= set(sources)
    return sources


def test_package_uses_no_ready_made_transformer_layers() -> None:
    for name, text in package_sources().items():
        for pattern in FORBIDDEN:
            assert pattern not in text, f"tfgpt/{name} mentions {pattern}"


def _guarded_by_fast_attention(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """True if `node` sits in the body (not the else) of an `if ...fast_attention...:`."""
    child, up = node, parents.get(node)
    while up is not None:
        if isinstance(up, ast.If) and "fast_attention" in ast.unparse(up.test) and child in up.body:
            return True
        child, up = up, parents.get(up)
    return False


def test_dot_product_attention_only_behind_fast_attention_switch() -> None:
    uses = 0
    for name, text in package_sources().items():
        tree = ast.parse(text)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            ident = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
            if ident == "dot_product_attention":
                uses += 1
                assert _guarded_by_fast_attention(node, parents), (
                    f"tfgpt/{name}:{node.lineno} uses dot_product_attention outside `if ...fast_attention`"
                )
        for alias in (a for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names):
            assert alias.name != "dot_product_attention", f"tfgpt/{name} imports dot_product_attention"
    assert uses >= 1  # the switch exists


def test_default_model_never_calls_fused_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("keras.ops.dot_product_attention called")

    monkeypatch.setattr(keras.ops, "dot_product_attention", refuse)
    ids = random_ids(2, 8)
    for norm in ("pre", "post"):
        model = build_model(tiny(norm_position=norm))
        assert np.isfinite(to_np(model(ids))).all()
        model.call_with_cache(ids, model.init_cache(2), 0)
    fast = build_model(tiny(fast_attention=True))
    with pytest.raises(AssertionError, match="dot_product_attention called"):  # the patch is effective
        fast(ids)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_fast_attention_matches_from_scratch(norm: str) -> None:
    model = build_model(tiny(norm_position=norm))
    perturb(model)
    fast = build_model(tiny(norm_position=norm, fast_attention=True))
    fast.set_weights(model.get_weights())
    ids = random_ids(2, 24)
    np.testing.assert_allclose(to_np(fast(ids)), to_np(model(ids)), atol=1e-5)
    np.testing.assert_allclose(to_np(fast.hidden_states(ids)), to_np(model.hidden_states(ids)), atol=1e-5)


# ------------------------------------------------------------------------- XLA
def test_xla_forward_equals_eager() -> None:
    model = build_model(tiny(norm_position="post", position_encoding="sinusoidal"))
    perturb(model)
    ids = random_ids(2, 20)
    eager = to_np(model(ids))
    jitted = tf.function(lambda x: model(x), jit_compile=True)
    np.testing.assert_allclose(to_np(jitted(tf.constant(ids))), eager, atol=1e-5)
    pre = build_model(tiny())
    pre.compile(jit_compile=True)
    np.testing.assert_allclose(pre.predict_on_batch(ids), to_np(pre(ids)), atol=1e-5)


def test_sequence_longer_than_context_is_a_clear_error() -> None:
    cfg = tiny(context=16)
    model = build_model(cfg)
    with pytest.raises(ValueError, match="17 tokens from position 0 exceed the context of 16"):
        model(random_ids(1, 17))
    with pytest.raises(ValueError, match="3 tokens from position 14 exceed the context of 16"):
        model.call_with_cache(random_ids(1, 3), model.init_cache(1), 14)
    logits, _ = model.call_with_cache(random_ids(1, 2), model.init_cache(1), 14)  # exactly fills it
    assert tuple(logits.shape) == (1, 2, cfg.vocab_size)
