"""Generate TinyStories-style text with a trained tfgpt model.

    python generate.py --temperature 0.8
    python generate.py --model runs/cpu-small --prompt "Tom had a red ball." --prompt "" --num-samples 2 --seed 1
    python generate.py --interactive

The default model is the shipped run (tfgpt.runs.DEFAULT_MODEL, runs/shipped/). Temperature 0 is
greedy; --top-k / --top-p restrict sampling to the k most likely tokens / the nucleus of mass p (after
the temperature). The same --seed gives the same text (sample k of a call uses seed + k). Arguments are
checked before TensorFlow is imported, so a bad value fails fast with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error: ...` line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def fail(message: str) -> NoReturn:
    """Print `error: message` to stderr and exit with code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _number(kind: type, check, rule: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{rule}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value

    return parse


temperature_arg = _number(float, lambda v: math.isfinite(v) and v >= 0, "must be >= 0 (0 = greedy)")
top_k_arg = _number(int, lambda v: v >= 0, "must be an integer >= 0 (0 = off)")
top_p_arg = _number(float, lambda v: 0 < v <= 1, "must be in (0, 1] (1 = off)")
positive_int_arg = _number(int, lambda v: v >= 1, "must be an integer >= 1")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="run directory (model.keras + config.json) or .keras file (default: runs/shipped)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory or .model file (default: the one named in the run's config.json)")


def add_sampling_args(parser: argparse.ArgumentParser, temperature: float = 0.8) -> None:
    parser.add_argument("--temperature", type=temperature_arg, default=temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=top_k_arg, default=0, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=top_p_arg, default=1.0, help="sample from the nucleus of mass p (1 = off)")
    parser.add_argument("--seed", type=int, default=None, help="same seed, same text (default: random)")
    parser.add_argument("--xla", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the decoding loop with XLA (faster per token, ~10 s to compile per shape)")


def check_model_path(model: str | None) -> None:
    """Exit with one line when an explicit --model path does not exist (before TensorFlow loads)."""
    if model is not None and not Path(model).exists():
        fail(f"model path {model} does not exist; pass a run directory or a .keras file to --model")


def load(args: argparse.Namespace):
    """(model, tokenizer) of --model/--tokenizer; the default model must exist."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfgpt.runs import DEFAULT_MODEL, RunError, load_model

    path = Path(args.model) if args.model is not None else DEFAULT_MODEL
    if args.model is None and not path.exists():
        fail(f"no model at {path}; train one (python train_keras.py ...) or pass --model RUN_DIR")
    try:
        return load_model(path, args.tokenizer)
    except RunError as exc:
        fail(str(exc))


def one_line_warnings() -> None:
    """Show Python warnings (e.g. a truncated prompt) as one `warning: ...` line on stderr."""
    warnings.showwarning = lambda message, *_args, **_kw: print(f"warning: {message}", file=sys.stderr)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="generate.py", description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--prompt", action="append", default=None,
                        help='story opening (repeat for several; "" = from scratch; default "Once upon a time")')
    add_sampling_args(parser)
    parser.add_argument("--max-new-tokens", type=positive_int_arg, default=256)
    parser.add_argument("--num-samples", type=positive_int_arg, default=1, help="samples per prompt")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                        help="print tokens as they are produced (default: when stdout is a terminal)")
    parser.add_argument("--interactive", action="store_true", help="read prompts from stdin in a loop")
    args = parser.parse_args(argv)
    if args.prompt is None:
        args.prompt = ["Once upon a time"]
    if args.stream is None:
        args.stream = sys.stdout.isatty()
    return args


def run_batch(model: Any, tokenizer: Any, prompts: list[str], args: argparse.Namespace, seed: int) -> None:
    """Generate `num_samples` stories per prompt and print them (streamed one by one, or as one batch)."""
    from tfgpt.generation import completion_text, generate, prompt_token_ids, stream

    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "eos_id": tokenizer.eos_id, "jit_compile": args.xla}
    rows = [p for p in prompts for _ in range(args.num_samples)]
    ids = [prompt_token_ids(tokenizer, p) for p in rows]
    several = len(rows) > 1
    if args.stream:
        for k, (prompt, prompt_ids) in enumerate(zip(rows, ids, strict=True)):
            if several:
                print(f"--- sample {k + 1} ---")
            print(prompt, end="", flush=True)
            new: list[int] = []
            shown = ""
            for (token,) in stream(model, [prompt_ids], args.max_new_tokens, seed=seed + k, **sampling):
                if token is None:
                    continue
                new.append(token)
                text = completion_text(tokenizer, prompt_ids, new)
                if text.startswith(shown) and not text.endswith("\ufffd"):  # wait for whole characters
                    print(text[len(shown):], end="", flush=True)
                    shown = text
            print(completion_text(tokenizer, prompt_ids, new)[len(shown):], flush=True)
        return
    new_ids = generate(model, ids, args.max_new_tokens, seed=seed, **sampling)
    for k, (prompt, prompt_ids, new) in enumerate(zip(rows, ids, new_ids, strict=True)):
        if several:
            print(f"--- sample {k + 1} ---")
        print(prompt + completion_text(tokenizer, prompt_ids, new), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_model_path(args.model)
    one_line_warnings()
    model, tokenizer = load(args)
    seed = args.seed
    if seed is None:
        import random

        seed = random.SystemRandom().randrange(2**31)
    if not args.interactive:
        run_batch(model, tokenizer, args.prompt, args, seed)
        return 0
    print("Type a story opening and press Enter (empty line = from scratch; Ctrl-D or 'quit' to stop).",
          file=sys.stderr)
    while True:
        try:
            line = input("prompt> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("quit", "exit"):
            return 0
        run_batch(model, tokenizer, [line], args, seed)
        seed += args.num_samples


if __name__ == "__main__":
    sys.exit(main())
