"""Where the seconds of `python generate.py` go: end to end, and phase by phase, with and without XLA.

    python bench/generate_startup.py                 # shipped model, 3 rounds
    python bench/generate_startup.py --rounds 5 --model runs/shipped

End to end runs the real CLI (`generate.py --temperature 0.8 --seed K`) in a fresh process. The phases are
timed in a fresh process too: import TensorFlow (`tfgpt.common.quiet_tensorflow`), load the run
(`tfgpt.runs.load_model`), the first 256-token story (trace, compile when XLA, decode) and a second one in
the same process. Prints medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PHASES = r"""
import json, sys, time
t0 = time.perf_counter()
from tfgpt.common import quiet_tensorflow
quiet_tensorflow(); t1 = time.perf_counter()
from tfgpt.runs import load_model
model, tok = load_model(sys.argv[1]); t2 = time.perf_counter()
from tfgpt.generation import generate_text
xla = sys.argv[2] == "1"
generate_text(model, tok, ["Once upon a time"], 256, temperature=0.8, seed=1, jit_compile=xla); t3 = time.perf_counter()
generate_text(model, tok, ["Once upon a time"], 256, temperature=0.8, seed=2, jit_compile=xla); t4 = time.perf_counter()
print(json.dumps({"import TensorFlow": t1 - t0, "load model": t2 - t1, "first story": t3 - t2, "second story": t4 - t3}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(REPO / "runs" / "shipped"))
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"} | {"PYTHONPATH": str(REPO)}
    end_to_end: dict[str, list[float]] = {"default": [], "--xla": [], "--no-xla": []}
    phases: dict[str, list[dict[str, float]]] = {"XLA": [], "no XLA": []}
    for k in range(args.rounds):  # round-robin, so load changes fall on every row alike
        for flag in end_to_end:
            start = time.perf_counter()
            subprocess.run([sys.executable, str(REPO / "generate.py"), "--model", args.model, "--temperature", "0.8",
                            "--seed", str(k)] + ([] if flag == "default" else [flag]),
                           env=env, cwd=REPO, check=True, capture_output=True)
            end_to_end[flag].append(time.perf_counter() - start)
        for name, xla in (("XLA", "1"), ("no XLA", "0")):
            out = subprocess.run([sys.executable, "-c", PHASES, args.model, xla], env=env, cwd=REPO, check=True,
                                 capture_output=True, text=True).stdout
            phases[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"python generate.py --temperature 0.8 ({args.model}), median of {args.rounds} rounds\n")
    print("| run | seconds |\n|---|---:|")
    for flag, times in end_to_end.items():
        print(f"| end to end, {flag} | {statistics.median(times):.2f} |")
    print("\n| phase | XLA | no XLA |\n|---|---:|---:|")
    for phase in phases["XLA"][0]:
        row = [statistics.median(r[phase] for r in phases[name]) for name in ("XLA", "no XLA")]
        print(f"| {phase} | {row[0]:.2f} | {row[1]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
