"""Training throughput, side by side: tfgpt vs a PyTorch GPT vs keras-hub's GPT2Backbone (issue 6).

One command runs every configuration, one after another, each in its own subprocess (so thread pools,
XLA and oneDNN state never leak from one into the next), all under the same thread settings:

    .venv/bin/python bench/train_throughput.py                  # everything, bench-6m, batch 32
    .venv/bin/python bench/train_throughput.py --steps 10 --only tfgpt-bf16 torch-bf16

Configurations (`--list` prints them):
  tfgpt-*     tfgpt.GPT trained through its real path (tfgpt.training's optimizer / compile when that
              module provides them, else the same AdamW recipe) under `model.fit`, in
              {float32, mixed_bfloat16} x {XLA on, off}; tfgpt-fp16 (mixed_float16) on request.
  torch-*     bench/torch_gpt.py (nanoGPT-style, fused AdamW) in float32 and bfloat16 autocast;
              torch.compile variants on request.
  kerashub-*  keras_hub.models.GPT2Backbone of the same size + tied head (token_embedding reversed) under
              `model.fit`, float32 / mixed_bfloat16, XLA on / off.

Timing: steady state only. The first `--warmup` steps (tracing, XLA compilation, oneDNN primitive
caches) are dropped; the median of the next `--steps` step times is reported. Keras step times are the
differences of `on_train_batch_end` timestamps with steps_per_execution=1 (the callback reads the loss
as a Python float, which waits for the step); torch steps are timed around an explicit loop whose
`loss.item()` is the synchronisation point. The table also gives the median process CPU time per step
(steadier than wall time when other programs share the cores) and each config's first and last batch
loss (Keras logs a running mean; the per-batch values are recovered from it), a check that all configs
train the same batches the same way, and the worker's peak RSS (resident memory high-water mark of the
whole subprocess: framework, model, optimizer state, activations, compilation).

FLOPs per trained token (forward + backward), the PaLM / nanoGPT estimate:

    flops_per_token = 6·N + 12·L·D·T

6·N for every parameter's multiply-add in forward (2) and backward (4), N = config.num_parameters()
(embeddings included: the tied head multiplies by E), plus 12·L·D·T for the attention score and
weighted-sum matmuls (QKᵀ and PV, 2·2·T·D per token and layer forward, x3 with backward; counted over
the full T x T square, as in the estimate). At bench-6m: 6·5,853,184 + 12·6·256·256 = 39.84 MFLOP.

The peak is measured in the same run with a 2048³ matmul in torch and in TF (no XLA), float32 and
bfloat16, and the higher of the two is used: fp32 runs are compared with the fp32 peak, bf16 runs with
the bf16 peak. The last line printed is exactly `tfgpt/pytorch best ratio: R`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (kind, precision, xla / compile, run by default)
CONFIGS: dict[str, tuple[str, str, bool, bool]] = {
    "tfgpt-fp32-xla": ("tfgpt", "float32", True, True),
    "tfgpt-fp32": ("tfgpt", "float32", False, True),
    "tfgpt-bf16-xla": ("tfgpt", "mixed_bfloat16", True, True),
    "tfgpt-bf16": ("tfgpt", "mixed_bfloat16", False, True),
    "tfgpt-fp16": ("tfgpt", "mixed_float16", False, False),
    "torch-fp32": ("torch", "float32", False, True),
    "torch-bf16": ("torch", "bfloat16", False, True),
    "torch-fp32-compile": ("torch", "float32", True, False),
    "torch-bf16-compile": ("torch", "bfloat16", True, False),
    "kerashub-fp32-xla": ("kerashub", "float32", True, True),
    "kerashub-fp32": ("kerashub", "float32", False, False),
    "kerashub-bf16-xla": ("kerashub", "mixed_bfloat16", True, True),
    "kerashub-bf16": ("kerashub", "mixed_bfloat16", False, True),
}
PEAK_WORKERS = ("peak-torch", "peak-tf")
N_DISTINCT_BATCHES = 4


class BenchError(ValueError):
    """Bad benchmark arguments; the message says what to change."""


def load_config_class() -> type:
    """`tfgpt.config.GPTConfig` (importing it loads no TensorFlow, which must stay out of the parent process
    and the PyTorch workers)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tfgpt.config import GPTConfig

    return GPTConfig


# ------------------------------------------------------------------------------------------ helpers
def flops_per_token(config) -> float:
    """6·N + 12·L·D·T (see the module docstring)."""
    return 6.0 * config.num_parameters() + 12.0 * config.n_layers * config.d_model * config.context


