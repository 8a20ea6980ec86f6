"""Unigram and bigram baselines in bits per byte, on the same held-out stories `evaluate.py` scores.

    python bench/ngram_baseline.py                         # bundled data, committed tokenizer
    python bench/ngram_baseline.py --tokenizer runs/shipped/tokenizer --dev-fraction 0.05

Counts come from the train split (minus the dev stories), the smoothing α of each model is chosen on the
dev split, and the test split (the source's validation stories) is scored once, as in
`tfgpt.evaluation.evaluate_model` (every story after a leading end-of-text token, closing eos included).
A language model that does not beat the bigram row has learned little beyond word pairs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tfgpt.common import BUNDLED_DATA, quiet_tensorflow  # noqa: E402

quiet_tensorflow()
from tfgpt.data import load_stories, story_tokens  # noqa: E402
from tfgpt.evaluation import ngram_baselines  # noqa: E402
from tfgpt.tokenizer import Tokenizer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO / BUNDLED_DATA))
    p.add_argument("--tokenizer", default=str(REPO / "tokenizer"))
    p.add_argument("--dev-fraction", type=float, default=0.05)
    args = p.parse_args()
    tok = Tokenizer.load(args.tokenizer)
    splits = {name: story_tokens(load_stories(args.data, name, dev_fraction=args.dev_fraction), tok)
              for name in ("train", "dev", "validation")}
    out = ngram_baselines(splits["train"], splits["dev"], splits["validation"], tok.vocab_size)
    print(f"data {args.data}; tokenizer {args.tokenizer} (vocab {tok.vocab_size}); stories: "
          + ", ".join(f"{k} {len(v):,}" for k, v in splits.items()))
    print("| model | alpha (chosen on dev) | dev bits/byte | test bits/byte | test loss (nats/token) | test perplexity |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in out.items():
        print(f"| {name} | {r['alpha']:g} | {r['dev_bits_per_byte']:.4f} | {r['test_bits_per_byte']:.4f} | "
              f"{r['test_loss']:.4f} | {r['test_perplexity']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
