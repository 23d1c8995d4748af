"""Synthetic sequence tasks that separate attention patterns, generated from a seed.

Each generator returns tensors for one task; loss is computed only where ``targets``
is not ``IGNORE``. Token ids: 0 is padding/filler, small ids are markers, data
tokens follow.

* ``passkey``: filler with a marked passkey at a chosen depth; at the end the query marker
  asks for it (Mohtashami & Jaggi 2023). Causal self-attention.
* ``mqar``: multi-query associative recall — key/value pairs, then keys again; predict each
  value (Arora et al., Zoology 2023). Causal self-attention.
* ``icl_regression``: in-context linear regression — ``[x_i, w·x_i]`` rows and a query
  ``x`` (Garg et al. 2022). One attention layer; MSE.
* ``reverse``: output position ``i`` is input token ``n−1−i`` (non-causal self-attention).
* ``cross_reverse``: the same through cross attention from decoder positions to the
  encoder (non-causal cross).
* ``cross_recall``: the encoder holds key/value pairs; decoder position ``i`` must return
  the value of the ``i``-th pair, whose key sits at least as early as the query's
  bottom-right-aligned position (causal cross).
"""

from __future__ import annotations

import torch

__all__ = ["IGNORE", "passkey", "mqar", "icl_regression", "reverse", "cross_reverse", "cross_recall"]

IGNORE = -100
PAD, KEY, QUERY = 0, 1, 2
DATA = 3  # first data token id


def passkey(count: int, n: int, seed: int, vocab: int = 32, keys: int = 8, depths=None):
    """``(tokens (count, n), targets (count, n))``: recall the passkey after KEY at the QUERY at the end.

    Filler tokens come from ``[DATA, vocab − keys)``, the passkey from the last ``keys`` ids,
    which appear nowhere else: the QUERY must find it wherever it is, however far back.
    ``depths`` (fractions in [0, 1)) cycle over the examples; by default uniform at random.
    """
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(DATA, vocab - keys, (count, n), generator=gen)
    targets = torch.full((count, n), IGNORE)
    key = torch.randint(vocab - keys, vocab, (count,), generator=gen)
    if depths is None:
        pos = torch.randint(0, n - 3, (count,), generator=gen)
    else:
        d = torch.tensor(depths, dtype=torch.float64)[torch.arange(count) % len(depths)]
        pos = (d * (n - 3)).long().clamp(0, n - 4)
    rows = torch.arange(count)
    tokens[rows, pos] = KEY
    tokens[rows, pos + 1] = key
    tokens[:, -1] = QUERY
    targets[:, -1] = key
    return tokens, targets


def mqar(count: int, n: int, seed: int, pairs: int = 8, vocab: int = 64):
    """Key/value pairs at the start, the keys again (shuffled) at the end; predict each value after its key."""
    if 4 * pairs + 1 > n:
        raise ValueError(f"n must be at least 4·pairs + 1 = {4 * pairs + 1}, got {n}")
    gen = torch.Generator().manual_seed(seed)
    half = (vocab - DATA) // 2
    keys = torch.stack([torch.randperm(half, generator=gen)[:pairs] for _ in range(count)]) + DATA
    values = torch.randint(DATA + half, vocab, (count, pairs), generator=gen)
    tokens = torch.randint(DATA, vocab, (count, n), generator=gen)
    targets = torch.full((count, n), IGNORE)
    tokens[:, 0 : 2 * pairs : 2], tokens[:, 1 : 2 * pairs : 2] = keys, values
    order = torch.stack([torch.randperm(pairs, generator=gen) for _ in range(count)])
    start = n - 2 * pairs
    rows = torch.arange(count)[:, None]
    tokens[:, start::2] = keys[rows, order]
    tokens[:, start + 1 :: 2] = PAD
    targets[:, start::2] = values[rows, order]
    return tokens, targets


def icl_regression(count: int, n: int, seed: int, dim: int = 8, noise: float = 0.0):
    """``(tokens (count, n, dim+1), y (count,))``: ``n−1`` examples ``[x, w·x]`` and a query ``[x, 0]``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(count, dim, generator=gen)
    x = torch.randn(count, n, dim, generator=gen)
    y = torch.einsum("bnd,bd->bn", x, w) + noise * torch.randn(count, n, generator=gen)
    tokens = torch.cat([x, y[..., None]], dim=-1)
    tokens[:, -1, -1] = 0
    return tokens, y[:, -1]


def ridge_and_gd(tokens: torch.Tensor, lam: float = 1e-3):
    """Baselines on icl_regression tokens: (ridge prediction, one step of gradient descent from 0, best step)."""
    x, y = tokens[:, :-1, :-1].double(), tokens[:, :-1, -1].double()
    xq = tokens[:, -1, :-1].double()
    d = x.shape[-1]
    w = torch.linalg.solve(x.transpose(1, 2) @ x + lam * torch.eye(d, dtype=x.dtype), x.transpose(1, 2) @ y[..., None])
    ridge = (xq[:, None, :] @ w)[:, 0, 0]
    gd = torch.einsum("bd,bnd,bn->b", xq, x, y) / x.shape[1]  # w1 = η Xᵀy with η = 1/n
    return ridge.float(), gd.float()


def reverse(count: int, n: int, seed: int, vocab: int = 16):
    """``(tokens, targets)`` with ``targets[:, i] = tokens[:, n−1−i]``."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(DATA, vocab, (count, n), generator=gen)
    return tokens, tokens.flip(1)


def cross_reverse(count: int, n: int, seed: int, vocab: int = 16):
    """``(src (count, n), targets (count, n))``: the decoder's position ``i`` outputs ``src[n−1−i]``."""
    return reverse(count, n, seed, vocab)


def cross_recall(count: int, n: int, seed: int, pairs: int = 16, vocab: int = 64):
    """``(src (count, 2·pairs + filler), targets (count, pairs))``: query ``i`` returns pair ``i``'s value.

    The source holds the pairs spread over the sequence in order; with ``pairs`` queries
    aligned bottom-right, query ``i`` (key position ``i + n − pairs``) may see every pair
    up to its own under a causal cross pattern.
    """
    if 2 * pairs > n:
        raise ValueError(f"n must be at least 2·pairs = {2 * pairs}, got {n}")
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(DATA, vocab, (count, n), generator=gen)
    values = torch.randint(DATA, vocab, (count, pairs), generator=gen)
    slots = torch.linspace(0, n - 2, pairs).long()
    src[:, slots] = KEY
    src[:, slots + 1] = values
    return src, values
