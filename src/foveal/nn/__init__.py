"""Modules: published local–global attention mechanisms as thin ``nn.Module``s over ``foveal.attend``.

One file per family; images and volumes are channels-last ``(B, *grid, C)``. Attention
modules expose ``pattern(grid)``, the foveal pattern they attend under
(``foveal show --module`` draws it). Constructors follow one order,
``(dim, num_heads, <the paper's arguments>, qkv_bias, qk_scale, attn_drop, proj_drop,
drop_path, backend)`` (NATTEN's drop-ins keep NATTEN's), and check every argument
(``tests/test_nn_api.py``; the README's modules section).
"""

from foveal.nn.cca import CoreContextAttention
from foveal.nn.contmix import ContMix
from foveal.nn.danet import ChannelAffinityAttention, PositionAttention
from foveal.nn.davit import ChannelAttention, ChannelBlock, ConvPosEnc, DaViTBlock, SpatialBlock
from foveal.nn.duoformer import ScaleWiseAttention
from foveal.nn.dcal import GlobalLocalCrossAttention, PairwiseCrossAttention, attention_rollout
from foveal.nn.ela import EfficientLocalAttention
from foveal.nn.focal import FocalModulation
from foveal.nn.graph import GraphLocalGlobalAttention
from foveal.nn.halo import HaloAttention
from foveal.nn.hierarchical import HierarchicalLocalAttention
from foveal.nn.maxvit import MaxViTBlock, MBConv, MultiAxisAttention
from foveal.nn.neighborhood import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from foveal.nn.scatter import ScatteredLinearAttention
from foveal.nn.vwformer import VaryingWindowAttention
from foveal.nn.window import WindowAttention

__all__ = [
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "WindowAttention",
    "MultiAxisAttention",
    "MaxViTBlock",
    "MBConv",
    "HaloAttention",
    "ChannelAttention",
    "DaViTBlock",
    "SpatialBlock",
    "ChannelBlock",
    "ConvPosEnc",
    "FocalModulation",
    "EfficientLocalAttention",
    "PositionAttention",
    "ChannelAffinityAttention",
    "GlobalLocalCrossAttention",
    "PairwiseCrossAttention",
    "attention_rollout",
    "VaryingWindowAttention",
    "ContMix",
    "ScaleWiseAttention",
    "HierarchicalLocalAttention",
    "ScatteredLinearAttention",
    "GraphLocalGlobalAttention",
    "CoreContextAttention",
]
