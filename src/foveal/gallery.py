"""The built-in gallery: one small, representative instance of every built-in pattern.

Used by ``foveal show --gallery`` (one picture each) and ``foveal check`` (each
checked against the reference on every backend).
"""

from __future__ import annotations

from foveal.patterns import (
    BigBird,
    Causal,
    CausalBlockwise,
    Dilated,
    Document,
    Full,
    GlobalTokens,
    Grid,
    Halo,
    Neighborhood,
    Power,
    PrefixLM,
    SharedQuestion,
    Sinks,
    SlidingWindow,
    Strided,
    Window,
)

__all__ = ["GALLERY"]

#: name -> pattern; names are file-name safe.
GALLERY = {
    "full": Full(64),
    "causal": Causal(64),
    "sliding_window": SlidingWindow(64, left=8, right=8),
    "sliding_window_causal_dilated": SlidingWindow(64, left=16, dilation=2),
    "streaming_llm": SlidingWindow(64, left=8) | Sinks(64, 4),
    "global_tokens": GlobalTokens(64, 4),
    "strided_causal": Strided(64, 8) & Causal(64),
    "neighborhood_1d": Neighborhood(64, kernel_size=7),
    "neighborhood_2d": Neighborhood((16, 16), kernel_size=5),
    "neighborhood_2d_dilated": Neighborhood((16, 16), kernel_size=3, dilation=2),
    "neighborhood_2d_strided_causal": Neighborhood((16, 16), kernel_size=4, stride=2, causal=(True, False)),
    "neighborhood_3d": Neighborhood((6, 8, 8), kernel_size=3),
    "window_2d": Window((16, 16), window=4),
    "grid_2d": Grid((16, 16), size=4),
    "halo_2d": Halo((16, 16), block=4, halo=2),
    "neighborhood_plus_global": Neighborhood((16, 16), kernel_size=3) | GlobalTokens((16, 16), 4),
    "dilated_longnet": Dilated(64, segment=(8, 16, 32), rate=(1, 2, 4)),
    "power": Power(64, block=4, window=1, sinks=1),
    "bigbird": BigBird(64, block=4, window=3, globals=1, random=2, seed=0),
    "document_causal": Document([12, 20, 32], Causal),
    "prefix_lm": PrefixLM(64, prefix=16),
    "shared_question": SharedQuestion([12, 20, 32]),
    "causal_blockwise": CausalBlockwise([12, 20, 32]),
}
