"""Kernels: the backends that compute attention over a pattern's layout.

``reference`` is the exact dense oracle. Each backend is registered in
``foveal.kernels.select`` with what it supports and why not.
"""

from foveal.kernels.reference import reference_attention

__all__ = ["reference_attention"]
