"""BlockLayout: for each query block, the key blocks it needs, split into full and partial.

A layout is the compiled, device-ready form of a pattern for one tiling
(``block_q`` queries × ``block_k`` keys). A *full* block pair has every (valid)
query–key pair allowed and needs no mask work; a *partial* one has some allowed
pairs and must be masked with ``pattern.mask``; pairs not listed are empty. Tokens
past ``n_q`` / ``n_kv`` in a ragged last block do not count.

Storage is CSR over query blocks, for full and partial pairs separately; memory is
O(number of non-empty block pairs).
"""

from __future__ import annotations

import torch

from foveal._checks import positive_int

__all__ = ["BlockLayout"]

EMPTY, PARTIAL, FULL = 0, 1, 2


def _csr(qb: torch.Tensor, kb: torch.Tensor, nqb: int):
    counts = torch.bincount(qb, minlength=nqb)
    indptr = torch.zeros(nqb + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    return indptr, kb.to(torch.int64)


class BlockLayout:
    """Key blocks per query block, split into full and partial, stored as two CSR arrays.

    Build one with ``pattern.layout(block_q, block_k)``; ``from_dense_mask`` derives
    one from an explicit ``(n_q, n_kv)`` mask (O(N²), for tests). Layouts of the same
    tiling combine block-wise with ``|`` and ``&``.
    """

    def __init__(
        self,
        n_q: int,
        n_kv: int,
        block_q: int,
        block_k: int,
        full_indptr: torch.Tensor,
        full_indices: torch.Tensor,
        partial_indptr: torch.Tensor,
        partial_indices: torch.Tensor,
        method: str = "analytic",
    ):
        self.n_q, self.n_kv = positive_int("n_q", n_q), positive_int("n_kv", n_kv)
        self.block_q, self.block_k = positive_int("block_q", block_q), positive_int("block_k", block_k)
        nqb = self.num_q_blocks
        for name, ptr in (("full_indptr", full_indptr), ("partial_indptr", partial_indptr)):
            if ptr.shape != (nqb + 1,):
                raise ValueError(f"{name} must have shape ({nqb + 1},), got {tuple(ptr.shape)}")
        self.full_indptr, self.full_indices = full_indptr, full_indices
        self.partial_indptr, self.partial_indices = partial_indptr, partial_indices
        self.method = method

    # -- construction ---------------------------------------------------------
    @classmethod
    def from_states(cls, n_q, n_kv, block_q, block_k, qb, kb, state, method="analytic") -> "BlockLayout":
        """From block pairs and their states (``1`` partial, ``2`` full; ``0`` dropped)."""
        nkb = -(-n_kv // block_k)
        nqb = -(-n_q // block_q)
        keep = state > EMPTY
        qb, kb, state = qb[keep], kb[keep], state[keep]
        order = torch.argsort(qb * nkb + kb)
        qb, kb, state = qb[order], kb[order], state[order]
        full = state == FULL
        fptr, fidx = _csr(qb[full], kb[full], nqb)
        pptr, pidx = _csr(qb[~full], kb[~full], nqb)
        return cls(n_q, n_kv, block_q, block_k, fptr, fidx, pptr, pidx, method)

    @classmethod
    def from_counts(cls, n_q, n_kv, block_q, block_k, qb, kb, counts, method="analytic") -> "BlockLayout":
        """From block pairs and the exact number of allowed pairs in each."""
        qsize = torch.clamp(n_q - qb * block_q, max=block_q)
        ksize = torch.clamp(n_kv - kb * block_k, max=block_k)
        state = torch.where(counts == qsize * ksize, FULL, PARTIAL)
        state = torch.where(counts > 0, state, EMPTY)
        return cls.from_states(n_q, n_kv, block_q, block_k, qb, kb, state, method)

    @classmethod
    def from_dense_mask(cls, mask: torch.Tensor, block_q: int, block_k: int) -> "BlockLayout":
        """From an explicit bool mask of shape ``(n_q, n_kv)`` (O(N²): for tests and small inputs)."""
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a 2-D bool tensor, got {mask.dim()}-D {mask.dtype}")
        n_q, n_kv = mask.shape
        nqb, nkb = -(-n_q // block_q), -(-n_kv // block_k)
        padded = torch.zeros(nqb * block_q, nkb * block_k, dtype=torch.int64)
        padded[:n_q, :n_kv] = mask.cpu().to(torch.int64)
        counts = padded.view(nqb, block_q, nkb, block_k).sum((1, 3)).flatten()
        qb = torch.arange(nqb).repeat_interleave(nkb)
        kb = torch.arange(nkb).repeat(nqb)
        return cls.from_counts(n_q, n_kv, block_q, block_k, qb, kb, counts, method="dense mask")

    # -- views ----------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return -(-self.n_q // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.n_kv // self.block_k)

    @property
    def num_full(self) -> int:
        return int(self.full_indices.numel())

    @property
    def num_partial(self) -> int:
        return int(self.partial_indices.numel())

    def _rows(self, indptr):
        return torch.repeat_interleave(torch.arange(self.num_q_blocks), indptr.diff())

    def full_pairs(self):
        """(query block, key block) index tensors of the full block pairs."""
        return self._rows(self.full_indptr), self.full_indices

    def partial_pairs(self):
        """(query block, key block) index tensors of the partial block pairs."""
        return self._rows(self.partial_indptr), self.partial_indices

    def _areas(self, qb, kb):
        qsize = torch.clamp(self.n_q - qb * self.block_q, max=self.block_q)
        ksize = torch.clamp(self.n_kv - kb * self.block_k, max=self.block_k)
        return qsize * ksize

    def full_areas(self) -> torch.Tensor:
        """Number of token pairs in each full block pair (ragged edges counted exactly)."""
        return self._areas(*self.full_pairs())

    def states(self):
        """All non-empty pairs as (query block, key block, state) with state 1 partial, 2 full."""
        fq, fk = self.full_pairs()
        pq, pk = self.partial_pairs()
        state = torch.cat([torch.full_like(fq, FULL), torch.full_like(pq, PARTIAL)])
        return torch.cat([fq, pq]), torch.cat([fk, pk]), state

    def block_states(self) -> torch.Tensor:
        """Dense ``(num_q_blocks, num_kv_blocks)`` int8 matrix: 0 empty, 1 partial, 2 full."""
        out = torch.zeros(self.num_q_blocks, self.num_kv_blocks, dtype=torch.int8)
        qb, kb, state = self.states()
        out[qb, kb] = state.to(torch.int8)
        return out

    def kv_blocks_per_q_block(self) -> torch.Tensor:
        """Number of non-empty key blocks of each query block."""
        return self.full_indptr.diff() + self.partial_indptr.diff()

    def block_density(self) -> float:
        """Share of block pairs that are non-empty (an upper bound on the work a block kernel does)."""
        return (self.num_full + self.num_partial) / (self.num_q_blocks * self.num_kv_blocks)

    # -- algebra --------------------------------------------------------------
    def _check_same_tiling(self, other: "BlockLayout", op: str):
        if not isinstance(other, BlockLayout):
            raise TypeError(f"can only combine a BlockLayout with a BlockLayout, got {type(other).__name__}")
        mine = (self.n_q, self.n_kv, self.block_q, self.block_k)
        theirs = (other.n_q, other.n_kv, other.block_q, other.block_k)
        if mine != theirs:
            raise ValueError(
                f"layouts combined with {op} must share (n_q, n_kv, block_q, block_k); got {mine} and {theirs}"
            )

    def _combine(self, other: "BlockLayout", union: bool) -> "BlockLayout":
        nkb = self.num_kv_blocks
        aq, ak, ast = self.states()
        bq, bk, bst = other.states()
        keys = torch.cat([aq * nkb + ak, bq * nkb + bk])
        states = torch.cat([ast, bst])
        uniq, inv = torch.unique(keys, return_inverse=True)
        if union:  # full if either is full, else partial
            state = torch.zeros_like(uniq).scatter_reduce(0, inv, states, "amax", include_self=False)
        else:  # present in both; full only if both are full
            seen = torch.zeros_like(uniq).scatter_add(0, inv, torch.ones_like(states))
            state = torch.zeros_like(uniq).scatter_reduce(0, inv, states, "amin", include_self=False)
            state = torch.where(seen == 2, state, EMPTY)
        method = f"{self.method} {'|' if union else '&'} {other.method}"
        return BlockLayout.from_states(
            self.n_q, self.n_kv, self.block_q, self.block_k, uniq // nkb, uniq % nkb, state, method
        )

    def __or__(self, other: "BlockLayout") -> "BlockLayout":
        self._check_same_tiling(other, "|")
        return self._combine(other, union=True)

    def __and__(self, other: "BlockLayout") -> "BlockLayout":
        self._check_same_tiling(other, "&")
        return self._combine(other, union=False)

    # -- conversions ----------------------------------------------------------
    def to_flex(self, mask_mod=None, device=None):
        """The same blocks as a FlexAttention ``BlockMask`` (batch and head size 1).

        Partial blocks go to ``kv_indices`` (masked with ``mask_mod``), full blocks to
        ``full_kv_indices``; built with ``BlockMask.from_kv_blocks``, never with
        ``create_block_mask``'s N² sweep. The index tables are padded to
        ``num_kv_blocks`` columns, as FlexAttention's transposition for the backward
        pass requires: ``num_q_blocks · num_kv_blocks`` int32 entries (block-level, not
        token-level).
        """
        from torch.nn.attention.flex_attention import BlockMask

        def table(qb, kb):
            order = torch.argsort(qb * self.num_kv_blocks + kb)
            qb, kb = qb[order], kb[order]
            indptr, _ = _csr(qb, kb, self.num_q_blocks)
            out = torch.zeros(self.num_q_blocks, self.num_kv_blocks, dtype=torch.int32)
            out[qb, torch.arange(kb.numel()) - indptr[qb]] = kb.to(torch.int32)
            return indptr.diff().to(torch.int32)[None, None].to(device), out[None, None].to(device)

        # FlexAttention treats a block on a ragged edge as partial (it masks the padded
        # tile), so full blocks there move to the partial list, where mask_mod is applied.
        fq, fk = self.full_pairs()
        pq, pk = self.partial_pairs()
        ragged = torch.zeros_like(fq, dtype=torch.bool)
        if self.n_q % self.block_q:
            ragged |= fq == self.num_q_blocks - 1
        if self.n_kv % self.block_k:
            ragged |= fk == self.num_kv_blocks - 1
        kv_num, kv_idx = table(torch.cat([pq, fq[ragged]]), torch.cat([pk, fk[ragged]]))
        full_num, full_idx = table(fq[~ragged], fk[~ragged])
        return BlockMask.from_kv_blocks(
            kv_num,
            kv_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=(self.block_q, self.block_k),
            mask_mod=mask_mod,
            seq_lengths=(self.n_q, self.n_kv),
        )

    def __repr__(self) -> str:
        return (
            f"BlockLayout(n_q={self.n_q}, n_kv={self.n_kv}, block=({self.block_q}, {self.block_k}), "
            f"full={self.num_full}, partial={self.num_partial}, "
            f"block_density={self.block_density():.4f}, method={self.method!r})"
        )
