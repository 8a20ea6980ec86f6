"""Training throughput (tokens/s) of the real training path under each precision x XLA setting.

Each mode builds and compiles the model exactly as `tfgpt.training.train` does (`compile_model`:
AdamW + warmup/cosine, global-norm clipping, the precision policy, `jit_compile`), feeds it the
`tfgpt.data.make_dataset` pipeline (random token ids: throughput does not depend on the text), runs
`model.fit` for warm-up + measured steps and reports the median step time of the measured steps.

    python bench/train_throughput_modes.py                       # bench-6m, B=32, T=256, 10 steps
    python bench/train_throughput_modes.py --preset tiny --steps 5 --batch-size 8 --context 64

The fastest row is what `--precision auto` / `--xla auto` should resolve to on this kind of machine
(tfgpt.training.CPU_AUTO_PRECISION / CPU_AUTO_XLA for CPUs). Timings on a shared CPU are noisy.

Measured (2-core x86-64 CPU with AVX-512/AMX, shared with other jobs: load ~5; TF 2.21, Keras 3.15):

    # bench-6m: 5,853,184 parameters, B=32, T=256, 3 warm-up + 10 measured steps
    | precision      | XLA | first step (s) | median step (s) | min-max (s)  | tokens/s |
    | float32        | off | 18.65          | 7.167           | 5.164-8.466  | 1,143    |
    | float32        | on  | 36.05          | 4.636           | 4.401-6.987  | 1,767    |
    | mixed_bfloat16 | off | 21.13          | 7.465           | 5.301-9.274  | 1,097    |
    | mixed_bfloat16 | on  | 33.52          | 8.448           | 5.333-10.629 |   970    |

so on CPU `auto` = float32 + XLA (the XLA compile costs ~20 s once).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfgpt.config import GPTConfig  # noqa: E402
from tfgpt.data import make_dataset  # noqa: E402
from tfgpt.training import compile_model  # noqa: E402

MODES = [("float32", False), ("float32", True), ("mixed_bfloat16", False), ("mixed_bfloat16", True)]


class StepTimer(keras.callbacks.Callback):
    """Wall time of every train step (train_function call + callbacks)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        loss = float(logs["loss"])  # forces the step to finish before the clock stops
        self.times.append(time.perf_counter() - self._t)
        self.losses.append(loss)


def measure(config: GPTConfig, precision: str, xla: bool, batch: int, warmup: int, steps: int) -> dict:
    keras.utils.clear_session()
    total = warmup + steps
    model = compile_model(
        config,
        strategy=tf.distribute.get_strategy(),
        precision=precision,
        xla=xla,
        lr=1e-3,
        total_steps=1000,
        warmup=10,
    )
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(total + 1) * batch * config.context + 1)
    ds = make_dataset(tokens.astype(np.uint16), config.context, batch, seed=0, repeat=True)
    timer = StepTimer()
    start = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=total, callbacks=[timer], verbose=0, shuffle=False)
    wall = time.perf_counter() - start
    keras.mixed_precision.set_global_policy("float32")
    steady = timer.times[warmup:]
    median = statistics.median(steady)
    return {
        "precision": precision,
        "xla": xla,
        "first_step_s": timer.times[0],
        "median_step_s": median,
        "min_step_s": min(steady),
        "max_step_s": max(steady),
        "tokens_per_s": batch * config.context / median,
        "final_loss": timer.losses[-1],
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench-6m")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=None, help="default: the preset's context")
    p.add_argument("--steps", type=int, default=10, help="measured steps (median over these)")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps discarded first (tracing, XLA compile)")
    p.add_argument("--modes", default="all", help="comma list of precision:xla, e.g. float32:0,mixed_bfloat16:1")
    args = p.parse_args(argv)

    overrides = {"context": args.context} if args.context else {}
    config = GPTConfig.from_preset(args.preset, **overrides)
    modes = MODES if args.modes == "all" else [
        (m.split(":")[0], m.split(":")[1] in ("1", "on", "true")) for m in args.modes.split(",")
    ]
    devices = ", ".join(d.device_type for d in tf.config.list_physical_devices() if d.device_type != "CPU") or "CPU"
    print(f"# {args.preset}: {config.num_parameters():,} parameters, B={args.batch_size}, T={config.context}, "
          f"{args.warmup_steps} warm-up + {args.steps} measured steps; {devices}, {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}; TF {tf.__version__}, Keras {keras.__version__}")
    print()
    print("| precision | XLA | first step (s) | median step (s) | min-max (s) | tokens/s | loss |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for precision, xla in modes:
        r = measure(config, precision, xla, args.batch_size, args.warmup_steps, args.steps)
        rows.append(r)
        print(f"| {precision} | {'on' if xla else 'off'} | {r['first_step_s']:.2f} | {r['median_step_s']:.3f} | "
              f"{r['min_step_s']:.3f}-{r['max_step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['final_loss']:.3f} |",
              flush=True)
    best = max(rows, key=lambda r: r["tokens_per_s"])
    print()
    print(f"fastest: --precision {best['precision']} --{'xla' if best['xla'] else 'no-xla'} "
          f"({best['tokens_per_s']:,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
