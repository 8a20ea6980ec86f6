"""Decode speed: tfgpt's cached loop vs the same loop uncached vs keras-hub's GPT2CausalLM.generate vs a
PyTorch (nanoGPT-style) KV-cache decoder, at batch 1 and batch 8, with each engine's peak memory.

    python bench/decode_speed.py [--preset bench-6m] [--new-tokens 256] [--repeats 3] [--batch-sizes 1 8]

Random weights (speed does not depend on them), a one-token prompt per row, no early stop, greedy, float32.
Each engine runs in its own worker subprocess (its own thread pools and allocator, and its own peak RSS),
all with the same thread settings (2 intra-op / OMP threads, 1 TF inter-op thread by default). Each worker
builds its engine and compiles it (the first run), then the parent times the engines round-robin
`--repeats` times, so that load from other processes on a shared CPU falls on all engines alike. The
table gives the median decode rate (new tokens / second over the batch, compile excluded), the
milliseconds per decoding step, the compile time, and the worker's peak RSS (resident memory high-water
mark, compile included) next to its RSS once the engine was built (framework + weights).

* tfgpt cached:   tfgpt.generation.generate (prefill + one token per step, per-layer KV caches, one
                  XLA-compiled tf.while_loop).
* tfgpt cached, no XLA: the same, jit_compile=False (plain TF graph). Batch 1 only.
* tfgpt uncached: the same loop with use_cache=False: the whole window (C = min(T, N) tokens) runs
                  through the model at every step. Batch 1 only (the baseline of the cached rows).
* torch cached:   bench/torch_gpt.py generate_greedy: nanoGPT-style model, per-layer KV caches written in
                  place, eager PyTorch under inference_mode.
* keras-hub:      GPT2CausalLM(GPT2Backbone of the same sizes, no preprocessor).generate on token ids,
                  jit_compile=True, greedy sampler, stop_token_ids=None.

Past the context T the tfgpt and torch loops slide their window (T = 256 and 1 + 256 tokens at bench-6m:
one refill of 192 tokens); keras-hub cannot go past its max_sequence_length, so its backbone gets T + 1
positions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("tfgpt cached", "tfgpt cached, no XLA", "tfgpt uncached", "torch cached", "keras-hub")
BATCH_1_ONLY = ("tfgpt cached, no XLA", "tfgpt uncached")
SKIP_NAMES = {"cached": "tfgpt cached", "no-xla": "tfgpt cached, no XLA", "uncached": "tfgpt uncached",
              "torch": "torch cached", "keras-hub": "keras-hub"}


def _rss_mb() -> float:
    """Current resident set size of this process in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------ engines
def _tf_threads(args: argparse.Namespace) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.interop)


def tfgpt_engine(args: argparse.Namespace, use_cache: bool, jit_compile: bool):
    _tf_threads(args)
    import keras

    from tfgpt import GPTConfig, build_model
    from tfgpt.generation import generate

    keras.utils.set_random_seed(0)
    model = build_model(GPTConfig.from_preset(args.preset))
    prompts = [[0]] * args.batch

    def run() -> int:
        out = generate(model, prompts, args.new_tokens, temperature=0.0, use_cache=use_cache,
                       jit_compile=jit_compile)
        return sum(len(row) for row in out)

    return run, model.count_params()


def torch_engine(args: argparse.Namespace):
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch_gpt

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torch_gpt.TorchGPT(torch_gpt.GPTConfig.from_preset(args.preset)).eval()
    prompt = torch.zeros((args.batch, 1), dtype=torch.int64)

    def run() -> int:
        return torch_gpt.generate_greedy(model, prompt, args.new_tokens).numel()

    return run, sum(p.numel() for p in model.parameters())


def keras_hub_engine(args: argparse.Namespace):
    """A GPT2CausalLM of the same sizes and a function generating `new_tokens` after one token per row."""
    _tf_threads(args)
    import keras_hub
    import numpy as np

    from tfgpt.config import GPTConfig

    config = GPTConfig.from_preset(args.preset)
    length = 1 + args.new_tokens
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
        "token_ids": np.zeros((args.batch, length), np.int32),
        "padding_mask": np.repeat(np.arange(length)[None, :] < 1, args.batch, axis=0),  # the prompt: position 0
    }

    def run() -> int:
        out = lm.generate(inputs, stop_token_ids=None)
        return int(np.asarray(out["padding_mask"]).sum()) - args.batch

    return run, backbone.count_params()


def worker_main(args: argparse.Namespace) -> int:
    """Build one engine, then answer stdin commands: `run` -> {"seconds", "tokens"}, `quit` -> peak RSS."""
    name = args.worker
    if name == "torch cached":
        run, params = torch_engine(args)
    elif name == "keras-hub":
        run, params = keras_hub_engine(args)
    else:
        run, params = tfgpt_engine(args, use_cache=name != "tfgpt uncached", jit_compile=name != "tfgpt cached, no XLA")
    print(json.dumps({"ready": True, "params": params, "rss_mb": _rss_mb()}), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            start = time.perf_counter()
            tokens = run()
            print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens}), flush=True)
        else:
            break
    print(json.dumps({"peak_rss_mb": _peak_rss_mb()}), flush=True)
    return 0


