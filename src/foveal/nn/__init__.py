"""Modules: published local–global attention mechanisms as thin ``nn.Module``s over ``foveal.attend``."""

from foveal.nn.neighborhood import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]
