"""LargeGT graph attention: sampled-neighbourhood attention plus attention to a k-means codebook.

Local path: each node attends to the tokens of its sampled neighbourhood (itself and a
fixed number of sampled node ids, ``-1`` meaning "no neighbour"), gathered per node:
cost O(N·S), no N×N. Global path: each node attends to a small codebook of centroids
of the node features, kept by EMA k-means during training, with a ``log(count)`` term
on the scores (``attend`` over a ``Full`` cross pattern). The two outputs are
concatenated and projected.
Dwivedi et al., "Graph Transformers for Large Graphs" (LargeGT, 2023); the codebook
follows Kong et al., "GOAT: A Global Transformer on Large-scale Graphs" (ICML 2023).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from foveal._checks import positive_int
from foveal.nn._common import (
    attend,
    cached_pattern,
    check_backend,
    check_bool,
    check_heads,
    check_input,
    check_probability,
    qk_scale_or_default,
)
from foveal.patterns import Full

__all__ = ["GraphLocalGlobalAttention", "gathered_attention", "ema_kmeans_update"]


def gathered_attention(q, k, v, index, scale: float):
    """Softmax attention of each query over its own key set, given as row indices into ``k``/``v``.

    ``q`` (N, H, D); ``k`` (M, H, D), ``v`` (M, H, Dv); ``index`` (N, S) long, entries in
    ``[0, M)`` or ``-1`` (no key). Returns (N, H, Dv); a query whose row is all ``-1``
    gets zeros. Keys are gathered per query (O(N·S) memory); a repeated index is a
    repeated token.
    """
    valid = index >= 0
    safe = index.clamp(min=0)
    kg, vg = k[safe], v[safe]  # (N, S, H, D)
    s = torch.einsum("nhd,nshd->nhs", q, kg).float() * scale
    mask = valid[:, None, :]
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    p = torch.softmax(s, dim=-1) * mask
    return torch.einsum("nhs,nshd->nhd", p.to(vg.dtype), vg)


@torch.no_grad()
def ema_kmeans_update(codebook, cluster_size, ema_sum, z, decay: float, eps: float = 1e-5):
    """One EMA k-means step (VQ-VAE / GOAT style), in place; returns the assignment of each row of ``z``.

    Each row of ``z`` (N, C) goes to its nearest centroid of ``codebook`` (K, C);
    ``cluster_size ← decay·cluster_size + (1−decay)·counts`` with Laplace smoothing
    ``(n_k + eps) / (n + K·eps) · n``, ``ema_sum ← decay·ema_sum + (1−decay)·Σ z``,
    ``codebook ← ema_sum / cluster_size``. Computed in float32.
    """
    zf = z.detach().float()
    cb = codebook.float()
    k = cb.shape[0]
    assign = torch.cdist(zf, cb).argmin(dim=1)
    counts = torch.bincount(assign, minlength=k).float()
    sums = torch.zeros_like(cb).index_add_(0, assign, zf)
    size = cluster_size.float() * decay + (1 - decay) * counts
    n = size.sum()
    size = (size + eps) / (n + k * eps) * n
    new_sum = ema_sum.float() * decay + (1 - decay) * sums
    cluster_size.copy_(size)
    ema_sum.copy_(new_sum)
    codebook.copy_(new_sum / size[:, None])
    return assign


class _KeyTerm:
    """Score term ``values[kv_idx]``: one additive logit per key, the same for every head and query."""

    def __init__(self, values: torch.Tensor):
        self.values = values

    def __call__(self, h, q_idx, kv_idx):
        return self.values[kv_idx]

    def parameters(self):
        return [self.values]

    def compile_spec(self):
        return (_KeyTerm,), [self.values]

    @staticmethod
    def from_spec(rest, tensors):
        return _KeyTerm(tensors[0])


class GraphLocalGlobalAttention(nn.Module):
    """LargeGT's local + global attention for node features of a (large) graph.

    Local: node ``i`` attends (``softmax(q_i K_Sᵀ/sqrt(d)) V_S``, per head) to the
    tokens of its sampled neighbourhood ``S = [i] + neighbors[i]`` (``-1`` entries
    masked out; ``include_self=False`` drops ``i``). Global: ``q'_i`` attends to the
    ``num_centroids`` centroids ``μ`` of an EMA k-means codebook of the node features,
    ``softmax(q'_i (W_k μ)ᵀ/sqrt(d) + log n) (W_v μ)``, ``n`` the centroids' (EMA)
    cluster sizes. Output ``proj([local, global])``. In training every forward then
    moves the codebook one EMA k-means step towards the batch's node features (the
    output uses the codebook from before the step, as in the paper's code).

    Shapes: ``x`` (N, dim) features of the query nodes; ``neighbors`` (N, S) long
    indices into ``context`` (default ``x``: the rows of the same tensor), ``-1`` for
    "no neighbour"; ``context`` (M, dim) features of the nodes the indices point to
    (for a mini-batch of target nodes over the whole graph). Returns (N, dim).

    Dwivedi et al., "Graph Transformers for Large Graphs" (2023). Where this differs
    from the paper's code: the local module there is a small transformer over the
    sampled sequence (node, neighbours, and their 1-/2-hop aggregated features), read
    out from the node's token — here the node's query attends to the sampled tokens
    directly (pass aggregated features as extra rows of ``context`` to include them);
    k-means runs on the node features themselves (the paper's code batch-normalises
    ``[proj(x), positional encoding]`` first); the ``log`` term uses the EMA cluster
    sizes, which differ from the paper's current assignment counts by a common factor
    in expectation (a softmax-invariant shift); the codebook starts as ``randn`` with
    unit cluster sizes *(choose)*. Repeated ids in ``neighbors`` count as repeated
    tokens. The paper follows the concatenation with its feed-forward network.

    Parameters: ``dim``, ``num_heads``, ``num_centroids`` (codebook size), ``decay`` (EMA,
    0.99 as in the paper), ``include_self``, ``count_bias`` (the ``log n`` term),
    ``qkv_bias``, ``qk_scale`` (default ``head_dim**-0.5``), ``proj_drop``, ``backend``
    for the global path's ``attend``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_centroids: int = 64,
        decay: float = 0.99,
        include_self: bool = True,
        count_bias: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        dim, num_heads = check_heads(dim, num_heads)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.num_centroids = positive_int("num_centroids", num_centroids)
        self.decay = check_probability("decay", decay)
        self.include_self = check_bool("include_self", include_self)
        self.count_bias = check_bool("count_bias", count_bias)
        qkv_bias = check_bool("qkv_bias", qkv_bias)
        self.scale = qk_scale_or_default(qk_scale, self.head_dim)
        self.backend = check_backend(backend)
        proj_drop = check_probability("proj_drop", proj_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # local path
        self.q_global = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_global = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(2 * dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        codebook = torch.randn(self.num_centroids, dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(self.num_centroids))
        self.register_buffer("ema_sum", codebook.clone())

    def pattern(self, n: int) -> Full:
        """The global path's pattern: ``n`` nodes against all ``num_centroids`` centroids."""
        return cached_pattern(Full, positive_int("n", n), n_kv=self.num_centroids)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], self.num_heads, self.head_dim)

    def local_path(self, x, neighbors, context=None) -> torch.Tensor:
        """The local path before ``proj``: (N, H, head_dim)."""
        c, w, b = self.dim, self.qkv.weight, self.qkv.bias
        context = x if context is None else context

        def kv_of(t):
            return F.linear(t, w[c:], None if b is None else b[c:]).split(c, dim=-1)

        q = F.linear(x, w[:c], None if b is None else b[:c])
        k, v = kv_of(context)
        index = neighbors
        if self.include_self:
            m = context.shape[0]
            if context is x:  # the node's own token is a row of context already
                own = torch.arange(m, device=x.device)[:, None]
            else:
                k_self, v_self = kv_of(x)
                k, v = torch.cat([k, k_self]), torch.cat([v, v_self])
                own = torch.arange(m, m + x.shape[0], device=x.device)[:, None]
            index = torch.cat([own, neighbors], dim=1)
        return gathered_attention(self._heads(q), self._heads(k), self._heads(v), index, self.scale)

    def global_path(self, x) -> torch.Tensor:
        """The global path before ``proj``: (N, H, head_dim)."""
        n = x.shape[0]
        q = self._heads(self.q_global(x)).transpose(0, 1)[None]  # (1, H, N, d)
        # a copy: in training the codebook is updated in place after this forward
        kv = self.kv_global(self.codebook.to(x.dtype, copy=True))
        k, v = (self._heads(t).transpose(0, 1)[None] for t in kv.split(self.dim, dim=-1))
        bias = _KeyTerm(self.cluster_size.float().log()) if self.count_bias else None
        o = attend(q, k, v, self.pattern(n), bias=bias, scale=self.scale, backend=self.backend)
        return o[0].transpose(0, 1)

    def forward(self, x: torch.Tensor, neighbors: torch.Tensor, context: torch.Tensor | None = None):
        """``x`` (N, dim); ``neighbors`` (N, S) ids into ``context`` (default ``x``), -1 = none; returns (N, dim)."""
        context = self._check(x, neighbors, context)
        n = x.shape[0]
        out_local = self.local_path(x, neighbors, context).reshape(n, self.dim)
        out_global = self.global_path(x).reshape(n, self.dim)
        out = self.proj_drop(self.proj(torch.cat([out_local, out_global], dim=-1)))
        if self.training:
            self.update_codebook(x)
        return out

    @torch.no_grad()
    def update_codebook(self, x: torch.Tensor) -> torch.Tensor:
        """One EMA k-means step of the codebook towards the rows of ``x`` (N, dim); returns their assignments."""
        return ema_kmeans_update(self.codebook, self.cluster_size, self.ema_sum, x, self.decay)

    def _check(self, x, neighbors, context):
        check_input("x", x, type(self).__name__)
        if x.dim() != 2:
            raise ValueError(f"x must be a (nodes, dim) tensor, got {tuple(x.shape)}")
        if x.shape[1] != self.dim:
            raise ValueError(f"x has {x.shape[1]} channels but dim is {self.dim}")
        if context is None:
            context = x
        else:
            check_input("context", context, type(self).__name__)
            if context.dim() != 2 or context.shape[1] != self.dim:
                raise ValueError(f"context must be a (nodes, {self.dim}) tensor, got {tuple(context.shape)}")
            if context.dtype != x.dtype:
                raise TypeError(f"context must have x's dtype {x.dtype}, got {context.dtype}")
            if context.device != x.device:
                raise ValueError(f"context must be on x's device {x.device}, got {context.device}")
        if not isinstance(neighbors, torch.Tensor) or neighbors.dtype != torch.long:
            got = neighbors.dtype if isinstance(neighbors, torch.Tensor) else type(neighbors).__name__
            raise TypeError(f"neighbors must be a torch.long tensor of node indices, got {got}")
        if neighbors.dim() != 2 or neighbors.shape[0] != x.shape[0]:
            raise ValueError(
                f"neighbors must have shape ({x.shape[0]}, S): S sampled ids per node, got {tuple(neighbors.shape)}"
            )
        if neighbors.device != x.device:
            raise ValueError(f"neighbors must be on x's device {x.device}, got {neighbors.device}")
        if torch.compiler.is_compiling():  # no value can be read while tracing: the same check, in the graph
            torch._assert_async(((neighbors >= -1) & (neighbors < context.shape[0])).all(),
                                f"neighbors must hold ids in [0, {context.shape[0]}) or -1 (no neighbour)")
        elif neighbors.numel() and (int(neighbors.min()) < -1 or int(neighbors.max()) >= context.shape[0]):
            raise ValueError(
                f"neighbors must hold ids in [0, {context.shape[0]}) or -1 (no neighbour), "
                f"got values in [{int(neighbors.min())}, {int(neighbors.max())}]"
            )
        return context

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_centroids={self.num_centroids}, "
            f"decay={self.decay}, include_self={self.include_self}, count_bias={self.count_bias}"
        )
