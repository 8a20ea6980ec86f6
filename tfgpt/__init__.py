"""tfgpt: a GPT-2-style language model written from scratch in Keras 3 / TensorFlow."""

from tfgpt.config import PRESETS, ConfigError, GPTConfig
from tfgpt.model import GPT, build_model

__all__ = ["GPT", "GPTConfig", "ConfigError", "PRESETS", "build_model"]
__version__ = "0.1.0"
