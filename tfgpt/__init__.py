"""tfgpt: a GPT-2-style language model written from scratch in Keras 3 / TensorFlow.

`import tfgpt` (and `tfgpt.config`, `tfgpt.common`) does not import TensorFlow; `tfgpt.GPT` and
`tfgpt.build_model` import it on first use.
"""

from __future__ import annotations

from typing import Any

from tfgpt.config import PRESETS, ConfigError, GPTConfig

__all__ = ["GPT", "GPTConfig", "ConfigError", "PRESETS", "build_model"]
__version__ = "0.1.0"

_LAZY = {"GPT": "tfgpt.model", "build_model": "tfgpt.model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tfgpt' has no attribute {name!r}")
