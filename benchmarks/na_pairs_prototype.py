"""Prototype: neighbourhood attention computing only the allowed pairs, fused by torch.compile (CPU).

The speed issue asks what could hold NA 7×7 on 64² at ≤ 0.15× compiled FlexAttention if
the eager gather kernel (``foveal cpu``: each 8×8 tile gathers its 14×14 halo, 4× the
useful pairs) cannot. This measures one candidate in the same process as the others:
the 49 keys of every query gathered by index and reduced in one compiled loop
(``torch.compile``'s C++ code for CPU fuses the gather into the dot products and the
weighted sum, so nothing of size N·49·D is materialised), against ``foveal cpu``,
compiled FlexAttention with attention-gym's mask, and dense SDPA. Exactness is checked
against foveal's reference on all rows.

    PYTHONPATH=src python benchmarks/na_pairs_prototype.py [--side 64] [--kernel 7] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from foveal import Neighborhood, attend
from foveal.bench.contenders import user_mask_mod
from foveal.functional_na import neighborhood_index


def na_pairs(q, k, v, idx, scale: float):
    """Attention of each query over its ``idx`` keys only: q (B, H, N, D), idx (N, T) -> (B, H, N, D)."""
    s = (q[:, :, :, None, :] * k[:, :, idx]).sum(-1) * scale  # (B, H, N, T): only the allowed pairs
    p = torch.softmax(s, -1)
    return (p[..., None] * v[:, :, idx]).sum(-2)


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--kernel", type=int, default=7)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    pattern = Neighborhood((args.side, args.side), args.kernel)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, pattern.n, args.dim, generator=gen) for _ in range(3))
    scale = args.dim ** -0.5
    idx = neighborhood_index(pattern.shape, args.kernel)
    compiled = torch.compile(na_pairs, dynamic=False)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm = create_block_mask(user_mask_mod(pattern), 1, 1, pattern.n, pattern.n, device="cpu")
        flex = torch.compile(flex_attention, dynamic=False)
        with torch.no_grad():
            want = attend(q, k, v, pattern, backend="reference")
            start = time.perf_counter()
            got = compiled(q, k, v, idx, scale)
            compile_s = time.perf_counter() - start
            err = (got - want).abs().max().item()
            rows = {
                "foveal cpu (gather kernel)": lambda: attend(q, k, v, pattern, backend="cpu"),
                "pairs-only prototype (torch.compile)": lambda: compiled(q, k, v, idx, scale),
                "compiled flex (attention-gym natten mask)": lambda: flex(q, k, v, block_mask=bm),
                "dense sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
            }
            times = {name: median_time(fn, args.repeats) for name, fn in rows.items()}
    flex_s = times["compiled flex (attention-gym natten mask)"]
    print(f"NA {args.kernel}x{args.kernel} on {args.side}², {args.heads} heads, head_dim {args.dim}, float32, forward, "
          f"{torch.get_num_threads()} threads; prototype compile {compile_s:.1f} s, max abs err {err:.1e}")
    print("| contender | time | × compiled flex |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.1f} ms | {t / flex_s:.2f} |")


if __name__ == "__main__":
    main()
