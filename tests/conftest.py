"""Test set-up: quiet TensorFlow, a clean Keras state per test, the bundled TinyStories path."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINYSTORIES = REPO / "data" / "tinystories"


@pytest.fixture(autouse=True)
def _clean_keras_state():
    """Every test starts in float32 with a fresh Keras session and a fixed seed."""
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.clear_session()
    keras.utils.set_random_seed(1234)
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="session")
def tinystories_dir() -> Path:
    """`data/tinystories`: the genuine TinyStories sample the repository carries (CDLA-Sharing-1.0)."""
    if not (TINYSTORIES / "TinyStories-train.head-2MiB.txt.xz").exists():
        pytest.fail(f"bundled TinyStories text not found at {TINYSTORIES}; is the clone complete?")
    return TINYSTORIES
