"""Sampling: how the next token of each row is chosen from its logits (B, V).

A `Sampler` maps logits to token ids with `get_next_token` (keras-hub's `Sampler` is the model). The
samplers are chosen by name (`get_sampler`); a new one is a subclass registered under a name, and
`tfgpt.generation.generate(..., sampler="name")` uses it, with no other file to edit:

    @register_sampler("min_p")
    class MinP(Sampler):
        def get_next_token(self, logits, settings, seeds, step):
            probs = tf.nn.softmax(logits)
            keep = probs >= 0.1 * tf.reduce_max(probs, axis=-1, keepdims=True)
            return self.draw(tf.where(keep, logits, -math.inf), seeds, step)

Built in: "greedy" (argmax), "temperature" (a draw from softmax(l / τ)), "top_k" and "top_p" (the same
draw from the k most likely tokens / the nucleus of mass p), and "default" (τ = 0 greedy, else top-k, then
top-p, then the draw: `sample_logits`). Every sampler receives the call's settings (τ, k, p) as tensors,
so one compiled decoding loop serves every temperature and seed.

Randomness is stateless: row r's draw at position `step` depends only on its logits and the seed
(seeds[r], step) (`Sampler.draw`), never on the rest of the batch, and is the same in eager, graph and XLA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import tensorflow as tf


class SamplingSettings(NamedTuple):
    """The settings of one generate call, as tensors: temperature τ float32 (0 = greedy), top_k int32
    (0 = off), top_p float32 in (0, 1] (1 = off)."""

    temperature: tf.Tensor
    top_k: tf.Tensor
    top_p: tf.Tensor

    @classmethod
    def of(cls, temperature: tf.Tensor | float, top_k: tf.Tensor | int, top_p: tf.Tensor | float) -> SamplingSettings:
        return cls(tf.cast(temperature, tf.float32), tf.cast(top_k, tf.int32), tf.cast(top_p, tf.float32))


# ------------------------------------------------------------------------------- logit filters
def filter_logits(logits: tf.Tensor, top_k: tf.Tensor | int, top_p: tf.Tensor | float) -> tf.Tensor:
    """Set logits outside the top-k set and outside the nucleus to −∞.

    logits (B, V) float32; top_k int (0 = off); top_p float in (0, 1] (1 = off). Top-k is applied
    first, then top-p on the renormalised top-k distribution: the nucleus is the smallest prefix of the
    tokens sorted by probability whose mass reaches top_p (the most likely token is always kept).
    Ties with the last kept logit are kept too.
    """
    logits = tf.convert_to_tensor(logits, tf.float32)
    vocab = tf.shape(logits)[-1]
    top_k = tf.cast(top_k, tf.int32)
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
    sorted_logits = tf.sort(logits, axis=-1, direction="DESCENDING")  # (B, V)
    rank = tf.range(vocab)[None, :]
    sorted_logits_k = tf.where(rank < k, sorted_logits, -math.inf)
    probs = tf.nn.softmax(sorted_logits_k, axis=-1)
    mass_before = tf.math.cumsum(probs, axis=-1, exclusive=True)  # mass of the better-ranked tokens
    keep = (rank < k) & (mass_before < tf.cast(top_p, tf.float32))
    n_keep = tf.maximum(tf.reduce_sum(tf.cast(keep, tf.int32), axis=-1), 1)  # (B,)
    threshold = tf.gather(sorted_logits, n_keep - 1, axis=1, batch_dims=1)  # (B,)
    return tf.where(logits >= threshold[:, None], logits, -math.inf)


# ------------------------------------------------------------------------------------ samplers
class Sampler:
    """Chooses the next token of each row: `get_next_token(logits (B, V) float32, settings, seeds (B,) int64,
    step) -> (B,) int32`. Subclass it, override `get_next_token` (graph-friendly TensorFlow: it runs inside
    the compiled decoding loop) and `register_sampler` it under a name; `draw` is the seeded random draw."""

    name = ""

    def get_next_token(self, logits: tf.Tensor, settings: SamplingSettings, seeds: tf.Tensor,
                       step: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    @staticmethod
    def draw(logits: tf.Tensor, seeds: tf.Tensor, step: tf.Tensor | int) -> tf.Tensor:
        """One draw per row from softmax(logits) by the Gumbel-max trick, argmax(l + g) with
        g = −log(−log u), u ~ U(0, 1) from the stateless Philox seed (seeds[r], step). (XLA has no kernel
        for tf.random.stateless_categorical, hence the Gumbel form.)"""
        vocab = tf.shape(logits)[-1:]
        step = tf.cast(step, tf.int64)
        u = tf.map_fn(
            lambda s: tf.random.stateless_uniform(vocab, tf.stack([s, step]), minval=1e-20, maxval=1.0, alg="philox"),
            tf.cast(seeds, tf.int64),
            fn_output_signature=tf.float32,
        )  # (B, V)
        return tf.argmax(logits - tf.math.log(-tf.math.log(u)), axis=-1, output_type=tf.int32)

    @staticmethod
    def greedy(logits: tf.Tensor) -> tf.Tensor:
        return tf.argmax(logits, axis=-1, output_type=tf.int32)

    def tempered(self, logits: tf.Tensor, settings: SamplingSettings, seeds: tf.Tensor, step: tf.Tensor,
                 top_k: tf.Tensor, top_p: tf.Tensor) -> tf.Tensor:
        """Greedy at τ = 0, else a draw from softmax(filter_logits(l / τ, top_k, top_p))."""

        def draw():
            scaled = logits / tf.maximum(settings.temperature, 1e-30)
            filtered = tf.cond((top_k > 0) | (top_p < 1.0), lambda: filter_logits(scaled, top_k, top_p),
                               lambda: scaled)
            return self.draw(filtered, seeds, step)

        return tf.cond(settings.temperature > 0, draw, lambda: self.greedy(logits))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


SAMPLERS: dict[str, type[Sampler]] = {}


def register_sampler(name: str) -> Callable[[type[Sampler]], type[Sampler]]:
    """Class decorator: make a `Sampler` subclass available as `get_sampler(name)` / `generate(sampler=name)`."""

    def register(cls: type[Sampler]) -> type[Sampler]:
        if not (isinstance(cls, type) and issubclass(cls, Sampler)):
            raise TypeError(f"register_sampler({name!r}) needs a Sampler subclass, got {cls!r}")
        cls.name = name
        SAMPLERS[name] = cls
        return cls

    return register


def get_sampler(sampler: str | Sampler | None = None) -> Sampler:
    """The sampler named `sampler` (None = "default"), or `sampler` itself when it is a Sampler. ValueError for
    an unknown name."""
    if isinstance(sampler, Sampler):
        return sampler
    name = "default" if sampler is None else sampler
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(sorted(SAMPLERS))} or register one "
                         "with tfgpt.sampling.register_sampler")
    return SAMPLERS[name]()


@register_sampler("default")
class DefaultSampler(Sampler):
    """Greedy at τ = 0; otherwise top-k, then top-p (each when set), then a draw from softmax(l / τ)."""

    def get_next_token(self, logits, settings, seeds, step):
        return self.tempered(logits, settings, seeds, step, settings.top_k, settings.top_p)


@register_sampler("greedy")
class GreedySampler(Sampler):
    """argmax of the logits (the settings are ignored)."""

    def get_next_token(self, logits, settings, seeds, step):
        return self.greedy(logits)


@register_sampler("temperature")
class TemperatureSampler(Sampler):
    """A draw from softmax(l / τ) over the whole vocabulary (top_k and top_p ignored; τ = 0 is greedy)."""

    def get_next_token(self, logits, settings, seeds, step):
        return self.tempered(logits, settings, seeds, step, tf.constant(0), tf.constant(1.0))


@register_sampler("top_k")
class TopKSampler(Sampler):
    """A draw from softmax(l / τ) over the top_k most likely tokens (top_p ignored)."""

    def get_next_token(self, logits, settings, seeds, step):
        return self.tempered(logits, settings, seeds, step, settings.top_k, tf.constant(1.0))


@register_sampler("top_p")
class TopPSampler(Sampler):
    """A draw from softmax(l / τ) over the nucleus of mass top_p (top_k ignored)."""

    def get_next_token(self, logits, settings, seeds, step):
        return self.tempered(logits, settings, seeds, step, tf.constant(0), settings.top_p)


def sample_logits(
    logits: tf.Tensor,
    temperature: tf.Tensor | float,
    top_k: tf.Tensor | int,
    top_p: tf.Tensor | float,
    seeds: tf.Tensor,
    step: tf.Tensor | int = 0,
) -> tf.Tensor:
    """Next token ids (B,) int32 from logits (B, V) with the default sampler: greedy (argmax) when
    temperature == 0, otherwise a draw from softmax(filter_logits(logits / temperature, top_k, top_p)),
    row r seeded by (seeds[r], step) (see `Sampler.draw`)."""
    logits = tf.convert_to_tensor(logits, tf.float32)
    return DefaultSampler().get_next_token(logits, SamplingSettings.of(temperature, top_k, top_p), seeds,
                                           tf.cast(step, tf.int64))
