"""A minimal nanoGPT-style PyTorch GPT: the PyTorch reference of the training-speed benchmark (issue 6).

Same shape as `tfgpt.GPT` for a `GPTConfig` (pre-LN only): learned positions, fused QKV projection,
`F.scaled_dot_product_attention(is_causal=True)`, GELU (tanh approximation), final LayerNorm, output
projection tied to the token embedding, GPT-2 initialisation. Trained with AdamW (β = 0.9/0.95, fused
kernel where the CPU build has one, else foreach), global-norm clipping at 1.0, in float32 or under
`torch.autocast("cpu", dtype=torch.bfloat16)`, optionally through `torch.compile`.

`generate_greedy` is the matching KV-cache decoder (bench/decode_speed.py): per-layer key/value caches
(B, H, T, d_k) written in place, prefill then one token per step, greedy, and past the context the same
sliding window as tfgpt.generation (refill the last T − T/4 tokens at slots 0…, then go on).

Used by `bench/train_throughput.py` (one configuration per subprocess); also runnable on its own:

    .venv/bin/python bench/torch_gpt.py --precision bfloat16 --steps 10 --warmup 3

prints one JSON line with the median step time and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import load_config_class  # noqa: E402  (no TensorFlow: see there)

GPTConfig = load_config_class()

PRECISIONS = ("float32", "bfloat16")


class CausalSelfAttention(nn.Module):
    """y = softmax(Q Kᵀ/√d_k + M) V W_O, with one fused Q|K|V projection."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.d_model = c.n_heads, c.d_model
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=c.use_bias)
        self.out_proj = nn.Linear(c.d_model, c.d_model, bias=c.use_bias)

    def forward(self, x: torch.Tensor, cache: tuple | None = None, pos: int = 0) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        # (B, T, D) -> (B, H, T, d_k)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # keys/values of positions pos … pos+T−1 go to slots pos …, in place
            if pos and T > 1:
                raise ValueError("a multi-token step must start at slot 0 (prefill or refill)")
            k_cache, v_cache = cache
            k_cache[:, :, pos : pos + T] = k
            v_cache[:, :, pos : pos + T] = v
            k, v = k_cache[:, :, : pos + T], v_cache[:, :, : pos + T]
        # a (re)fill at slot 0 is causal; one new token sees every cached key
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        return self.out_proj(y.transpose(1, 2).contiguous().view(B, T, D))


class Block(nn.Module):
    """Pre-LN decoder block: x + MHA(LN₁(x)), then x + FFN(LN₂(x))."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.d_model, eps=c.layer_norm_epsilon)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.d_model, eps=c.layer_norm_epsilon)
        self.fc_in = nn.Linear(c.d_model, c.d_ff, bias=c.use_bias)
        self.fc_out = nn.Linear(c.d_ff, c.d_model, bias=c.use_bias)

    def forward(self, x: torch.Tensor, cache: tuple | None = None, pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.fc_out(F.gelu(self.fc_in(self.ln_2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    """nanoGPT-style GPT of the same shape as `tfgpt.GPT(config)` (pre-LN, learned positions, tied head)."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        if c.norm_position != "pre" or c.position_encoding != "learned" or not c.tie_embeddings:
            raise ValueError(
                "TorchGPT mirrors only the GPT-2 layout: use norm_position='pre', "
                "position_encoding='learned', tie_embeddings=True"
            )
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.context, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model, eps=c.layer_norm_epsilon)
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * c.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, std=residual_std)
            nn.init.normal_(block.fc_out.weight, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, ids: torch.Tensor, caches: list | None = None, pos: int = 0) -> torch.Tensor:
        """(B, T) int64 ids at positions pos … pos+T−1 -> (B, T, V) logits (tied head: h Eᵀ); with
        `caches` (one (K, V) pair per block, `init_caches`) their keys/values are written at slots pos …."""
        T = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(pos, pos + T, device=ids.device))
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], pos)
        return F.linear(self.ln_f(x), self.wte.weight)

    def init_caches(self, batch_size: int, length: int | None = None) -> list:
        """One zeroed (K, V) pair per block, each (B, H, S, d_k); S defaults to the context."""
        c = self.config
        shape = (batch_size, c.n_heads, length or c.context, c.d_model // c.n_heads)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in self.blocks]


@torch.inference_mode()
def generate_greedy(model: TorchGPT, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of `prompt` (B, P) int64 by `new_tokens` tokens with KV caches -> (B, new_tokens).

    Prefill the prompt, then one token per step. When the cache (T slots) is full, the window slides as
    in tfgpt.generation: the last keep = T − T/4 tokens are prefilled again at slots 0 … keep−1.
    """
    T = model.config.context
    keep = T - max(1, T // 4)
    seq = prompt
    caches = model.init_caches(prompt.shape[0])
    logits = model(prompt, caches, 0)[:, -1]
    w = 0  # window start: slot = position − w
    for _ in range(new_tokens):
        token = logits.argmax(-1, keepdim=True)  # (B, 1)
        seq = torch.cat([seq, token], dim=1)
        p = seq.shape[1] - 1  # the new token's position
        if p - w >= T:
            w = p - keep
            model(seq[:, w:p], caches, 0)  # refill: positions w … p−1 at slots 0 … keep−1
        logits = model(token, caches, p - w)[:, -1]
    return seq[:, prompt.shape[1] :]


def make_optimizer(model: nn.Module, lr: float = 3e-4, weight_decay: float = 0.1) -> torch.optim.Optimizer:
    """nanoGPT's AdamW: decay on ≥2-D weights only, β = (0.9, 0.95); fused CPU kernel if available."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), foreach=True)


def time_training(
    config: GPTConfig,
    batch_size: int,
    steps: int,
    warmup: int,
    precision: str = "float32",
    compile_model: bool = False,
    seed: int = 0,
) -> dict:
    """Train on random token batches; return per-step wall times of the `steps` steps after `warmup`.

    Each step is forward + loss + backward + clip + AdamW update, timed around the whole step with the
    loss read back as a Python float (the CPU is synchronous; `.item()` is the synchronisation point).
    Also records the process CPU time of each step (`cpu_times`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    torch.manual_seed(seed)
    model = TorchGPT(config)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model)
    step_model = torch.compile(model) if compile_model else model
    gen = torch.Generator().manual_seed(seed)
    batches = [
        torch.randint(0, config.vocab_size, (batch_size, config.context + 1), generator=gen) for _ in range(4)
    ]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")

    def step(tokens: torch.Tensor) -> float:
        x, y = tokens[:, :-1], tokens[:, 1:]
        with autocast:
            logits = step_model(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    model.train()
    t0 = time.perf_counter()
    losses = []
    for i in range(warmup):
        losses.append(step(batches[i % len(batches)]))
    warmup_s = time.perf_counter() - t0
    times, cpu_times = [], []
    for i in range(steps):
        t, c = time.perf_counter(), time.process_time()
        losses.append(step(batches[(warmup + i) % len(batches)]))
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    return {
        "params": n_params,
        "step_times": times,
        "cpu_times": cpu_times,
        "warmup_s": warmup_s,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "optimizer": "AdamW fused" if optimizer.defaults.get("fused") else "AdamW foreach",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-6m")
    p.add_argument("--precision", default="float32", choices=PRECISIONS)
    p.add_argument("--compile", action="store_true", help="train through torch.compile")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = GPTConfig.from_preset(args.preset)
    out = time_training(config, args.batch_size, args.steps, args.warmup, args.precision, args.compile)
    median = statistics.median(out["step_times"])
    out["tokens_per_s"] = args.batch_size * config.context / median
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
