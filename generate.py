"""Generate TinyStories-style text with a trained tfgpt model.

    python generate.py --temperature 0.8
    python generate.py --model runs/cpu-small --prompt "Tom had a red ball." --prompt "" --num-samples 2 --seed 1
    python generate.py --interactive

The default model is the shipped run (tfgpt.runs.DEFAULT_MODEL, runs/shipped/). Temperature 0 is
greedy; --top-k / --top-p restrict sampling to the k most likely tokens / the nucleus of mass p (after
the temperature). The same --seed gives the same text (sample k of a call uses seed + k). Arguments are
checked before TensorFlow is imported, so a bad value fails fast with one line and exit code 2.
The work is done by tfgpt.cli / tfgpt.generation; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tfgpt.cli import (
    OneLineParser,
    add_model_args,
    add_sampling_args,
    load_or_exit,
    max_new_tokens_arg,
    one_line_warnings,
    positive_int_arg,
    print_stories,
    utf8_problem,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="generate.py", description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--prompt", action="append", default=None,
                        help='story opening (repeat for several; "" = from scratch; default "Once upon a time")')
    add_sampling_args(parser, xla=None)
    parser.add_argument("--max-new-tokens", type=max_new_tokens_arg, default=256)
    parser.add_argument("--num-samples", type=positive_int_arg, default=1, help="samples per prompt")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                        help="print tokens as they are produced (default: when stdout is a terminal)")
    parser.add_argument("--interactive", action="store_true", help="read prompts from stdin in a loop")
    args = parser.parse_args(argv)
    if args.prompt is None:
        args.prompt = ["Once upon a time"]
    for prompt in args.prompt:
        if (problem := utf8_problem(prompt)) is not None:
            parser.error(f"--prompt {prompt.encode('utf-8', 'surrogateescape')!r} is {problem}")
    if args.stream is None:
        args.stream = sys.stdout.isatty()
    if args.xla is None:  # measured on the shipped model: one 256-token story ends ~1.5 s sooner without XLA;
        args.xla = args.interactive  # a session of several prompts repays the compile
    if args.seed is None:
        import random

        args.seed = random.SystemRandom().randrange(2**31)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    one_line_warnings()
    model, tokenizer = load_or_exit(args.model, args.tokenizer)
    settings = {"max_new_tokens": args.max_new_tokens, "num_samples": args.num_samples, "stream": args.stream,
                "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "jit_compile": args.xla}
    if not args.interactive:
        print_stories(model, tokenizer, args.prompt, seed=args.seed, **settings)
        return 0
    print("Type a story opening and press Enter (empty line = from scratch; Ctrl-D or 'quit' to stop).",
          file=sys.stderr)
    seed = args.seed
    while True:
        try:
            line = input("prompt> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        except UnicodeDecodeError as exc:  # stdin decodes strictly (a UTF-8 locale): report, read the next line
            line = exc.object.decode("utf-8", "surrogateescape") if isinstance(exc.object, bytes) else "\udcff"
        if line.strip() in ("quit", "exit"):
            return 0
        if (problem := utf8_problem(line)) is not None:
            print(f"error: that prompt is {problem}; type it again", file=sys.stderr)
            continue
        print_stories(model, tokenizer, [line], seed=seed, **settings)
        seed += args.num_samples


if __name__ == "__main__":
    sys.exit(main())
