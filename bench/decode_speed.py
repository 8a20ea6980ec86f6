"""Decode speed: tfgpt's cached loop vs the same loop uncached vs keras-hub's GPT2CausalLM.generate.

    python bench/decode_speed.py [--preset bench-6m] [--new-tokens 256] [--repeats 3]

Random weights (speed does not depend on them), batch 1, a one-token prompt, no early stop, greedy.
Each engine is compiled first (XLA, jit_compile=True), then all are timed round-robin `--repeats`
times; the table gives the median decode rate (new tokens / second, compile excluded) and the compile
time. On a CPU shared with other processes, the absolute numbers move with their load.

* tfgpt cached:   tfgpt.generation.generate (prefill + one token per step, KV cache, one tf.while_loop).
* tfgpt cached, no XLA: the same, jit_compile=False (plain TF graph).
* tfgpt uncached: the same loop with use_cache=False: the whole window (C = min(T, N) tokens) runs
                  through the model at every step.
* keras-hub:      GPT2CausalLM(GPT2Backbone of the same sizes, no preprocessor).generate on token ids,
                  jit_compile=True, greedy sampler, stop_token_ids=None.

Past the context T the tfgpt loop slides its window (T = 256 and 1 + 256 tokens at bench-6m: one refill);
keras-hub cannot go past its max_sequence_length, so its backbone gets T + 1 positions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tfgpt import GPTConfig, build_model  # noqa: E402
from tfgpt.generation import generate  # noqa: E402


def keras_hub_engine(config: GPTConfig, new_tokens: int):
    """A GPT2CausalLM of the same sizes and a function generating `new_tokens` after one token."""
    import keras_hub

    length = 1 + new_tokens
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=config.vocab_size,
        num_layers=config.n_layers,
        num_heads=config.n_heads,
        hidden_dim=config.d_model,
        intermediate_dim=config.d_ff,
        dropout=0.0,
        max_sequence_length=max(config.context, length),
    )
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    lm.jit_compile = True
    inputs = {
        "token_ids": np.zeros((1, length), np.int32),
        "padding_mask": np.arange(length)[None, :] < 1,  # the prompt is position 0
    }

    def run() -> int:
        out = lm.generate(inputs, stop_token_ids=None)
        return int(np.asarray(out["padding_mask"]).sum()) - 1

    return run, backbone.count_params()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="bench-6m")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["cached", "no-xla", "uncached", "keras-hub"])
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    config = GPTConfig.from_preset(args.preset)
    model = build_model(config)
    n = args.new_tokens

    def ours(use_cache: bool, jit_compile: bool = True):
        def run() -> int:
            return len(generate(model, [[0]], n, temperature=0.0, use_cache=use_cache, jit_compile=jit_compile)[0])

        return run

    engines = {
        "tfgpt cached": (ours(True), model.count_params()),
        "tfgpt cached, no XLA": (ours(True, jit_compile=False), model.count_params()),
        "tfgpt uncached": (ours(False), model.count_params()),
    }
    if "keras-hub" not in args.skip:
        engines["keras-hub GPT2CausalLM"] = keras_hub_engine(config, n)
    for name in args.skip:
        engines.pop({"no-xla": "tfgpt cached, no XLA"}.get(name, f"tfgpt {name}"), None)

    print(f"preset {config.name}: {model.count_params():,} parameters, context {config.context}, "
          f"{n} new tokens, batch 1, CPU threads {os.cpu_count()}")
    # Compile (and run once) every engine, then time them round-robin, so that load from other processes
    # on a shared CPU falls on all engines alike.
    first, produced, times = {}, {}, {name: [] for name in engines}
    for name, (run, _) in engines.items():
        start = time.perf_counter()
        produced[name] = run()
        first[name] = time.perf_counter() - start
        print(f"  compiled {name} ({first[name]:.1f} s)", flush=True)
    for _ in range(args.repeats):
        for name, (run, _) in engines.items():
            start = time.perf_counter()
            produced[name] = run()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, (_, params) in engines.items():
        median = statistics.median(times[name])
        rows.append((name, params, produced[name], first[name], median, produced[name] / median))
        print(f"  {name}: {[round(t, 3) for t in times[name]]} s", flush=True)

    base = {r[0]: r[5] for r in rows}.get("tfgpt uncached")
    print()
    print("| engine | params | new tokens | compile + 1st run (s) | median run (s) | tokens/s | vs uncached |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, params, count, compile_s, median, rate in rows:
        ratio = f"{rate / base:.1f}x" if base else "-"
        print(f"| {name} | {params:,} | {count} | {compile_s:.1f} | {median:.3f} | {rate:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
