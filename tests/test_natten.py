"""``Neighborhood`` against NATTEN's own output (pip natten, run uncompiled on CPU).

NATTEN is a test dependency (the Makefile installs it); this module fails, rather
than skips, if it is missing.
"""

import math
import random
import warnings

import pytest
import torch

import natten.functional as natten_f
from foveal import Neighborhood, attend
from precision import attention_tol32

NA = {1: natten_f.na1d, 2: natten_f.na2d, 3: natten_f.na3d}


def _random_case(rng, ndim):
    max_len = {1: 48, 2: 12, 3: 7}[ndim]
    shape = tuple(rng.randint(2, max_len) for _ in range(ndim))
    k, d, s, c = [], [], [], []
    for length in shape:
        kk = rng.randint(2, length)
        k.append(kk)
        d.append(rng.randint(1, length // kk))
        s.append(rng.randint(1, kk))
        c.append(rng.random() < 0.4)
    return shape, tuple(k), tuple(d), tuple(s), tuple(c)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_neighborhood_equals_natten(seed, ndim):
    rng = random.Random(seed * 7 + ndim)
    shape, k, d, s, c = _random_case(rng, ndim)
    heads, dim = 2, 8
    # NATTEN layout: (batch, *grid, heads, head_dim)
    q, key, v = (torch.randn(2, *shape, heads, dim) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = NA[ndim](q, key, v, kernel_size=k, stride=s, dilation=d, is_causal=c)

    def to_bhnd(t):
        return t.reshape(2, -1, heads, dim).transpose(1, 2)

    p = Neighborhood(shape, k, dilation=d, stride=s, causal=c)
    got = attend(to_bhnd(q), to_bhnd(key), to_bhnd(v), p)
    # float32 on both sides (NATTEN's CPU path has no float64): one call's rounding, derived (tests/precision.py)
    tol = attention_tol32(q, key, v, math.prod(k))
    torch.testing.assert_close(got, to_bhnd(want), atol=tol, rtol=0, msg=lambda m: f"{p!r}: {m}")


def test_foveal_refuses_what_natten_refuses():
    q = torch.randn(1, 8, 8, 1, 4)
    for kwargs in ({"kernel_size": 9}, {"kernel_size": 3, "dilation": 3}):
        with pytest.raises(ValueError):
            natten_f.na2d(q, q, q, **kwargs)
        with pytest.raises(ValueError):
            Neighborhood((8, 8), **kwargs)
