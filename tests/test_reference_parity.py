"""Parity with keras-hub's GPT-2: the same weights give the same hidden states and logits.

keras_hub.models.GPT2Backbone is an independent GPT-2 implementation (separate q/k/v EinsumDense
projections, keras LayerNormalization, ReversibleEmbedding). Copying its weights into tfgpt's
from-scratch layers must reproduce its final hidden states, which checks the fused-QKV layout,
head split/merge, the causal mask, the 1/√d_k scale, the tanh GELU, the pre-LN residual wiring,
ε, the position embeddings and the final LayerNorm all at once.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from tfgpt.config import GPTConfig
from tfgpt.model import GPT, build_model

keras_hub = pytest.importorskip("keras_hub")

V, L, D, H, T = 300, 2, 64, 4, 32


def reference_backbone() -> keras.Model:
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=V,
        num_layers=L,
        num_heads=H,
        hidden_dim=D,
        intermediate_dim=4 * D,
        max_sequence_length=T,
        dropout=0.0,
    )
    rng = np.random.default_rng(0)
    for var in backbone.weights:  # biases and β are zero, γ one at init: make every weight count
        noise = rng.normal(0.0, 0.05, var.shape).astype("float32")
        var.assign(var.numpy() + noise)
    return backbone


def copy_weights(backbone: keras.Model, model: GPT) -> None:
    """keras-hub GPT2Backbone weights -> tfgpt GPT (same sizes, pre-LN, learned positions, tied)."""
    w = {var.path: var.numpy() for var in backbone.weights}
    model.embedding.token_embeddings.assign(w["token_embedding/embeddings"])
    model.embedding.position_embeddings.assign(w["position_embedding/embeddings"])
    for i, block in enumerate(model.blocks):
        p = f"transformer_layer_{i}/"
        att = p + "self_attention/"
        # q/k/v EinsumDense kernels (D, H, d_k) and biases (H, d_k) -> fused (D, 3D) and (3D,),
        # columns [q | k | v], head h at columns h·d_k … (h+1)·d_k − 1 of each third.
        block.attn.qkv.kernel.assign(
            np.concatenate([w[f"{att}{n}/kernel"].reshape(D, D) for n in ("query", "key", "value")], axis=1)
        )
        block.attn.qkv.bias.assign(
            np.concatenate([w[f"{att}{n}/bias"].reshape(D) for n in ("query", "key", "value")])
        )
        block.attn.out_proj.kernel.assign(w[f"{att}attention_output/kernel"].reshape(D, D))  # (H, d_k, D)
        block.attn.out_proj.bias.assign(w[f"{att}attention_output/bias"])
        block.ln_1.gamma.assign(w[p + "self_attention_layer_norm/gamma"])
        block.ln_1.beta.assign(w[p + "self_attention_layer_norm/beta"])
        block.ln_2.gamma.assign(w[p + "feedforward_layer_norm/gamma"])
        block.ln_2.beta.assign(w[p + "feedforward_layer_norm/beta"])
        block.ffn.fc_in.kernel.assign(w[p + "feedforward_intermediate_dense/kernel"])
        block.ffn.fc_in.bias.assign(w[p + "feedforward_intermediate_dense/bias"])
        block.ffn.fc_out.kernel.assign(w[p + "feedforward_output_dense/kernel"])
        block.ffn.fc_out.bias.assign(w[p + "feedforward_output_dense/bias"])
    model.final_norm.gamma.assign(w["layer_norm/gamma"])
    model.final_norm.beta.assign(w["layer_norm/beta"])


@pytest.fixture(scope="module")
def pair() -> tuple[keras.Model, GPT]:
    keras.mixed_precision.set_global_policy("float32")  # module-scoped: built before the autouse reset
    keras.utils.set_random_seed(4321)
    backbone = reference_backbone()
    cfg = GPTConfig(vocab_size=V, context=T, d_model=D, n_layers=L, n_heads=H, layer_norm_epsilon=1e-5)
    model = build_model(cfg)
    copy_weights(backbone, model)
    return backbone, model


def test_same_parameter_count(pair: tuple[keras.Model, GPT]) -> None:
    backbone, model = pair
    assert backbone.count_params() == model.count_params() == model.config.num_parameters()


@pytest.mark.parametrize("length", [T, 9])
def test_hidden_states_and_logits_match_keras_hub(pair: tuple[keras.Model, GPT], length: int) -> None:
    backbone, model = pair
    ids = np.random.default_rng(length).integers(0, V, (3, length)).astype("int32")
    ref_hidden = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    ours_hidden = model.hidden_states(ids)
    ref, ours = ops.convert_to_numpy(ref_hidden), ops.convert_to_numpy(ours_hidden)
    assert ours.shape == ref.shape == (3, length, D)
    assert np.abs(ref).max() > 0.5  # a non-degenerate comparison
    assert np.abs(ours - ref).max() <= 1e-4

    # tied head: logits = h Eᵀ with keras-hub's token embedding (ReversibleEmbedding, reverse=True)
    ref_logits = ops.convert_to_numpy(backbone.token_embedding(ref_hidden, reverse=True))
    logits = ops.convert_to_numpy(model(ids))
    assert logits.shape == ref_logits.shape == (3, length, V)
    assert np.abs(logits - ref_logits).max() <= 1e-4


def test_parity_is_sensitive_to_the_weight_mapping(pair: tuple[keras.Model, GPT]) -> None:
    """Guard against a vacuous comparison: a wrong q/k/v order visibly breaks parity."""
    backbone, model = pair
    ids = np.random.default_rng(1).integers(0, V, (2, 16)).astype("int32")
    ref = ops.convert_to_numpy(backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    qkv = model.blocks[0].attn.qkv.kernel
    original = qkv.numpy()
    try:
        qkv.assign(np.concatenate([original[:, D : 2 * D], original[:, :D], original[:, 2 * D :]], axis=1))
        swapped = ops.convert_to_numpy(model.hidden_states(ids))
    finally:
        qkv.assign(original)
    assert np.abs(swapped - ref).max() > 1e-2