def _is_bf16(precision: str) -> bool:
    return "bfloat16" in precision


def _label(precision: str) -> str:
    return {"float32": "fp32", "mixed_bfloat16": "bf16", "bfloat16": "bf16", "mixed_float16": "fp16"}[precision]


def _summary(step_times: list[float], tokens_per_step: int, cpu_times: list[float]) -> dict:
    """Median wall time per step -> tokens/s; also the median process CPU time per step, a figure
    that moves less than wall time when other programs share the cores."""
    median = statistics.median(step_times)
    return {
        "step_s_median": median,
        "step_s_min": min(step_times),
        "tokens_per_s": tokens_per_step / median,
        "cpu_s_median": statistics.median(cpu_times),
    }


# ------------------------------------------------------------------------------------------ workers
def _set_tf_threads(threads: int, interop: int) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(interop)


def _random_tokens(config, batch_size: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (N_DISTINCT_BATCHES * batch_size, config.context + 1))
    tokens = tokens.astype("int32")
    return tokens[:, :-1], tokens[:, 1:]


def _keras_optimizer():
    """The fallback recipe when tfgpt.training offers no optimizer builder: AdamW, β₂ 0.95, clip 1.0."""
    import keras

    return keras.optimizers.AdamW(learning_rate=3e-4, beta_2=0.95, weight_decay=0.1, global_clipnorm=1.0)


def _build_tfgpt(config, precision: str, jit: bool, total_steps: int) -> tuple:
    """tfgpt's model + optimizer + loss exactly as training builds them: `tfgpt.training.compile_model`
    (the one training set-up) when it exists, else the same AdamW recipe here. Returns (model, path)."""
    import keras
    import tensorflow as tf

    try:
        from tfgpt import training
    except ImportError:
        training = None
    if training is not None and hasattr(training, "compile_model"):
        model = training.compile_model(
            config,
            strategy=tf.distribute.get_strategy(),
            precision=precision,
            xla=jit,
            lr=3e-4,
            total_steps=total_steps,
            warmup=1,
        )
        return model, "tfgpt.training.compile_model"
    from tfgpt.model import build_model

    keras.config.set_dtype_policy(precision)
    model = build_model(config)
    model.compile(
        optimizer=_keras_optimizer(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
        steps_per_execution=1,
    )
    return model, "fallback: AdamW + model.compile"


def _fit_and_time(model, dataset, warmup: int, steps: int, tokens_per_step: int) -> dict:
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.stamps: list[float] = []
            self.cpu: list[float] = []
            self.mean_losses: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            self.mean_losses.append(float(logs["loss"]))  # waits for the step to finish
            self.stamps.append(time.perf_counter())
            self.cpu.append(time.process_time())

    timer = StepTimer()
    t0 = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=warmup + steps, verbose=0, callbacks=[timer])
    times = [b - a for a, b in zip(timer.stamps[warmup - 1 : -1], timer.stamps[warmup:], strict=True)]
    cpu = [b - a for a, b in zip(timer.cpu[warmup - 1 : -1], timer.cpu[warmup:], strict=True)]
    # Keras logs the running mean of the epoch: recover each batch's own loss.
    m = timer.mean_losses
    losses = [m[0]] + [(k + 1) * m[k] - k * m[k - 1] for k in range(1, len(m))]
    return {
        "step_times": times,
        "cpu_times": cpu,
        "warmup_s": timer.stamps[warmup - 1] - t0,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        **_summary(times, tokens_per_step, cpu),
    }


