"""``PerHead``: a different pattern for each query head (MInference, LongNet)."""

from __future__ import annotations

import torch

from foveal.patterns.base import Pattern
from foveal.patterns.dynamic import DynamicPattern

__all__ = ["PerHead"]


class PerHead:
    """Query head ``h`` attends under ``parts[h]``; key/value heads follow GQA as usual.

    MInference assigns each head its own pattern (A-shape, vertical-slash, block-sparse)
    and LongNet gives heads different dilation offsets; ``PerHead([p_0, …, p_{H−1}])``
    states that. Parts are static or content-selected patterns over the same queries
    and keys. ``attend`` runs each distinct part once, on the query heads that use it
    (and their key heads, never repeated), so equal parts cost one call; the
    reference backend evaluates the per-head dense mask ``dense_mask()`` (H, n_q, n_kv).
    """

    def __init__(self, parts):
        if isinstance(parts, (Pattern, DynamicPattern)) or not hasattr(parts, "__iter__"):
            raise TypeError(f"parts must be a list of patterns (one per query head), got {type(parts).__name__}")
        parts = tuple(parts)
        if not parts:
            raise ValueError("parts must hold one pattern per query head, got an empty list")
        for h, p in enumerate(parts):
            if not isinstance(p, (Pattern, DynamicPattern)):
                raise TypeError(f"parts[{h}] must be a foveal pattern, got {type(p).__name__}")
            if (p.n_q, p.n_kv) != (parts[0].n_q, parts[0].n_kv):
                raise ValueError(
                    f"every part must have the same queries and keys: parts[0] {parts[0]!r} has "
                    f"({parts[0].n_q}, {parts[0].n_kv}), parts[{h}] {p!r} has ({p.n_q}, {p.n_kv})"
                )
        self.__dict__["parts"] = parts

    def __setattr__(self, name, value):
        raise AttributeError("PerHead is immutable; build a new one instead")

    @property
    def num_heads(self) -> int:
        return len(self.parts)

    @property
    def n_q(self) -> int:
        return self.parts[0].n_q

    @property
    def n_kv(self) -> int:
        return self.parts[0].n_kv

    @property
    def dynamic(self) -> bool:
        """True when some part is content-selected (its mask needs q and k)."""
        return any(isinstance(p, DynamicPattern) for p in self.parts)

    def groups(self) -> list[tuple[object, list[int]]]:
        """Each distinct part (by value) with the query heads that use it, in order of first use."""
        heads: dict = {}
        for h, p in enumerate(self.parts):
            heads.setdefault(p, []).append(h)
        return list(heads.items())

    def dense_mask(self, device=None) -> torch.Tensor:
        """The (H, n_q, n_kv) bool mask of static parts. O(H·N²): for tests, pictures and the reference."""
        if self.dynamic:
            raise ValueError("a PerHead with content-selected parts has no mask before q and k are seen")
        out = torch.empty(self.num_heads, self.n_q, self.n_kv, dtype=torch.bool, device=device)
        for p, heads in self.groups():
            out[heads] = p.dense_mask(device=device)
        return out

    def density(self) -> float:
        """Share of the ``H · n_q · n_kv`` pairs allowed (static parts only)."""
        if self.dynamic:
            raise ValueError("a PerHead with content-selected parts has no density before q and k are seen")
        return sum(p.density() * len(h) for p, h in self.groups()) / self.num_heads

    def __eq__(self, other) -> bool:
        return isinstance(other, PerHead) and self.parts == other.parts

    def __hash__(self) -> int:
        return hash(("PerHead", self.parts))

    def __repr__(self) -> str:
        return f"PerHead([{', '.join(repr(p) for p in self.parts)}])"
