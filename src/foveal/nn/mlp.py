"""``Mlp``: the transformer block's feed-forward, timm's ``Mlp`` (``fc1`` → activation → dropout → ``fc2`` → dropout).

The one copy used by every block of ``foveal.nn`` and ``foveal.models``; parameter names are timm's, so
converted timm weights load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """``fc2(drop(act(fc1(x))))`` then dropout, on the last dimension: (..., dim) -> (..., dim).

    ``act_layer`` builds the activation (default ``nn.GELU``); ``drop`` is the dropout after the
    activation and after ``fc2`` (timm's ``drop``/``proj_drop``).
    """

    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
