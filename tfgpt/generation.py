"""Text generation: one cached decoding loop, used by the CLI, training's samples and export.

The loop (`Decoder`) is written in graph-friendly TensorFlow so that one call is one graph:

    prefill   logits, caches = model.call_with_cache(prompts[:, :P], caches, 0)   # the prompt, once
    repeat    x_t ~ sampler(logits_{t-1})        (or the prompt token while t is inside a row's prompt)
              logits_t, caches = model.call_with_cache(x_t, caches, t − s)       # one token per step
    until     every row emitted the end-of-text token or its `max_new_tokens`.

(t is the position being filled, s the window start.) How a token is chosen from the logits is the
sampler's business (`tfgpt.sampling`: greedy, temperature, top-k, top-p, or one a user registers).

Prompts of different lengths share the batch left-aligned: row r's token at absolute position t sits at
position t (so learned positions stay right), and while t < len(prompt_r) the "sampled" token is replaced
by the prompt's own token (keras-hub's approach). The prefill covers a fixed bucket P of positions; rows
with shorter prompts have padding there, which the loop overwrites position by position before any
query can attend to it (the causal mask only looks back). Each row's output therefore equals the row
generated alone.

Past the context T the window slides in chunks: when the cache is full, the last `keep = T − T/4`
tokens are prefilled again at positions 0…keep−1 and decoding goes on (window start s). The uncached
path (`use_cache=False`, the reference and the benchmark baseline) runs the full model over the same
window at every step, so both paths condition on the same tokens.

The key/value cache is one (Kᵀ, V) pair per block, Kᵀ (B·H, d_k, C) and V (B·H, C, d_k) with C the
window length below (`GPT.init_cache`), written with `slice_update` at a traced position and read
under a traced mask: XLA updates each buffer in place, and one compiled loop serves every position (an
index such as `x[:, t]` with t a function argument would recompile per value).

Shapes are fixed per call (batch B, prompt bucket P, buffer length N), the sampling settings are tensors,
and randomness is stateless (row seed, position): the compiled graph is reused across calls with other
prompts, temperatures or seeds, and the same seed gives the same text.
"""

from __future__ import annotations

import random
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow as tf

from tfgpt.common import round_up
from tfgpt.config import sampling_problem
from tfgpt.sampling import Sampler, SamplingSettings, get_sampler

#: Prompts are padded to a multiple of this many tokens (one compiled graph per bucket).
PROMPT_BUCKET = 16
#: The token buffer (prompt + new tokens) is padded to a multiple of this many tokens.
LENGTH_BUCKET = 64


class GenerationError(ValueError):
    """A generation argument is invalid; the message says which and how to fix it."""