# ------------------------------------------------------------------------------------------ parent
class Worker:
    """One engine in a subprocess, driven line by line."""

    def __init__(self, name: str, batch: int, args: argparse.Namespace) -> None:
        env = dict(os.environ)
        env.update(
            OMP_NUM_THREADS=str(args.threads),
            MKL_NUM_THREADS=str(args.threads),
            TF_NUM_INTRAOP_THREADS=str(args.threads),
            TF_NUM_INTEROP_THREADS=str(args.interop),
            TF_CPP_MIN_LOG_LEVEL="3",
            KERAS_BACKEND="tensorflow",
            PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        )
        if args.omp_wait_policy != "default":
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, f"--batch={batch}",
               f"--preset={args.preset}", f"--new-tokens={args.new_tokens}", f"--threads={args.threads}",
               f"--interop={args.interop}"]
        self.name, self.batch = name, batch
        self.stderr = tempfile.TemporaryFile(mode="w+")  # framework logs; shown if the worker dies
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env, cwd=REPO)
        ready = self._read()
        self.params, self.rss_mb = ready["params"], ready["rss_mb"]

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.stderr.seek(0)
        tail = "".join(self.stderr.readlines()[-5:])
        raise RuntimeError(f"{self.name} (batch {self.batch}) worker exited with {self.proc.wait()}:\n{tail}")

    def run(self) -> tuple[float, int]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        out = self._read()
        return out["seconds"], out["tokens"]

    def close(self) -> float:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        peak = self._read()["peak_rss_mb"]
        self.proc.wait()
        return peak


def measure(batch: int, names: list[str], args: argparse.Namespace) -> list[dict]:
    rows, workers = [], {}
    for name in names:  # one at a time: start-up and compilation never overlap
        start = time.perf_counter()
        worker = Worker(name, batch, args)
        seconds, _ = worker.run()
        workers[name] = worker
        print(f"  batch {batch}: {name} built and compiled ({time.perf_counter() - start:.1f} s, "
              f"first run {seconds:.1f} s)", flush=True)
        rows.append({"engine": name, "batch": batch, "params": worker.params, "compile_s": seconds,
                     "rss_mb": worker.rss_mb, "times": []})
    for _ in range(args.repeats):
        for row in rows:
            seconds, tokens = workers[row["engine"]].run()
            row["times"].append(seconds)
            row["tokens"] = tokens
    for row in rows:
        row["peak_rss_mb"] = workers[row["engine"]].close()
        row["median_s"] = statistics.median(row["times"])
        row["tokens_per_s"] = row["tokens"] / row["median_s"]
        row["ms_per_step"] = 1000 * row["median_s"] / args.new_tokens
        print(f"  batch {batch}: {row['engine']}: {[round(t, 3) for t in row['times']]} s", flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| engine | batch | params | new tokens | compile + 1st run (s) | median run (s) | tokens/s "
             "| ms/step | vs uncached | peak RSS (MB) | RSS built (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["engine"] == "tfgpt uncached"}
    base = base.get(1)
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.1f}x" if base else "-"
        lines.append(
            f"| {r['engine']} | {r['batch']} | {r['params']:,} | {r['tokens']} | {r['compile_s']:.1f} | "
            f"{r['median_s']:.3f} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | {ratio} | "
            f"{r['peak_rss_mb']:.0f} | {r['rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def ratio_lines(rows: list[dict]) -> list[str]:
    rate = {(r["engine"], r["batch"]): r["tokens_per_s"] for r in rows}
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        ours = rate.get(("tfgpt cached", batch))
        if ours is None:
            continue
        for other in ("keras-hub", "torch cached", "tfgpt uncached"):
            if (other, batch) in rate:
                out.append(f"batch {batch}: tfgpt cached / {other}: {ours / rate[(other, batch)]:.2f}x")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="bench-6m")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8],
                        help="batch sizes to measure (uncached and no-XLA rows: batch 1 only)")
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(SKIP_NAMES))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op / OMP threads")
    parser.add_argument("--interop", type=int, default=1, help="TF inter-op threads")
    parser.add_argument("--omp-wait-policy", choices=("default", "passive", "active"), default="default",
                        help="OMP_WAIT_POLICY of every worker (OpenMP: torch)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    skipped = {SKIP_NAMES[s] for s in args.skip}
    print(f"preset {args.preset}, {args.new_tokens} new tokens after a 1-token prompt, greedy, float32, "
          f"batch sizes {args.batch_sizes}, threads {args.threads}, TF inter-op {args.interop}, "
          f"OMP_WAIT_POLICY {args.omp_wait_policy}, {args.repeats} timed runs per engine", flush=True)
    rows = []
    for batch in args.batch_sizes:
        names = [n for n in ENGINES if n not in skipped and (batch == 1 or n not in BATCH_1_ONLY)]
        rows += measure(batch, names, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print()
    print(format_table(rows))
    for line in ratio_lines(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
