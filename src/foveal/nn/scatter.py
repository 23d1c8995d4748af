"""Scattered linear attention (ScatterFormer): linear attention inside variable-length groups.

Every token belongs to a group (a window of voxels, a document, a segment) given by an
id. Within group ``g``, with a non-negative feature map ``φ``, the group's state is
``KV_g = Σ_{j∈g} φ(k_j)ᵀ v_j`` and ``s_g = Σ_{j∈g} φ(k_j)``, and query ``i`` of the
group reads ``y_i = φ(q_i) KV_g / (φ(q_i)·s_g + ε)``. The states are segment sums over
the group ids, accumulated chunk by chunk with ``index_add_`` in float32: no group is
padded to a common length, no token-by-token (N×N or group×group) score matrix exists,
and memory beyond the inputs is the groups' states plus one chunk.
He et al., "ScatterFormer: Efficient Voxel Transformer with Scattered Linear Attention"
(ECCV 2024).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from foveal._checks import positive_int
from foveal.nn._common import check_bool, check_heads, check_input, check_probability
from foveal.patterns import Document, Full

__all__ = ["ScatteredLinearAttention", "scattered_linear_attention", "FEATURE_MAPS"]

#: the non-negative feature maps φ: ScatterFormer's ReLU, and elu(x) + 1 of
#: Katharopoulos et al., "Transformers are RNNs" (2020)
FEATURE_MAPS = {"relu": F.relu, "elu+1": lambda x: F.elu(x) + 1.0}


def _segment_outer(a, b, index, groups: int, chunk: int):
    """``S[g] = Σ_{i: index[i]=g} a_iᵀ b_i`` per head: (N, H, Da), (N, H, Db) -> (groups, H, Da, Db)."""
    state = a.new_zeros(groups, a.shape[1], a.shape[2], b.shape[2])
    for s in range(0, a.shape[0], chunk):
        e = s + chunk
        state.index_add_(0, index[s:e], a[s:e, :, :, None] * b[s:e, :, None, :])
    return state


def _read(x, state, index, chunk: int):
    """``out_i = x_i @ state[index[i]]`` per head: (N, H, Da), (G, H, Da, Db) -> (N, H, Db)."""
    out = x.new_empty(x.shape[0], x.shape[1], state.shape[-1])
    for s in range(0, x.shape[0], chunk):
        e = s + chunk
        out[s:e] = torch.matmul(x[s:e, :, None, :], state[index[s:e]])[:, :, 0]
    return out


class _GroupedLinearMap(torch.autograd.Function):
    """``out_i = a_i @ Σ_{j in group(i)} k_jᵀ v_j``, chunked, with a chunked backward.

    The backward pass needs the same two primitives (segment sums of outer products and
    reads of a group state), so autograd never stores a per-token copy of a group state.
    """

    @staticmethod
    def forward(ctx, a, k, v, index, groups, chunk):
        state = _segment_outer(k, v, index, groups, chunk)
        ctx.save_for_backward(a, k, v, index, state)
        ctx.groups, ctx.chunk = groups, chunk
        return _read(a, state, index, chunk)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        a, k, v, index, state = ctx.saved_tensors
        groups, chunk = ctx.groups, ctx.chunk
        dstate = _segment_outer(a, dout, index, groups, chunk)
        da = _read(dout, state.transpose(-1, -2), index, chunk) if ctx.needs_input_grad[0] else None
        dk = _read(v, dstate.transpose(-1, -2), index, chunk) if ctx.needs_input_grad[1] else None
        dv = _read(k, dstate, index, chunk) if ctx.needs_input_grad[2] else None
        return da, dk, dv, None, None, None


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a number, got {eps!r} ({type(eps).__name__})")
    if not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    return float(eps)


def scattered_linear_attention(q, k, v, group_ids, *, eps: float = 1e-6, chunk_size: int = 512):
    """Normalised linear attention of ``q`` over ``k``/``v`` within the groups ``group_ids`` names.

    ``q`` and ``k`` (N, H, D) are the *feature-mapped* (non-negative) queries and keys,
    ``v`` (N, H, Dv), ``group_ids`` (N,) integers in any order (tokens of one group
    need not be contiguous; ids need not be dense). Returns (N, H, Dv):
    ``y_i = q_i KV_g / (q_i·s_g + eps)`` for ``i`` in group ``g``. Accumulates in float32
    and returns the dtype of ``v``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating tensor (tokens, heads, head_dim), got {got}")
    if q.shape != k.shape or q.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"q and k must have one shape and v the same (tokens, heads), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    _check_group_ids(group_ids, q.shape[0], q.device)
    eps = _check_eps(eps)
    chunk_size = positive_int("chunk_size", chunk_size)
    if q.shape[0] == 0:
        return v.new_zeros(v.shape)
    _, index = torch.unique(group_ids, return_inverse=True)
    groups = int(index.max()) + 1
    qf, kf, vf = q.float(), k.float(), v.float()
    # one extra value column of ones: its state column is s_g, its output the normaliser
    v1 = torch.cat([vf, vf.new_ones(vf.shape[0], vf.shape[1], 1)], dim=-1)
    num = _GroupedLinearMap.apply(qf, kf, v1, index, groups, chunk_size)
    return (num[..., :-1] / (num[..., -1:] + eps)).to(v.dtype)


