"""Which vocabulary size? Bytes per token and held-out bits per byte for a few SentencePiece sizes (issue 3).

For each size V: train the tokenizer on the train split of --data minus its dev split
(tfgpt.tokenizer.train_tokenizer), measure bytes/token on the dev stories, then train the same small GPT (only
V differs) for the same number of steps on the same number of tokens per step (`model.compile(AdamW)` + `fit`
on `tfgpt.data.make_dataset`), and evaluate it on every dev window. The choice is made on the dev split
(--dev-fraction of the train stories, tfgpt.stories), never on the validation stories, which stay the test
set. --dev-fraction 0 measures on the validation split instead (how the first vocabulary was chosen).

Loss per token is not comparable across vocabularies (a bigger V packs more bytes into each token), so
the comparison is bits per byte of held-out text:

    bits/byte = mean loss (nats/token) * target tokens / (UTF-8 bytes * ln 2)

with the target tokens counted over the held-out stream (eos tokens included: every vocabulary
predicts the same number of them) and the bytes those of the held-out stories.

    .venv/bin/python bench/tokenizer_vocab.py                        # 2048, 4096, 8192; 300 steps each
    .venv/bin/python bench/tokenizer_vocab.py --sizes 1024,4096 --steps 100

Prints a markdown table. Everything it writes goes under --work-dir (default .cache/bench/tokenizer_vocab).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import keras  # noqa: E402

from tfgpt import GPT, GPTConfig  # noqa: E402
from tfgpt.data import load_stories, make_dataset, steps_per_epoch, token_stream  # noqa: E402
from tfgpt.tokenizer import train_tokenizer  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO / "data" / "tinystories"))
    p.add_argument("--sizes", default="2048,4096,8192", help="comma-separated vocabulary sizes")
    p.add_argument("--steps", type=int, default=300, help="training steps per size (same for every size)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dev-fraction", type=float, default=0.05, help="held-out = this dev split of the train stories")
    p.add_argument("--jit", action=argparse.BooleanOptionalAction, default=True, help="XLA-compile the step")
    p.add_argument("--work-dir", default=str(REPO / ".cache" / "bench" / "tokenizer_vocab"))
    return p.parse_args()


def run_size(args: argparse.Namespace, vocab: int, work: Path) -> dict[str, float]:
    start = time.time()
    dev = {"dev_fraction": args.dev_fraction}
    held_out = "dev" if args.dev_fraction else "validation"
    tok = train_tokenizer(load_stories(args.data, "train", **dev), vocab, work / f"tok-{vocab}", source=args.data)
    train_seconds = time.time() - start
    cache = work / "tokens"
    train = token_stream(args.data, tok, "train", cache_dir=cache, progress=False, **dev)
    val = token_stream(args.data, tok, held_out, cache_dir=cache, progress=False, **dev)
    val_info = token_stream(args.data, tok, held_out, cache_dir=cache, progress=False, **dev, with_info=True)[1]
    text_tokens = val_info["tokens"] - val_info["stories"] - 1  # without the eos separators

    keras.utils.set_random_seed(args.seed)
    config = GPTConfig.from_preset(
        "tiny", vocab_size=vocab, context=args.context, d_model=args.d_model, n_layers=args.layers,
        n_heads=args.heads,
    )
    model = GPT(config)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, args.steps, alpha=0.1, warmup_target=args.lr, warmup_steps=max(1, args.steps // 10)
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.1, beta_2=0.95, clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=args.jit,
    )
    fit_start = time.time()
    history = model.fit(
        make_dataset(train, args.context, args.batch, seed=args.seed, repeat=True),
        steps_per_epoch=args.steps, epochs=1, verbose=0,
    )
    fit_seconds = time.time() - fit_start
    val_loss = float(model.evaluate(make_dataset(val, args.context, args.batch, shuffle=False,
                                                 drop_remainder=False), verbose=0))
    return {
        "vocab": vocab,
        "bytes_per_token": val_info["bytes"] / text_tokens,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "epochs": args.steps * args.batch / steps_per_epoch(train, args.context, 1),
        "params": config.num_parameters(),
        "train_loss": float(history.history["loss"][-1]),
        "val_loss": val_loss,
        "bits_per_byte": val_loss * (len(val) - 1) / (val_info["bytes"] * math.log(2)),
        "tok_seconds": train_seconds,
        "fit_seconds": fit_seconds,
    }


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for vocab in sizes:
        print(f"vocab {vocab}: training tokenizer and model ({args.steps} steps) ...", file=sys.stderr, flush=True)
        rows.append(run_size(args, vocab, work))
    print(f"\nmodel: tiny preset with context {args.context}, d_model {args.d_model}, {args.layers} layers, "
          f"{args.heads} heads; {args.steps} steps x batch {args.batch} x {args.context} tokens "
          f"({args.steps * args.batch * args.context:,} tokens) per size; AdamW lr {args.lr} warmup+cosine; "
          f"seed {args.seed}; data {args.data}; held out: "
          f"{f'dev split ({args.dev_fraction:g} of the train stories)' if args.dev_fraction else 'validation split'}\n")
    print("| vocab | held-out bytes/token | train tokens | held-out tokens | epochs | params | train loss (epoch mean) | "
          "held-out loss (nats/token) | held-out bits/byte | tokenizer s | fit s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['vocab']} | {r['bytes_per_token']:.3f} | {r['train_tokens']:,} | {r['val_tokens']:,} | "
              f"{r['epochs']:.2f} | {r['params']:,} | {r['train_loss']:.3f} | {r['val_loss']:.3f} | "
              f"**{r['bits_per_byte']:.4f}** | {r['tok_seconds']:.1f} | {r['fit_seconds']:.0f} |")
    best = min(rows, key=lambda r: r["bits_per_byte"])
    print(f"\nlowest held-out bits/byte: vocab {best['vocab']} ({best['bits_per_byte']:.4f})")


if __name__ == "__main__":
    main()
