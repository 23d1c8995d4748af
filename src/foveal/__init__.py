"""foveal: structured local–global attention, exact and fast, in one vocabulary.

``attend(q, k, v, pattern)`` computes attention restricted to a ``foveal.patterns``
pattern; ``pattern.layout(block_q, block_k)`` gives its ``BlockLayout``.
"""

from foveal.functional import attend
from foveal.layout import BlockLayout
from foveal.patterns import (
    Causal,
    Full,
    GlobalTokens,
    Grid,
    Halo,
    Intersection,
    MaskPattern,
    Neighborhood,
    Pattern,
    Sinks,
    SlidingWindow,
    Strided,
    Union,
    Window,
)

__version__ = "0.1.0"

__all__ = [
    "attend",
    "BlockLayout",
    "Pattern",
    "Full",
    "Causal",
    "SlidingWindow",
    "Neighborhood",
    "Window",
    "Grid",
    "Halo",
    "GlobalTokens",
    "Sinks",
    "Strided",
    "Union",
    "Intersection",
    "MaskPattern",
]
