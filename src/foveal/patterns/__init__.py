"""The pattern vocabulary: which (query, key) pairs may interact.

Static patterns: ``Full``, ``Causal``, ``SlidingWindow``, ``Neighborhood``,
``Window``, ``Grid``, ``Halo``, ``GlobalTokens``, ``Sinks``, ``Strided``,
``Dilated``, ``Power``, ``BigBird``, and for packed sequences ``Document``,
``PrefixLM``, ``SharedQuestion``, ``CausalBlockwise``; combine
them with ``|`` and ``&``; ``MaskPattern`` wraps any elementwise function.
``Ordered(inner, order, grid)`` runs a 1-D pattern along a token order
(``raster``, ``tiles``, ``morton``, ``hilbert``).

Content-selected (dynamic) patterns pick key blocks per batch and head from q and k
at call time: ``VerticalSlash``, ``VerticalSlashCover``, ``VerticalSlashRanges`` (as MInference's kernel
computes it), ``BlockTopK``, ``BlockCover``,
``DHSA`` (``pattern.select(q, k)`` gives a ``BlockSelection`` with its statistics);
``a_shape`` is MInference's static A-shape.
"""

from foveal.patterns.algebra import Intersection, Union
from foveal.patterns.base import Pattern, ProgressionPattern
from foveal.patterns.custom import MaskPattern
from foveal.patterns.documents import CausalBlockwise, Document, PrefixLM, SharedQuestion
from foveal.patterns.dynamic import (
    DHSA,
    BlockCover,
    BlockSelection,
    BlockTopK,
    DynamicPattern,
    VerticalSlash,
    VerticalSlashCover,
    a_shape,
)
from foveal.patterns.vertical_slash_ranges import VerticalSlashRanges
from foveal.patterns.causality import is_causal
from foveal.patterns.global_ import Causal, Full, GlobalTokens, Sinks, Strided
from foveal.patterns.local import Grid, Halo, Neighborhood, PaddedHalo, SlidingWindow, Window
from foveal.patterns.perhead import PerHead
from foveal.patterns.order import Ordered, hilbert, morton, raster, tiles
from foveal.patterns.sparse import BigBird, Dilated, Power

__all__ = [
    "Pattern",
    "ProgressionPattern",
    "Full",
    "Causal",
    "SlidingWindow",
    "Neighborhood",
    "Window",
    "Grid",
    "Halo",
    "PaddedHalo",
    "GlobalTokens",
    "Sinks",
    "Strided",
    "Dilated",
    "Power",
    "BigBird",
    "Document",
    "PrefixLM",
    "SharedQuestion",
    "CausalBlockwise",
    "Union",
    "Intersection",
    "MaskPattern",
    "Ordered",
    "PerHead",
]

# token orders: functions, not patterns (kept out of __all__ so that pattern-name listings stay patterns)
DYNAMIC = ["DynamicPattern", "BlockSelection", "VerticalSlash", "VerticalSlashCover", "VerticalSlashRanges",
           "BlockTopK", "BlockCover", "DHSA",
           "a_shape"]
ORDERS = {"raster": raster, "tiles": tiles, "morton": morton, "hilbert": hilbert}
