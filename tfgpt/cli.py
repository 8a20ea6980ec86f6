"""What the command-line programs share: one-line errors, argument types, model loading, printing stories.

`generate.py` and `evaluate.py` (and `train_keras.py`) parse their arguments with these helpers and make
one call into the package. Importing this module does not import TensorFlow, so a bad argument fails in
a fraction of a second with one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from tfgpt.common import quiet_tensorflow
from tfgpt.config import SAMPLING_RULES, sampling_problem


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error: ...` line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def fail(message: str) -> NoReturn:
    """Print `error: message` to stderr and exit with code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def utf8_problem(text: str) -> str | None:
    """Why `text` (from the command line or stdin, where Python keeps undecodable bytes as lone surrogates) is
    not valid UTF-8, or None when it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = text[exc.start:exc.end].encode("utf-8", "surrogateescape")
        return f"not valid UTF-8 (byte 0x{raw[0]:02x} at character {exc.start}); pass UTF-8 text"
    return None


def _number(kind: type, check: Callable[[Any], bool], rule: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{rule}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value

    return parse


def _sampling(kind: type, name: str) -> Callable[[str], Any]:
    """The argument type of a sampling setting: its rule from `tfgpt.config.SAMPLING_RULES`."""
    return _number(kind, lambda v: sampling_problem(name, v) is None, SAMPLING_RULES[name][2])


temperature_arg = _sampling(float, "temperature")
top_k_arg = _sampling(int, "top_k")
top_p_arg = _sampling(float, "top_p")
max_new_tokens_arg = _sampling(int, "max_new_tokens")
positive_int_arg = _number(int, lambda v: v >= 1, "must be an integer >= 1")
non_negative_int_arg = _number(int, lambda v: v >= 0, "must be an integer >= 0")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model and --tokenizer."""
    parser.add_argument("--model", default=None,
                        help="run directory (model.keras + config.json) or .keras file (default: runs/shipped)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory or .model file (default: the one named in the run's config.json)")


def add_sampling_args(parser: argparse.ArgumentParser, temperature: float = 0.8, xla: bool | None = True) -> None:
    """--temperature, --top-k, --top-p, --seed, --xla (default `xla`; None = the program decides)."""
    parser.add_argument("--temperature", type=temperature_arg, default=temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=top_k_arg, default=0, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=top_p_arg, default=1.0, help="sample from the nucleus of mass p (1 = off)")
    parser.add_argument("--seed", type=int, default=None, help="same seed, same text (default: random)")
    parser.add_argument("--xla", action=argparse.BooleanOptionalAction, default=xla,
                        help="compile the decoding loop with XLA: faster per token, but seconds to compile per shape "
                             "(figures: bench/RESULTS.md)"
                             + (" [default: on for --interactive, off for one batch]" if xla is None else ""))


def load_or_exit(model: str | None, tokenizer: str | None) -> tuple[Any, Any]:
    """(model, tokenizer) of --model/--tokenizer (default: the shipped run), or exit with one line.

    A missing explicit path fails before TensorFlow is imported; TensorFlow's start-up noise is hidden.
    """
    from tfgpt import runs

    if model is not None and not Path(model).exists():
        fail(f"model path {model} does not exist; pass a run directory or a .keras file to --model")
    path = Path(model) if model is not None else runs.DEFAULT_MODEL
    if model is None and not path.exists():
        fail(f"no model at {path}; train one (python train_keras.py ...) or pass --model RUN_DIR")
    quiet_tensorflow()
    try:
        return runs.load_model(path, tokenizer)
    except runs.RunError as exc:
        fail(str(exc))


def one_line_warnings() -> None:
    """Show Python warnings (e.g. a truncated prompt) as one `warning: ...` line on stderr."""
    warnings.showwarning = lambda message, *_args, **_kw: print(f"warning: {message}", file=sys.stderr)


def print_stories(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    stream: bool = False,
    seed: int = 0,
    out: TextIO | None = None,
    **sampling: Any,
) -> None:
    """Continue each prompt `num_samples` times and print prompt + story (sample k uses seed + k).

    stream=True prints each story token by token as it is produced (whole characters only); otherwise
    all stories are generated as one batch, then printed. Both print the same text. `sampling` takes
    temperature, top_k, top_p and jit_compile (see `tfgpt.generation.generate`).
    """
    from tfgpt.generation import completion_text, generate, prompt_token_ids
    from tfgpt.generation import stream as stream_tokens

    out = out or sys.stdout
    sampling = {**sampling, "eos_id": tokenizer.eos_id}
    rows = [p for p in prompts for _ in range(num_samples)]
    ids = [prompt_token_ids(tokenizer, p) for p in rows]
    several = len(rows) > 1
    if not stream:
        new_ids = generate(model, ids, max_new_tokens, seed=seed, **sampling)
    for k, (prompt, prompt_ids) in enumerate(zip(rows, ids, strict=True)):
        if several:
            print(f"--- sample {k + 1} ---", file=out)
        if not stream:
            print(prompt + completion_text(tokenizer, prompt_ids, new_ids[k]), file=out, flush=True)
            continue
        print(prompt, end="", file=out, flush=True)
        new: list[int] = []
        shown = ""
        for (token,) in stream_tokens(model, [prompt_ids], max_new_tokens, seed=seed + k, **sampling):
            if token is None:
                continue
            new.append(token)
            text = completion_text(tokenizer, prompt_ids, new)
            if text.startswith(shown) and not text.endswith("\ufffd"):  # wait for whole characters
                print(text[len(shown):], end="", file=out, flush=True)
                shown = text
        print(completion_text(tokenizer, prompt_ids, new)[len(shown):], file=out, flush=True)
