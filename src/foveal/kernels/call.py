"""``Call``: one call of ``attend`` as a backend sees it — the tensors, the pattern and the terms."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from foveal.bias import bias_parameters
from foveal.patterns.dynamic import BlockSelection

__all__ = ["Call"]


@dataclass(frozen=True)
class Call:
    """Everything a backend needs to decide whether it can run, and to run."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pattern: object
    scale: float
    #: whether the caller wants the log-sum-exp (backends may skip it otherwise)
    need_lse: bool = True
    #: an additive score term ``bias(h, q_idx, kv_idx)`` (see ``foveal.bias``), or None
    bias: object = None
    #: (B, n_kv) bool, True = the key is padding and is ignored; or None
    key_padding_mask: torch.Tensor | None = None
    #: logit soft-cap: scores become ``softcap·tanh(score / softcap)`` before the bias; or None
    softcap: float | None = None

    @property
    def needs_grad(self) -> bool:
        tensors = [self.q, self.k, self.v] + (bias_parameters(self.bias) if self.bias is not None else [])
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    @property
    def selected(self) -> bool:
        """True when the pattern is a content selection (per batch element and head)."""
        return isinstance(self.pattern, BlockSelection)
