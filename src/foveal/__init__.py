"""foveal: structured local–global attention, exact and fast, in one vocabulary.

``attend(q, k, v, pattern)`` computes attention restricted to a ``foveal.patterns``
pattern; ``pattern.layout(block_q, block_k)`` gives its ``BlockLayout``.
"""

from foveal import patterns as _patterns
from foveal.bias import ALiBi, RelativePositionBias
from foveal.decode import KVCache, Quest, SnapKV, attend_decode, snapkv_compress
from foveal.functional import attend
from foveal.layout import BlockLayout
from foveal.merge import merge_attentions
from foveal.patterns import (
    DHSA,
    DYNAMIC,
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
    PaddedHalo,
    Pattern,
    PerHead,
    Power,
    PrefixLM,
    ProgressionPattern,
    SharedQuestion,
    Sinks,
    SlidingWindow,
    Strided,
    Union,
    VerticalSlash,
    VerticalSlashCover,
    VerticalSlashRanges,
    Window,
    a_shape,
)

__version__ = "0.1.0"

#: the one export list of patterns is ``foveal.patterns``' (its ``__all__`` and ``DYNAMIC``): every name there is here
__all__ = [
    "attend",
    "merge_attentions",
    "ALiBi",
    "RelativePositionBias",
    "BlockLayout",
    *_patterns.__all__,
    *DYNAMIC,
    "KVCache",
    "attend_decode",
    "Quest",
    "SnapKV",
    "snapkv_compress",
]