def _check_group_ids(group_ids, n: int, device):
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"group_ids must be a torch.Tensor of integer ids, got {type(group_ids).__name__}")
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must hold integers (e.g. torch.long), got {group_ids.dtype}")
    if tuple(group_ids.shape) != (n,):
        raise ValueError(f"group_ids must have shape ({n},), one id per token, got {tuple(group_ids.shape)}")
    if group_ids.device != device:
        raise ValueError(f"group_ids must be on the features' device {device}, got {group_ids.device}")


class ScatteredLinearAttention(nn.Module):
    """ScatterFormer's scattered linear attention over tokens grouped by id (windows of voxels).

    Computes ``q, k, v = qkv(x)`` per head, ``φ`` on q and k, then for each token the
    normalised linear attention over the tokens of its own group,
    ``y_i = φ(q_i) (Σ_{j∈g} φ(k_j)ᵀ v_j) / (φ(q_i)·Σ_{j∈g} φ(k_j) + eps)``, and ``proj``.
    Groups may have any length; nothing is padded and no score matrix is formed: group
    states are segment sums over the ids, chunk by chunk (``chunk_size`` tokens), in
    float32, forward and backward.

    Shapes: ``x`` (N, dim) features of N tokens (all scenes of a batch together),
    ``group_ids`` (N,) integers in any order, distinct per group (fold the batch index
    into the id, as ScatterFormer's ``batch_win_inds`` does); returns (N, dim).

    He et al., "ScatterFormer: Efficient Voxel Transformer with Scattered Linear
    Attention" (ECCV 2024). As in its reference layer: ``φ = ReLU``, no ``1/sqrt(d)``
    scale, ``eps = 1e-6`` added to the normaliser, ``qkv_bias=False``.

    Parameters: ``dim`` channels; ``num_heads`` (divides ``dim``); ``feature_map``
    ``"relu"`` or ``"elu+1"``; ``eps``; ``chunk_size`` tokens per chunk (memory vs. Python
    overhead; the result does not depend on it); ``qkv_bias``; ``proj_drop`` dropout
    after the projection. No ``backend``: linear attention does not call ``attend``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        feature_map: str = "relu",
        eps: float = 1e-6,
        chunk_size: int = 512,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        dim, num_heads = check_heads(dim, num_heads)
        qkv_bias = check_bool("qkv_bias", qkv_bias)
        proj_drop = check_probability("proj_drop", proj_drop)
        if not isinstance(feature_map, str) or feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.feature_map = feature_map
        self.eps = _check_eps(eps)
        self.chunk_size = positive_int("chunk_size", chunk_size)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def pattern(self, group_ids: torch.Tensor) -> Document:
        """The (query, key) pairs that interact, as a pattern on the tokens sorted by group.

        Linear attention never forms these pairs; the pattern (``Document`` of ``Full``
        blocks, one per group, in ascending id order) is for drawing and for comparing
        against softmax attention over the same groups.
        """
        if not isinstance(group_ids, torch.Tensor) or group_ids.dim() != 1 or group_ids.numel() == 0:
            got = tuple(group_ids.shape) if isinstance(group_ids, torch.Tensor) else type(group_ids).__name__
            raise ValueError(f"group_ids must be a non-empty 1-D tensor of integer ids, got {got}")
        _check_group_ids(group_ids, group_ids.shape[0], group_ids.device)
        _, counts = torch.unique(group_ids, return_counts=True)
        return Document([int(c) for c in counts], Full)

    def forward(self, x: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """``x``: (N, dim) token features; ``group_ids``: (N,) integer group of each token; returns (N, dim)."""
        check_input("x", x, type(self).__name__)
        if x.dim() != 2:
            raise ValueError(f"x must be a (tokens, dim) tensor, got {tuple(x.shape)}")
        if x.shape[1] != self.dim:
            raise ValueError(f"x has {x.shape[1]} channels but dim is {self.dim}")
        _check_group_ids(group_ids, x.shape[0], x.device)
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).unbind(1)
        phi = FEATURE_MAPS[self.feature_map]
        y = scattered_linear_attention(phi(q), phi(k), v, group_ids, eps=self.eps, chunk_size=self.chunk_size)
        return self.proj_drop(self.proj(y.reshape(n, self.dim)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, feature_map={self.feature_map!r}, "
            f"eps={self.eps}, chunk_size={self.chunk_size}"
        )
