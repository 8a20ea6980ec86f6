"""GPTConfig: presets, validation messages, dict round trip, parameter count vs the built model."""

from __future__ import annotations

import json

import pytest

from tfgpt.config import PRESETS, ConfigError, GPTConfig, field_names
from tfgpt.model import build_model

GPT2_SMALL_PARAMS = 124_439_808  # Radford et al. 2019, V=50257, T=1024, tied embeddings


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_load(name: str) -> None:
    cfg = GPTConfig.from_preset(name)
    assert cfg.name == name
    assert cfg.d_ff == 4 * cfg.d_model  # d_ff=0 resolves to 4·D
    assert cfg.head_dim * cfg.n_heads == cfg.d_model
    assert cfg.norm_position == "pre" and cfg.position_encoding == "learned" and cfg.tie_embeddings


def test_preset_sizes() -> None:
    small = GPTConfig.from_preset("gpt2-small")
    assert (small.vocab_size, small.context, small.d_model, small.n_layers, small.n_heads, small.d_ff) == (
        50257,
        1024,
        768,
        12,
        12,
        3072,
    )
    tiny = GPTConfig.from_preset("tiny")
    assert (tiny.vocab_size, tiny.context, tiny.d_model, tiny.n_layers, tiny.n_heads) == (512, 64, 64, 2, 4)


def test_from_preset_applies_overrides() -> None:
    cfg = GPTConfig.from_preset("tiny", n_layers=3, norm_position="post", dropout=0.1)
    assert (cfg.n_layers, cfg.norm_position, cfg.dropout) == (3, "post", 0.1)
    assert cfg.d_model == PRESETS["tiny"].d_model
    assert PRESETS["tiny"].n_layers == 2  # the preset itself is untouched


def test_unknown_preset_lists_known_presets() -> None:
    with pytest.raises(ConfigError) as info:
        GPTConfig.from_preset("gpt5-huge")
    message = str(info.value)
    assert "gpt5-huge" in message
    for name in PRESETS:
        assert name in message


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"d_model": 64, "n_heads": 5}, r"d_model \(64\) must be divisible by n_heads \(5\)"),
        ({"d_model": 0}, r"d_model must be a positive integer, got 0"),
        ({"vocab_size": -3}, r"vocab_size must be a positive integer, got -3"),
        ({"context": 0}, r"context must be a positive integer"),
        ({"n_layers": 0}, r"n_layers must be a positive integer"),
        ({"n_heads": 0}, r"n_heads must be a positive integer"),
        ({"n_layers": 2.0}, r"n_layers must be a positive integer"),
        ({"n_layers": True}, r"n_layers must be a positive integer"),
        ({"d_ff": -1}, r"d_ff must be a positive integer"),
        ({"norm_position": "middle"}, r"norm_position must be one of \('pre', 'post'\), got 'middle'"),
        (
            {"position_encoding": "rotary"},
            r"position_encoding must be one of \('learned', 'sinusoidal'\), got 'rotary'",
        ),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"attention_dropout": 1.5}, r"attention_dropout must be in \[0, 1\)"),
        ({"layer_norm_epsilon": 0.0}, r"layer_norm_epsilon must be > 0"),
        (
            {"d_model": 63, "n_heads": 3, "position_encoding": "sinusoidal"},
            r"sinusoidal positions need an even d_model, got 63",
        ),
    ],
)
def test_validation_messages(overrides: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        GPTConfig.from_preset("tiny", **overrides)
    with pytest.raises(ConfigError, match=pattern):  # the constructor validates too
        GPTConfig(**{**PRESETS["tiny"].to_dict(), **overrides})


def test_divisibility_message_suggests_valid_head_counts() -> None:
    with pytest.raises(ConfigError) as info:
        GPTConfig(d_model=48, n_heads=5)
    assert "[1, 2, 3, 4, 6, 8, 12, 16, 24, 48]" in str(info.value)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"unknown GPTConfig field\(s\) \['n_embd'\]"):
        GPTConfig.from_preset("tiny", n_embd=32)
    with pytest.raises(ConfigError, match=r"unknown GPTConfig field\(s\) \['blocks'\]"):
        GPTConfig.from_dict({**PRESETS["tiny"].to_dict(), "blocks": 3})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_dict_from_dict_round_trip(name: str) -> None:
    cfg = GPTConfig.from_preset(name, dropout=0.1, tie_embeddings=False, position_encoding="sinusoidal")
    data = cfg.to_dict()
    assert set(data) == set(field_names())
    again = GPTConfig.from_dict(json.loads(json.dumps(data)))  # survives JSON too
    assert again == cfg
    assert again.to_dict() == data
    assert again.name == name


def test_explicit_d_ff_is_kept() -> None:
    cfg = GPTConfig.from_preset("tiny", d_ff=96)
    assert cfg.d_ff == 96
    assert GPTConfig.from_dict(cfg.to_dict()).d_ff == 96


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False},
        {"norm_position": "post"},
        {"position_encoding": "sinusoidal"},
        {"norm_position": "post", "position_encoding": "sinusoidal", "tie_embeddings": False},
        {"use_bias": False, "d_ff": 80, "n_layers": 3},
    ],
    ids=["tied-pre-learned", "untied", "post", "sinusoidal", "post-sinusoidal-untied", "nobias-dff80-L3"],
)
def test_num_parameters_equals_count_params(overrides: dict) -> None:
    cfg = GPTConfig.from_preset("tiny", **overrides)
    model = build_model(cfg)
    assert cfg.num_parameters() == model.count_params()
    trainable = sum(int(v.numpy().size) for v in model.trainable_variables)
    assert trainable == cfg.num_parameters()


def test_gpt2_small_has_124m_parameters() -> None:
    cfg = GPTConfig.from_preset("gpt2-small")
    assert cfg.num_parameters() == GPT2_SMALL_PARAMS
    model = build_model(cfg)  # builds the real 124M-parameter model (no forward pass)
    assert model.count_params() == GPT2_SMALL_PARAMS