def run_keras_worker(name: str, args: argparse.Namespace) -> dict:
    kind, precision, jit, _ = CONFIGS[name]
    _set_tf_threads(args.threads, args.interop)
    import keras
    import tensorflow as tf

    from tfgpt.config import GPTConfig

    config = GPTConfig.from_preset(args.preset)
    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy(precision)
    x, y = _random_tokens(config, args.batch_size)
    if kind == "tfgpt":
        model, path = _build_tfgpt(config, precision, jit, args.warmup + args.steps)
        inputs = x
    else:
        import keras_hub

        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=config.vocab_size,
            num_layers=config.n_layers,
            num_heads=config.n_heads,
            hidden_dim=config.d_model,
            intermediate_dim=config.d_ff,
            dropout=0.0,
            max_sequence_length=config.context,
        )
        ids = keras.Input((None,), dtype="int32", name="token_ids")
        mask = keras.Input((None,), dtype="int32", name="padding_mask")
        h = backbone({"token_ids": ids, "padding_mask": mask})
        logits = backbone.token_embedding(h, reverse=True)  # tied head
        logits = keras.layers.Activation("linear", dtype="float32")(logits)
        model = keras.Model({"token_ids": ids, "padding_mask": mask}, logits)
        model.compile(
            optimizer=_keras_optimizer(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit,
            steps_per_execution=1,
        )
        path = "keras AdamW"
        inputs = {"token_ids": x, "padding_mask": tf.ones_like(x).numpy()}
    dataset = (
        tf.data.Dataset.from_tensor_slices((inputs, y))
        .batch(args.batch_size, drop_remainder=True)
        .cache()
        .repeat()
        .prefetch(2)
    )
    out = _fit_and_time(model, dataset, args.warmup, args.steps, args.batch_size * config.context)
    return {**out, "params": int(model.count_params()), "path": path}


def run_torch_worker(name: str, args: argparse.Namespace) -> dict:
    _, precision, compile_model, _ = CONFIGS[name]
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch_gpt

    torch.set_num_threads(args.threads)
    config = torch_gpt.GPTConfig.from_preset(args.preset)
    out = torch_gpt.time_training(
        config, args.batch_size, args.steps, args.warmup, precision, compile_model=compile_model
    )
    tokens = args.batch_size * config.context
    return {**out, **_summary(out["step_times"], tokens, out["cpu_times"]), "path": out["optimizer"]}


def _time_matmul(fn, n: int, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 2.0 * n**3 / statistics.median(times) / 1e9


def run_peak_worker(name: str, args: argparse.Namespace, n: int = 2048) -> dict:
    """GFLOP/s of an n³ matmul in float32 and bfloat16 (median of 10)."""
    out = {}
    if name == "peak-torch":
        import torch

        torch.set_num_threads(args.threads)
        for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            out[key] = _time_matmul(lambda a=a, b=b: a @ b, n)
    else:
        _set_tf_threads(args.threads, args.interop)
        import tensorflow as tf

        matmul = tf.function(tf.matmul)  # eager CPU ops are synchronous
        for dtype, key in ((tf.float32, "fp32"), (tf.bfloat16, "bf16")):
            a = tf.cast(tf.random.normal((n, n)), dtype)
            b = tf.cast(tf.random.normal((n, n)), dtype)
            out[key] = _time_matmul(lambda a=a, b=b: matmul(a, b), n)
    return out


def worker_main(name: str, args: argparse.Namespace) -> int:
    if name in PEAK_WORKERS:
        result = run_peak_worker(name, args)
    elif CONFIGS[name][0] == "torch":
        result = run_torch_worker(name, args)
    else:
        result = run_keras_worker(name, args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"config": name, **result}), flush=True)
    return 0


