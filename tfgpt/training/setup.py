"""What a training run is made of, set up before any step: its data (tokenizer, token streams, batches),
its plan (steps, epochs, the learning-rate schedule) and its hardware (strategy, precision, XLA).
`tfgpt.training.job.train` builds these three, then the model and its callbacks.

Symbols: B = global batch size, T = context, S = steps per epoch = ⌊(N−1)/T⌋ // B for N tokens.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfgpt.common import BUNDLED_DATA, repo_relative
from tfgpt.config import GPTConfig
from tfgpt.data import DataError, steps_per_epoch, token_stream
from tfgpt.stories import looks_like_path
from tfgpt.tokenizer import Tokenizer
from tfgpt.training.config import TrainConfig, TrainConfigError
from tfgpt.training.optim import WarmupCosine
from tfgpt.training.strategy import is_chief, resolve_precision, resolve_strategy, resolve_xla, strategy_kind


class HubUnavailableError(DataError):
    """A Hugging Face dataset id could not be loaded (no network, or no such dataset)."""


@dataclass
class RunData:
    """The tokenizer, the model it sizes, the token streams and the batches they give."""

    tokenizer: Tokenizer
    model_config: GPTConfig
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    steps_per_epoch: int
    val_batches: int


@dataclass
class Plan:
    """How long the run trains and its learning-rate schedule (built once, here)."""

    total_steps: int
    epochs: int
    warmup: int
    schedule: WarmupCosine


@dataclass
class Hardware:
    """The strategy and what it resolved to."""

    strategy: tf.distribute.Strategy
    precision: str
    xla: bool
    chief: bool

    @property
    def kind(self) -> str:
        return strategy_kind(self.strategy)

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync



# =========================================================================== building them
def validation_text(cfg: TrainConfig) -> str:
    """What the run validates on, for config.json."""
    if cfg.dev_fraction:
        return f"{repo_relative(cfg.data)} (dev split: {cfg.dev_fraction:g} of the train stories, tfgpt.data)"
    if cfg.val_data:
        return repo_relative(cfg.val_data)
    return f"{repo_relative(cfg.data)} (validation split)"


def load_tokens(source: str, tokenizer: Tokenizer, split: str, cfg: TrainConfig) -> np.ndarray:
    """The token stream of one split (tokenised once, then cached); a Hub id that cannot be loaded is a
    HubUnavailableError that names the bundled sample."""
    try:
        return token_stream(source, tokenizer, split, cache_dir=cfg.cache_dir, val_fraction=cfg.val_fraction,
                            dev_fraction=cfg.dev_fraction, train_fraction=cfg.train_fraction if split == "train" else 1.0,
                            progress=sys.stderr.isatty())
    except DataError as exc:
        if looks_like_path(source) or Path(source).expanduser().exists():
            raise
        raise HubUnavailableError(f"the Hugging Face dataset {source} cannot be loaded (is the Hub reachable? is the "
                                  f"id right?); without internet pass --data {BUNDLED_DATA} (the bundled TinyStories "
                                  "sample)") from exc


def load_data(cfg: TrainConfig) -> RunData:
    tokenizer = Tokenizer.load(cfg.tokenizer)
    model_config = cfg.model_config(tokenizer.vocab_size)
    T, B = model_config.context, cfg.batch_size
    train_tokens = load_tokens(cfg.data, tokenizer, "train", cfg)
    if cfg.dev_fraction:  # train on the rest of the train stories, validate on the dev split
        val_tokens = load_tokens(cfg.data, tokenizer, "dev", cfg)
    else:
        val_tokens = load_tokens(cfg.val_data or cfg.data, tokenizer, "validation", cfg)
    spe = steps_per_epoch(train_tokens, T, B)
    if spe < 1:
        raise DataError(f"{cfg.data} gives {len(train_tokens)} training tokens: not one batch of {B} windows of "
                        f"{T + 1} tokens; use more data or a smaller --batch-size/--context")
    val_batches = steps_per_epoch(val_tokens, T, B)
    if val_batches < 1:
        raise DataError(f"the validation split has {len(val_tokens)} tokens: not one batch of {B} windows of "
                        f"{T + 1} tokens; pass a larger --val-data or raise --val-fraction")
    if cfg.val_steps is not None:
        val_batches = min(val_batches, cfg.val_steps)
    return RunData(tokenizer, model_config, train_tokens, val_tokens, spe, val_batches)


def plan_steps(cfg: TrainConfig, data: RunData, notify: Callable[[str], None]) -> Plan:
    spe = data.steps_per_epoch
    total_steps = cfg.epochs * spe if cfg.max_steps is None else min(cfg.epochs * spe, cfg.max_steps)
    warmup, notice = cfg.warmup_steps(total_steps)
    if notice:
        notify(notice)
    schedule = WarmupCosine(cfg.lr, warmup, total_steps, cfg.min_lr_ratio)
    return Plan(total_steps, math.ceil(total_steps / spe), warmup, schedule)


def resolve_hardware(cfg: TrainConfig, notify: Callable[[str], None]) -> Hardware:
    strategy = resolve_strategy(cfg.strategy)
    if cfg.batch_size % strategy.num_replicas_in_sync:
        raise TrainConfigError(f"--batch-size {cfg.batch_size} must be divisible by the "
                               f"{strategy.num_replicas_in_sync} replicas of the strategy")
    precision = resolve_precision(cfg.precision, strategy)
    return Hardware(strategy, precision, resolve_xla(cfg.xla, strategy, notify), is_chief(strategy))