def check_sampling(
    max_new_tokens: int | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> None:
    """Raise GenerationError for a setting outside its range (`tfgpt.config.SAMPLING_RULES`: max_new_tokens ≥ 1,
    temperature ≥ 0, top_k ≥ 0 (0 = off), 0 < top_p ≤ 1)."""
    values = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    for name, value in values.items():
        problem = None if value is None else sampling_problem(name, value)
        if problem is not None:
            raise GenerationError(f"{name} {problem}, got {value!r}")


def resolve_sampler(sampler: str | Sampler | None) -> Sampler:
    """`tfgpt.sampling.get_sampler`, with GenerationError for an unknown name."""
    try:
        return get_sampler(sampler)
    except ValueError as exc:
        raise GenerationError(str(exc)) from None


# ------------------------------------------------------------------------------- decoder
class Decoder:
    """The decoding loop of one model, as graph-friendly functions of a state dict.

    `init` prefills, `body` advances one position, `cond` says whether to go on; `run` is the whole
    loop as one `tf.while_loop`. Python callers use `generate`/`stream` (compiled per shape), export
    wraps `run` in its SavedModel signature. All shapes may be dynamic (export) or static (XLA).

    State: position (the position t to fill next), window_start (s), logits (B, V) predicting position t,
    cache (one (Kᵀ, V) pair per block) or a dummy scalar when uncached, buffer (B, N) token ids, done (B,)
    bool, n_new (B,) new tokens written per row. Settings of the call (`settings`): prompt_lens (B,),
    ends (B,) = prompt_lens + max_new_tokens, stop = max(ends), sampling (`SamplingSettings`: temperature,
    top_k, top_p), seeds (B,) = seed + row index, eos_id (scalar, −1 = none).
    """

    def __init__(self, model: Any, use_cache: bool = True, sampler: str | Sampler | None = None) -> None:
        self.model = model
        self.use_cache = bool(use_cache)
        self.sampler = resolve_sampler(sampler)
        self.context = int(model.config.context)
        self.keep = self.context - max(1, self.context // 4)

    # The window (cache) length C = min(T, N): a Python int when N is static, else a tensor.
    def _window_len(self, buffer: tf.Tensor):
        n = buffer.shape[1]
        return min(self.context, n) if n is not None else tf.minimum(self.context, tf.shape(buffer)[1])

    def _may_slide(self, buffer: tf.Tensor) -> bool:
        n = buffer.shape[1]
        return n is None or n > self.context

    def _window(self, buffer: tf.Tensor, start: tf.Tensor, length) -> tf.Tensor:
        """buffer[:, start : start + length] as a gather (positions past the end are clipped)."""
        idx = tf.minimum(start + tf.range(length), tf.shape(buffer)[1] - 1)
        return tf.gather(buffer, idx, axis=1)

    def settings(self, prompt_lens: tf.Tensor, max_new_tokens: tf.Tensor, temperature: tf.Tensor, top_k: tf.Tensor,
                 top_p: tf.Tensor, seed: tf.Tensor, eos_id: tf.Tensor) -> dict[str, Any]:
        """The call's settings as tensors (see the class docstring)."""
        prompt_lens = tf.cast(prompt_lens, tf.int32)
        ends = prompt_lens + tf.cast(max_new_tokens, tf.int32)
        return {"prompt_lens": prompt_lens, "ends": ends, "stop": tf.reduce_max(ends),
                "sampling": SamplingSettings.of(temperature, top_k, top_p),
                "seeds": tf.cast(seed, tf.int64) + tf.range(tf.shape(prompt_lens, tf.int64)[0]),  # row r: seed + r
                "eos_id": tf.cast(eos_id, tf.int32)}

    def init(self, prompts: tf.Tensor, total_len, settings: dict[str, Any]) -> dict[str, tf.Tensor]:
        """Prefill. prompts (B, P) int32, left-aligned and padded, P ≤ T; total_len N ≥ max(ends)."""
        prompts = tf.cast(prompts, tf.int32)
        batch = tf.shape(prompts)[0]
        pad = tf.zeros([batch, total_len - tf.shape(prompts)[1]], tf.int32)
        buffer = tf.concat([prompts, pad], axis=1)  # (B, N)
        if isinstance(total_len, int):
            buffer = tf.ensure_shape(buffer, [None, total_len])
        window = self._window_len(buffer)
        first = tf.reduce_min(settings["prompt_lens"])  # the first position any row samples
        if self.use_cache:
            cache = self.model.init_cache(batch, window)
            logits, cache = self.model.call_with_cache(prompts, cache, 0)  # (B, P, V)
        else:
            cache = tf.zeros([], tf.float32)
            logits = self.model(self._window(buffer, 0, window))  # (B, C, V)
        return {"position": first, "window_start": tf.zeros([], tf.int32),
                "logits": tf.gather(logits, first - 1, axis=1), "cache": cache, "buffer": buffer,
                "done": tf.zeros([batch], tf.bool), "n_new": tf.zeros([batch], tf.int32)}

    def cond(self, state: dict[str, tf.Tensor], settings: dict[str, Any]) -> tf.Tensor:
        return (state["position"] < settings["stop"]) & ~tf.reduce_all(state["done"])

    def slide(self, state: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """When the window is full (t − s ≥ C), move its start to s = t − keep and, cached, refill the
        cache with the `keep` tokens before t; otherwise leave the state as it is."""
        if not self._may_slide(state["buffer"]):
            return state
        position, window_start, cache = state["position"], state["window_start"], state["cache"]
        full = position - window_start >= self._window_len(state["buffer"])
        window_start = tf.where(full, position - self.keep, window_start)
        if self.use_cache:
            cache = tf.cond(full, lambda: self._refill(state["buffer"], window_start, cache), lambda: cache)
        return {**state, "window_start": window_start, "cache": cache}

    def step(self, state: dict[str, tf.Tensor], settings: dict[str, Any]) -> dict[str, tf.Tensor]:
        """Choose the token at position t, write it, and run the model on it (logits for t + 1);
        the window must have room (t − s < C)."""
        position, window_start = state["position"], state["window_start"]
        buffer, done, cache = state["buffer"], state["done"], state["cache"]
        sampled = self.sampler.get_next_token(state["logits"], settings["sampling"], settings["seeds"],
                                              tf.cast(position, tf.int64))
        in_prompt = position < settings["prompt_lens"]  # (B,)
        active = ~in_prompt & ~done
        token = tf.where(in_prompt, tf.gather(buffer, position, axis=1), tf.where(done, 0, sampled))
        rows = tf.range(tf.shape(buffer)[0])
        buffer = tf.tensor_scatter_nd_update(buffer, tf.stack([rows, tf.fill(tf.shape(token), position)], axis=1),
                                             token)
        n_new = state["n_new"] + tf.cast(active, tf.int32)
        done = done | (active & ((token == settings["eos_id"]) | (position + 1 >= settings["ends"])))

        if self.use_cache:
            logits, cache = self.model.call_with_cache(token[:, None], cache, position - window_start)
            logits = logits[:, 0]
        else:
            window = self._window(buffer, window_start, self._window_len(buffer))
            logits = tf.gather(self.model(window), position - window_start, axis=1)
        return {"position": position + 1, "window_start": window_start, "logits": logits, "cache": cache,
                "buffer": buffer, "done": done, "n_new": n_new}

    def body(self, state: dict[str, tf.Tensor], settings: dict[str, Any]) -> dict[str, tf.Tensor]:
        """One position: slide the window if it is full, then `step`."""
        return self.step(self.slide(state), settings)

    def _refill(self, buffer: tf.Tensor, window_start: tf.Tensor, cache: list) -> list:
        """Caches of the `keep` tokens at positions s … s+keep−1, written at slots 0 … keep−1."""
        _, cache = self.model.call_with_cache(self._window(buffer, window_start, self.keep), cache, 0)
        return cache

    def run(self, prompts: tf.Tensor, total_len, settings: dict[str, Any]) -> tuple[tf.Tensor, tf.Tensor]:
        """The whole loop in one graph -> (buffer (B, N), n_new (B,)); row r's new tokens are
        buffer[r, prompt_lens[r] : prompt_lens[r] + n_new[r]] (the end-of-text token included).

        Two nested loops when the window may slide: the inner one `step`s while the window has room,
        the outer one slides it. (A slide test inside the per-token loop puts the caches through a
        conditional at every step, after which XLA copies them instead of updating them in place:
        bench/RESULTS.md, "Decoding under XLA".)"""
        state = self.init(prompts, total_len, settings)
        limit = tf.shape(state["buffer"])[1]

        def steps(state):
            room = self._window_len(state["buffer"])
            (state,) = tf.while_loop(
                lambda s: self.cond(s, settings) & (s["position"] - s["window_start"] < room),
                lambda s: (self.step(s, settings),),
                (state,),
                maximum_iterations=limit,
            )
            return state

        if not self._may_slide(state["buffer"]):
            state = steps(state)
        else:
            (state,) = tf.while_loop(
                lambda s: self.cond(s, settings), lambda s: (steps(self.slide(s)),), (state,),
                maximum_iterations=limit,
            )
        return state["buffer"], state["n_new"]


# ------------------------------------------------------------------ Python-side entry points
class _Compiled:
    """The tf.functions of one model and sampler: traced once per (batch, prompt bucket, buffer length)."""

    def __init__(self, model: Any, use_cache: bool, jit_compile: bool, sampler: str | Sampler | None) -> None:
        decoder = Decoder(model, use_cache, sampler)
        self.run = tf.function(lambda prompts, total_len, settings: decoder.run(prompts, total_len, settings),
                               jit_compile=jit_compile)
        self.init = tf.function(lambda prompts, total_len, settings: decoder.init(prompts, total_len, settings),
                                jit_compile=jit_compile)
        self.body = tf.function(decoder.body, jit_compile=jit_compile)
        self.cond = tf.function(decoder.cond)
        self.settings = decoder.settings


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(model: Any, use_cache: bool = True, jit_compile: bool = True,
             sampler: str | Sampler | None = None) -> _Compiled:
    """The (cached) compiled decoding functions of `model` with `sampler` (a name, a Sampler, None = "default");
    `.run.experimental_get_tracing_count()` counts its traces."""
    per_model = _COMPILED.setdefault(model, {})
    key = (bool(use_cache), bool(jit_compile), "default" if sampler is None else sampler)
    if key not in per_model:
        per_model[key] = _Compiled(model, *key)
    return per_model[key]


def _pad_prompts(model: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int):
    """Validate and pad prompts: (prompts (B, P) int32, lengths (B,), buffer length N)."""
    import numpy as np

    context, vocab = int(model.config.context), int(model.config.vocab_size)
    rows = [[int(t) for t in ids] for ids in prompt_ids]
    if not rows:
        raise GenerationError("no prompts given; pass at least one list of token ids")
    for i, ids in enumerate(rows):
        if not ids:
            raise GenerationError(f"prompt {i} is empty; start it with the end-of-text id (generate_text does)")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")
    if any(len(ids) > context for ids in rows):
        warnings.warn(
            f"prompt longer than the model's context ({context} tokens): keeping its last {context} tokens",
            stacklevel=3,
        )
        rows = [ids[-context:] for ids in rows]
    lengths = np.array([len(ids) for ids in rows], np.int32)
    bucket = min(context, round_up(int(lengths.max()), PROMPT_BUCKET))
    total = round_up(bucket + max_new_tokens, LENGTH_BUCKET)
    if bucket + max_new_tokens <= context:
        total = min(total, context)
    prompts = np.zeros((len(rows), bucket), np.int32)
    for i, ids in enumerate(rows):
        prompts[i, : len(ids)] = ids
    return prompts, lengths, total


def _prepare_call(model, prompt_ids, max_new_tokens, use_cache, jit_compile, sampler, temperature, top_k, top_p,
                  seed, eos_id):
    """Shared set-up of `generate` and `stream`: check the settings, pad the prompts, get the compiled
    loop and the call's settings as tensors. Returns (fns, prompts, lengths, total, settings)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    resolve_sampler(sampler)  # an unknown name fails here, before any tracing
    prompts, lengths, total = _pad_prompts(model, prompt_ids, max_new_tokens)
    fns = compiled(model, use_cache, jit_compile, sampler)
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    settings = fns.settings(
        tf.constant(lengths), tf.constant(max_new_tokens, tf.int32), tf.constant(temperature, tf.float32),
        tf.constant(top_k, tf.int32), tf.constant(top_p, tf.float32), tf.constant(int(seed), tf.int64),
        tf.constant(-1 if eos_id is None else int(eos_id), tf.int32),
    )
    return fns, prompts, lengths, total, settings


def generate(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    jit_compile: bool = True,
    sampler: str | Sampler | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens, all rows in one batch and one graph.

    Args:
        model: a GPT (anything with `config`, `__call__`, `init_cache`, `call_with_cache`).
        prompt_ids: one non-empty list of token ids per row (any lengths; longer than the context:
            the last `context` tokens are kept, with a warning).
        max_new_tokens: new tokens per row at most.
        temperature: 0 = greedy; otherwise logits are divided by it before top-k/top-p.
        top_k: keep the k most likely tokens (0 = off). top_p: keep the nucleus of mass top_p (1 = off).
        seed: row r samples with seed + r: the same seed gives the same output, and a row's output does
            not depend on the other rows (None = random).
        eos_id: stop a row after it emits this token (included in the output).
        use_cache: False runs the whole window through the model at every step (reference/baseline).
        jit_compile: compile the loop with XLA.
        sampler: how a token is chosen (`tfgpt.sampling`): a registered name ("default", "greedy",
            "temperature", "top_k", "top_p", or a user's) or a Sampler; None = "default".

    Returns:
        The new token ids of each row (not the prompt).

    Example:
        >>> generate(model, [[3, 71, 9]], 20, temperature=0)   # greedy
    """
    fns, prompts, lengths, total, settings = _prepare_call(
        model, prompt_ids, max_new_tokens, use_cache, jit_compile, sampler, temperature, top_k, top_p, seed, eos_id
    )
    buffer, n_new = fns.run(tf.constant(prompts), total, settings)
    buffer, n_new = buffer.numpy(), n_new.numpy()
    return [buffer[r, lengths[r] : lengths[r] + n_new[r]].tolist() for r in range(len(lengths))]


def stream(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
    jit_compile: bool = True,
    sampler: str | Sampler | None = None,
) -> Iterator[list[int | None]]:
    """Like `generate`, one step at a time: yields, per step, each row's new token (None for a row that
    is still in its prompt or already finished). Same loop body and seeds as `generate`, so the
    concatenated tokens equal `generate`'s output."""
    fns, prompts, lengths, total, settings = _prepare_call(
        model, prompt_ids, max_new_tokens, True, jit_compile, sampler, temperature, top_k, top_p, seed, eos_id
    )
    state = fns.init(tf.constant(prompts), total, settings)
    while bool(fns.cond(state, settings)):
        before = state["n_new"].numpy()
        position = int(state["position"])
        state = fns.body(state, settings)
        wrote = state["n_new"].numpy() > before
        column = state["buffer"][:, position].numpy()
        yield [int(token) if new else None for token, new in zip(column, wrote, strict=True)]


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """[eos] + encode(prompt): every story starts after an end-of-text token (empty prompt = [eos])."""
    return [tokenizer.eos_id, *tokenizer.encode(prompt)]


def completion_text(tokenizer: Any, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text that `new_ids` add after `prompt_ids` (decoded together, so a character spelled by byte
    pieces across the boundary still comes out whole)."""
    head = tokenizer.decode(prompt_ids)
    full = tokenizer.decode([*prompt_ids, *new_ids])
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new_ids)


def generate_text(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 200, **sampling: Any
) -> list[str]:
    """Continue each text prompt; returns the completions (the text after each prompt).

    Prompt ids are [eos] + encode(prompt); generation stops at the end-of-text token. `sampling` takes
    the keyword arguments of `generate` (temperature, top_k, top_p, seed, use_cache, jit_compile, sampler).
    """
    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    new = generate(model, ids, max_new_tokens, eos_id=tokenizer.eos_id, **sampling)
    return [completion_text(tokenizer, prompt, completion) for prompt, completion in zip(ids, new, strict=True)]
