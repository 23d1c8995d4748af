"""foveal: structured local–global attention, exact and fast, in one vocabulary.

``attend(q, k, v, pattern)`` computes attention restricted to a ``foveal.patterns``
pattern; ``pattern.layout(block_q, block_k)`` gives its ``BlockLayout``.
"""

from foveal.bias import ALiBi, RelativePositionBias
from foveal.decode import KVCache, Quest, SnapKV, attend_decode, snapkv_compress
from foveal.functional import attend
from foveal.layout import BlockLayout
from foveal.merge import merge_attentions
from foveal.patterns import (
    DHSA,
    BigBird,
    BlockCover,
    BlockSelection,
    BlockTopK,
    Causal,
    CausalBlockwise,
    Dilated,
    Document,
    DynamicPattern,
    Full,
    GlobalTokens,
    Grid,
    Halo,
    Intersection,
    MaskPattern,
    Neighborhood,
    Ordered,
    Pattern,
    PerHead,
    Power,
    PrefixLM,
    SharedQuestion,
    Sinks,
    SlidingWindow,
    Strided,
    Union,
    VerticalSlash,
    VerticalSlashCover,
    Window,
    a_shape,
)

__version__ = "0.1.0"

__all__ = [
    "attend",
    "merge_attentions",
    "ALiBi",
    "RelativePositionBias",
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
    "DynamicPattern",
    "BlockSelection",
    "VerticalSlash",
    "VerticalSlashCover",
    "BlockTopK",
    "BlockCover",
    "DHSA",
    "a_shape",
    "KVCache",
    "attend_decode",
    "Quest",
    "SnapKV",
    "snapkv_compress",
]
