"""``na_av``: the neighbourhood "weights × values" op (NATTEN's former ``na{1,2,3}d_av``).

Given one weight per (pixel, neighbour) — a softmax over the neighbourhood, or any
dynamic kernel — it returns ``out_i = Σ_t w_{i,t} · v_{key(i, t)}`` over NATTEN's
neighbourhood of ``i`` (the window shifts inside the grid at the borders, as in
``foveal.patterns.Neighborhood``), with neighbours ``t`` in row-major order of the
``kernel_size^dim`` window. NATTEN removed this op in 0.20; OverLoCK's ContMix needs
it. Memory is O(N·(d + k^dim)): the forward and the backward loop over the
``k^dim`` window offsets and gather one shifted copy of ``v`` at a time; no N×N
tensor, no ``k^dim``-fold copy of ``v``. Sums over the window accumulate in float32
for bfloat16 and float16 inputs.
"""

from __future__ import annotations

import math

import torch

from foveal._checks import per_axis
from foveal.patterns.local import Neighborhood

__all__ = ["na_av", "neighborhood_index"]


def neighborhood_index(grid, kernel_size, dilation=1, device=None) -> torch.Tensor:
    """Flat key index of every (query, neighbour) pair: int64 ``(prod(grid), prod(kernel_size))``.

    Neighbour ``t`` of query ``i`` is the ``t``-th key of ``Neighborhood(grid,
    kernel_size, dilation)`` in row-major order of its window. Refuses a kernel (times
    dilation) larger than the grid, as NATTEN does.
    """
    pattern = Neighborhood(grid, kernel_size, dilation)
    shape, k = pattern.shape, pattern.kernel_size
    index = None
    for axis, length in enumerate(shape):
        x = torch.arange(length, device=device)
        first, step, _ = pattern.progression(axis, x)
        keys = first[:, None] + step[:, None] * torch.arange(k[axis], device=device)  # (L, k)
        if index is None:
            index = keys
        else:  # row-major product: (N_prev, K_prev) x (L, k) -> (N_prev·L, K_prev·k)
            index = (index[:, None, :, None] * length + keys[None, :, None, :]).reshape(
                index.shape[0] * length, index.shape[1] * k[axis]
            )
    return index


_INDEX_CACHE: dict = {}


def _cached_index(grid, kernel_size, dilation, device) -> torch.Tensor:
    key = (grid, kernel_size, dilation, str(device))
    if key not in _INDEX_CACHE:
        if len(_INDEX_CACHE) > 64:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = neighborhood_index(grid, kernel_size, dilation, device=device)
    return _INDEX_CACHE[key]


def _accumulator(v: torch.Tensor) -> torch.Tensor:
    """Zeros like ``v``, in float32 when ``v`` is a 16-bit float: sums over the window accumulate there."""
    dtype = torch.float32 if v.dtype in (torch.bfloat16, torch.float16) else v.dtype
    return torch.zeros(v.shape, dtype=dtype, device=v.device)


class _NAAV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, v, index):
        # weights (B, H, N, K), v (B, H, N, D), index (N, K)
        out = _accumulator(v)
        for t in range(index.shape[1]):
            out.addcmul_(weights[..., t : t + 1], v.index_select(2, index[:, t]))
        ctx.save_for_backward(weights, v, index)
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        weights, v, index = ctx.saved_tensors
        grad_w = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_w = torch.empty_like(weights)
            for t in range(index.shape[1]):
                grad_w[..., t] = (grad_out * v.index_select(2, index[:, t])).sum(-1)
        if ctx.needs_input_grad[1]:
            grad_v = _accumulator(v)
            for t in range(index.shape[1]):
                grad_v.index_add_(2, index[:, t], (weights[..., t : t + 1] * grad_out).to(grad_v.dtype))
            grad_v = grad_v.to(v.dtype)
        return grad_w, grad_v, None


def _check(weights, v, kernel_size, dilation):
    for name, t in (("weights", weights), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if v.dim() < 4 or v.dim() > 6:
        raise ValueError(
            f"v must be (batch, heads, *grid, head_dim) with a 1-, 2- or 3-D grid, got shape {tuple(v.shape)}"
        )
    nd = v.dim() - 3
    grid = tuple(v.shape[2:-1])
    k = per_axis("kernel_size", kernel_size, nd)
    d = per_axis("dilation", dilation, nd)
    want = (*v.shape[:-1], math.prod(k))
    if tuple(weights.shape) != want:
        raise ValueError(
            f"weights must be (batch, heads, *grid, prod(kernel_size)) = {want} for v of shape "
            f"{tuple(v.shape)} and kernel_size {k}, got {tuple(weights.shape)}"
        )
    if weights.dtype != v.dtype or weights.device != v.device:
        raise TypeError(
            f"weights and v must share dtype and device, got {weights.dtype}/{weights.device} and {v.dtype}/{v.device}"
        )
    return grid, k, d


def na_av(weights: torch.Tensor, v: torch.Tensor, kernel_size, dilation=1) -> torch.Tensor:
    """Neighbourhood weighted sum: ``out_i = Σ_t weights[..., i, t] · v[..., key(i, t), :]``.

    ``weights``: (B, heads, *grid, prod(kernel_size)); ``v``: (B, heads, *grid, d), a 1-,
    2- or 3-D grid; returns (B, heads, *grid, d). ``key(i, t)`` is the ``t``-th key, in
    row-major order of the window, of ``Neighborhood(grid, kernel_size, dilation)`` —
    NATTEN's ``na{1,2,3}d_av(attn, value, kernel_size, dilation)``. Differentiable in
    ``weights`` and ``v`` (first order).
    """
    grid, k, d = _check(weights, v, kernel_size, dilation)
    index = _cached_index(grid, k, d, v.device)
    b, h = v.shape[:2]
    n = math.prod(grid)
    out = _NAAV.apply(weights.reshape(b, h, n, -1), v.reshape(b, h, n, v.shape[-1]), index)
    return out.reshape(v.shape)