# ------------------------------------------------------------------------------------------ parent
def _env(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    threads = str(args.threads)
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        TF_NUM_INTRAOP_THREADS=threads,
        TF_NUM_INTEROP_THREADS=str(args.interop),
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    if args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    return env


def run_worker_subprocess(name: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        f"--preset={args.preset}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--batch-size={args.batch_size}",
        f"--threads={args.threads}",
        f"--interop={args.interop}",
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=_env(args), cwd=REPO, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return {"config": name, "error": f"timed out after {args.timeout} s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            return {**result, "wall_s": wall}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"config": name, "error": f"exit {proc.returncode}: {tail[:200]}"}


def format_table(results: list[dict], peaks: dict, flops_tok: float) -> tuple[str, float | None, float | None]:
    """The results table; returns (text, tfgpt/pytorch best ratio, tfgpt/keras-hub best ratio)."""
    ok = [r for r in results if "error" not in r]
    best = {
        kind: max((r["tokens_per_s"] for r in ok if CONFIGS[r["config"]][0] == kind), default=None)
        for kind in ("tfgpt", "torch", "kerashub")
    }
    head = (
        f"{'config':<20} {'prec':<5} {'tokens/s':>9} {'/torch':>7} {'GFLOP/s':>8} {'%peak':>6} "
        f"{'step ms':>8} {'cpu ms':>8} {'peak MB':>8} {'loss first->last':>17}  path"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        name = r["config"]
        prec = _label(CONFIGS[name][1])
        if "error" in r:
            lines.append(f"{name:<20} {prec:<5} failed: {r['error']}")
            continue
        tps = r["tokens_per_s"]
        gflops = tps * flops_tok / 1e9
        peak = peaks.get("bf16" if _is_bf16(CONFIGS[name][1]) else "fp32")
        ratio = f"{tps / best['torch']:.2f}" if best["torch"] else "-"
        share = f"{100 * gflops / peak:.1f}" if peak else "-"
        loss = f"{r['loss_first']:.3f}->{r['loss_last']:.3f}"
        peak_mb = f"{r['peak_rss_mb']:,.0f}" if "peak_rss_mb" in r else "-"
        lines.append(
            f"{name:<20} {prec:<5} {tps:>9,.0f} {ratio:>7} {gflops:>8.1f} {share:>6} "
            f"{1000 * r['step_s_median']:>8.0f} {1000 * r['cpu_s_median']:>8.0f} {peak_mb:>8} {loss:>17}  "
            f"{r.get('path', '')}"
        )
    r_torch = best["tfgpt"] / best["torch"] if best["tfgpt"] and best["torch"] else None
    r_hub = best["tfgpt"] / best["kerashub"] if best["tfgpt"] and best["kerashub"] else None
    return "\n".join(lines), r_torch, r_hub


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Training throughput of tfgpt vs PyTorch vs keras-hub, side by side (issue 6)."
    )
    p.add_argument("--preset", default="bench-6m", help="GPTConfig preset (default bench-6m)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per config (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing/compilation)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these configs (see --list)")
    p.add_argument("--list", action="store_true", help="list the configs and exit")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op / OMP threads, all configs")
    p.add_argument("--interop", type=int, default=1, help="TF inter-op threads, all TF configs")
    p.add_argument(
        "--omp-wait-policy",
        choices=("default", "passive", "active"),
        default="default",
        help="OMP_WAIT_POLICY for every config (OpenMP: torch). On a shared, busy CPU 'passive' "
        "keeps torch's spinning threads from starving each other (1.3-1.6x faster torch measured)",
    )
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per config subprocess")
    p.add_argument("--json", type=Path, help="also write all results to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag in ("steps", "warmup", "batch_size", "threads", "interop"):
        if getattr(args, flag) < 1:
            raise BenchError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.only:
        unknown = [n for n in args.only if n not in CONFIGS]
        if unknown:
            raise BenchError(f"unknown config(s) {unknown}; choose from: {', '.join(CONFIGS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.worker:
        return worker_main(args.worker, args)
    if args.list:
        for name, (kind, precision, jit, default) in CONFIGS.items():
            extra = "compile" if kind == "torch" else "jit_compile"
            print(f"{name:<20} {kind:<9} {precision:<15} {extra}={jit} {'' if default else '(on request)'}")
        return 0

    try:
        config = load_config_class().from_preset(args.preset)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    flops_tok = flops_per_token(config)
    names = args.only or [n for n, c in CONFIGS.items() if c[3]]
    print(
        f"preset {args.preset}: {config.num_parameters():,} parameters, batch {args.batch_size} x "
        f"{config.context} tokens, {flops_tok / 1e6:.2f} MFLOP/token (6N + 12LDT); "
        f"threads {args.threads}, TF inter-op {args.interop}, OMP_WAIT_POLICY {args.omp_wait_policy}; "
        f"median of {args.steps} steps "
        f"after {args.warmup} warm-up",
        flush=True,
    )
    peaks: dict[str, float] = {}
    if not args.no_peak:
        for name in PEAK_WORKERS:
            r = run_worker_subprocess(name, args)
            if "error" in r:
                print(f"  {name}: failed: {r['error']}", file=sys.stderr)
                continue
            print(f"  {name}: fp32 {r['fp32']:.0f} GFLOP/s, bf16 {r['bf16']:.0f} GFLOP/s", flush=True)
            for key in ("fp32", "bf16"):
                peaks[key] = max(peaks.get(key, 0.0), r[key])
    results = []
    for i, name in enumerate(names, 1):
        r = run_worker_subprocess(name, args)
        results.append(r)
        status = r["error"] if "error" in r else f"{r['tokens_per_s']:,.0f} tokens/s"
        print(f"  [{i}/{len(names)}] {name}: {status} ({r.get('wall_s', 0):.0f} s)", flush=True)
    if args.json:
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "peaks": peaks, "results": results}
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, args.json)
    table, r_torch, r_hub = format_table(results, peaks, flops_tok)
    print()
    if peaks:
        print(f"measured matmul peak: fp32 {peaks.get('fp32', 0):.0f} GFLOP/s, bf16 {peaks.get('bf16', 0):.0f} GFLOP/s")
    print(table)
    print(f"tfgpt/keras-hub best ratio: {r_hub:.2f}" if r_hub else "tfgpt/keras-hub best ratio: n/a")
    print(f"tfgpt/pytorch best ratio: {r_torch:.2f}" if r_torch else "tfgpt/pytorch best ratio: n/a")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
