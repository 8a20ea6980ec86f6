"""`GPTConfig`: the one configuration object of tfgpt, with named presets.

Symbols used across the code, docstrings and report:
  V = vocab_size, T = context (max sequence length), D = d_model, L = n_layers,
  H = n_heads, d_k = D / H (head size), F = d_ff (feed-forward width).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

NORM_POSITIONS = ("pre", "post")
POSITION_ENCODINGS = ("learned", "sinusoidal")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and how to fix it."""


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of a GPT model.

    Attributes:
        vocab_size: V, number of token ids.
        context: T, the longest sequence the model attends over (positions 0..T-1).
        d_model: D, width of the residual stream.
        n_layers: L, number of decoder blocks.
        n_heads: H, attention heads per block; D must be divisible by H.
        d_ff: F, hidden width of the feed-forward sub-layer (0 means 4·D).
        dropout: dropout rate on embeddings, residual branches and the feed-forward hidden layer.
        attention_dropout: dropout rate on the attention probabilities.
        layer_norm_epsilon: ε of every LayerNorm.
        norm_position: "pre" (GPT-2: LayerNorm before each sub-layer + final LayerNorm) or
            "post" (Vaswani et al.: LayerNorm after each residual add).
        position_encoding: "learned" (GPT-2) or "sinusoidal" (Vaswani et al.).
        tie_embeddings: share the token embedding matrix with the output projection.
        use_bias: biases in the Dense projections (GPT-2 has them).
        fast_attention: use the backend's fused attention kernel instead of the from-scratch
            softmax(QKᵀ/√d_k + M)·V. Off by default; tests compare both paths.
    """

    vocab_size: int = 4096
    context: int = 256
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    d_ff: int = 0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    norm_position: str = "pre"
    position_encoding: str = "learned"
    tie_embeddings: bool = True
    use_bias: bool = True
    fast_attention: bool = False
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for attr in ("vocab_size", "context", "d_model", "n_layers", "n_heads"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{attr} must be a positive integer, got {value!r}")
        if not isinstance(self.d_ff, int) or self.d_ff < 0:
            raise ConfigError(f"d_ff must be a positive integer (or 0 for 4*d_model), got {self.d_ff!r}")
        if self.d_ff == 0:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                f"pick n_heads from {[h for h in range(1, self.d_model + 1) if self.d_model % h == 0][:12]}"
            )
        for attr in ("dropout", "attention_dropout"):
            value = getattr(self, attr)
            if not 0.0 <= float(value) < 1.0:
                raise ConfigError(f"{attr} must be in [0, 1), got {value!r}")
        if not float(self.layer_norm_epsilon) > 0:
            raise ConfigError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        if self.norm_position not in NORM_POSITIONS:
            raise ConfigError(f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ConfigError(
                f"position_encoding must be one of {POSITION_ENCODINGS}, got {self.position_encoding!r}"
            )
        if self.position_encoding == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"sinusoidal positions need an even d_model, got {self.d_model}")

    @property
    def head_dim(self) -> int:
        """d_k = D / H."""
        return self.d_model // self.n_heads

    def replace(self, **overrides: Any) -> GPTConfig:
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown GPTConfig field(s) {unknown}; known: {field_names()}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        unknown = sorted(set(values) - set(field_names()))
        if unknown:
            raise ConfigError(f"unknown GPTConfig field(s) {unknown}; known: {field_names()}")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """The named preset, with `overrides` applied; an unknown name lists the known ones."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    def num_parameters(self) -> int:
        """Trainable parameter count, computed from the sizes (matches `model.count_params()`)."""
        D, F, V, T, L = self.d_model, self.d_ff, self.vocab_size, self.context, self.n_layers
        b = 1 if self.use_bias else 0
        attn = D * 3 * D + b * 3 * D + D * D + b * D
        ffn = D * F + b * F + F * D + b * D
        block = attn + ffn + 2 * 2 * D
        emb = V * D + (T * D if self.position_encoding == "learned" else 0)
        final_ln = 2 * D if self.norm_position == "pre" else 0
        head = 0 if self.tie_embeddings else D * V
        return emb + L * block + final_ln + head


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(GPTConfig)]


PRESETS: dict[str, GPTConfig] = {
    # GPT-2 small (Radford et al. 2019): 124,439,808 parameters with V=50257, T=1024.
    "gpt2-small": GPTConfig(
        vocab_size=50257, context=1024, d_model=768, n_layers=12, n_heads=12, name="gpt2-small"
    ),
    # The benchmark size of issue 6 (~5.85 M parameters).
    "bench-6m": GPTConfig(
        vocab_size=4096, context=256, d_model=256, n_layers=6, n_heads=8, name="bench-6m"
    ),
    # What a 2-core CPU trains in an hour or two on TinyStories.
    "cpu-small": GPTConfig(
        vocab_size=4096, context=256, d_model=192, n_layers=4, n_heads=6, name="cpu-small"
    ),
    # Seconds-sized, for tests and smoke runs.
    "tiny": GPTConfig(vocab_size=512, context=64, d_model=64, n_layers=2, n_heads=4, name="tiny"),
}


# =========================================================================== sampling settings
#: The range of each sampling setting, stated once: (integer?, rule, what the rule says). `generate()`
#: (`tfgpt.generation.check_sampling`), the command lines' argument types (`tfgpt.cli`) and the SavedModel's
#: `generate` signature (`tfgpt.export`, on tensors: the rules use only comparisons and `&`) all check these.
SAMPLING_RULES: dict[str, tuple[bool, Any, str]] = {
    "max_new_tokens": (True, lambda v: v >= 1, "must be an integer >= 1"),
    "temperature": (False, lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
    "top_k": (True, lambda v: v >= 0, "must be an integer >= 0 (0 = off)"),
    "top_p": (False, lambda v: (v > 0) & (v <= 1), "must be in (0, 1] (1 = off)"),
}


def sampling_problem(name: str, value: Any) -> str | None:
    """What is wrong with `value` for the sampling setting `name` (its rule, e.g. "must be in (0, 1] (1 = off)"),
    or None when it is valid. Integers must be whole numbers (not bools); floats finite numbers."""
    integer, rule, text = SAMPLING_RULES[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) == float("inf"):
        return text
    if integer and int(value) != value:
        return text
    return None if bool(rule(value)) else text
