"""The built-in gallery: one small, representative instance of every built-in pattern and attention module.

``GALLERY`` is used by ``foveal show --gallery`` (one picture each) and ``foveal
check`` (each checked against the reference on every backend). ``MODULE_GALLERY``
gives ``foveal show --gallery`` one picture per attention module of ``foveal.nn``
(the pattern it uses on a small grid); modules are written as expressions for
``foveal.show.parse_module`` so that importing this file does not build them.
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

__all__ = ["GALLERY", "MODULE_GALLERY"]

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
    "window_2d_shifted": Window((16, 16), window=4, shift=2),
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

#: name -> (module expression, grid): one entry per module class of ``foveal.nn`` with a ``pattern``
MODULE_GALLERY = {
    "window_attention_shifted": ("WindowAttention(dim=32, num_heads=2, window_size=4, shift_size=2)", (16, 16)),
    "neighborhood_attention_1d": ("NeighborhoodAttention1D(embed_dim=32, num_heads=2, kernel_size=7)", (64,)),
    "neighborhood_attention_2d": (
        "NeighborhoodAttention2D(embed_dim=32, num_heads=2, kernel_size=5, dilation=2)", (16, 16)),
    "neighborhood_attention_3d": ("NeighborhoodAttention3D(embed_dim=32, num_heads=2, kernel_size=3)", (6, 8, 8)),
    "halo_attention": ("HaloAttention(dim=32, num_heads=2, block_size=4, halo_size=2)", (16, 16)),
    "multi_axis_attention_block": ("MultiAxisAttention(dim=32, num_heads=2, partition_size=4, kind='block')", (16, 16)),
    "multi_axis_attention_grid": ("MultiAxisAttention(dim=32, num_heads=2, partition_size=4, kind='grid')", (16, 16)),
    "maxvit_block": ("MaxViTBlock(dim=32, num_heads=2, partition_size=4)", (16, 16)),
    "davit_spatial_block": ("SpatialBlock(dim=32, num_heads=2, window_size=4)", (16, 16)),
    "davit_block": ("DaViTBlock(dim=32, num_heads=2, window_size=4)", (16, 16)),
    "position_attention": ("PositionAttention(dim=32)", (16, 16)),
    "contmix": ("ContMix(dim=32, kernel_size=7, num_heads=2)", (16, 16)),
    "core_context_attention": ("CoreContextAttention(dim=32, num_heads=2, group_size=8, window_size=16)", (64,)),
    "global_local_cross_attention": ("GlobalLocalCrossAttention(dim=32, num_heads=2, top_ratio=0.1)", (65,)),
    "pairwise_cross_attention": ("PairwiseCrossAttention(dim=32, num_heads=2)", (64,)),
    "scale_wise_attention": ("ScaleWiseAttention(dim=32, num_heads=2, in_dims=(16, 32), patch_kernel_size=3)", (8, 8)),
    "graph_local_global_attention": ("GraphLocalGlobalAttention(dim=32, num_heads=2, num_centroids=8)", (64,)),
    "hierarchical_local_attention": ("HierarchicalLocalAttention(dim=32, num_heads=2, window_size=4)", (16, 16)),
    "scattered_linear_attention": ("ScatteredLinearAttention(dim=32, num_heads=2)", (64,)),
    "varying_window_attention": (
        "VaryingWindowAttention(dim=32, num_heads=2, window_size=4, ratios=(2, 4))", (16, 16)),
}
