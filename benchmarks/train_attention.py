"""Attention forward + backward on a CPU, bf16 against fp32 inputs: why training attention in
bf16 runs in fp32 (``continual.training.dropout._attention``).

    python3 benchmarks/train_attention.py                  # SmolLM2's shape: 9 query / 3 key-value heads of 64
    python3 benchmarks/train_attention.py --lengths 64,128,256 --batch 16

For each sequence length: the fused attention kernel (``scaled_dot_product_attention``, causal,
grouped-query as SmolLM2's) timed forward and forward + backward, with bf16 inputs and with the
same values in fp32, and the ratio measured in the same run. Absolute times move with the
machine and its load; compare within one run.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def timed(dtype: torch.dtype, b: int, heads: int, kv_heads: int, length: int, dim: int, repeats: int) -> tuple[float, float]:
    """(forward seconds, forward + backward seconds), the mean of ``repeats`` after a warm-up."""
    torch.manual_seed(0)
    q = torch.randn(b, heads, length, dim, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, kv_heads, length, dim, dtype=dtype, requires_grad=True) for _ in range(2))
    grad = torch.randn(b, heads, length, dim, dtype=dtype)
    fwd = both = 0.0
    for i in range(repeats + 1):
        start = time.perf_counter()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
        mid = time.perf_counter()
        out.backward(grad)
        end = time.perf_counter()
        if i:  # the first is a warm-up
            fwd, both = fwd + mid - start, both + end - start
    return fwd / repeats, both / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--lengths", default="64,128")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    print(f"CPU, {torch.get_num_threads()} threads; batch {args.batch}, {args.heads} query / {args.kv_heads} "
          f"key-value heads of {args.dim}, causal\n")
    print("| tokens | bf16 fwd ms | fp32 fwd ms | bf16 fwd+bwd ms | fp32 fwd+bwd ms | fp32 / bf16 speed, fwd+bwd |")
    print("|---|---|---|---|---|---|")
    for length in (int(n) for n in args.lengths.split(",")):
        shape = (args.batch, args.heads, args.kv_heads, length, args.dim, args.repeats)
        bf_f, bf_b = timed(torch.bfloat16, *shape)
        fp_f, fp_b = timed(torch.float32, *shape)
        print(f"| {length} | {bf_f * 1e3:.1f} | {fp_f * 1e3:.1f} | {bf_b * 1e3:.1f} | {fp_b * 1e3:.1f} | {bf_b / fp_b:.2f}x |")


if __name__ == "__main__":
    main()
