"""The accumulation rule: bfloat16/float16 inputs are computed in float32 on every backend, forward and backward.

Each backend's out, lse and gradients (q, k, v and a score term's table) are compared with the
float64 reference on the same half-rounded inputs. Float32 accumulation leaves only the final
rounding of each returned tensor to the inputs' dtype: at most one unit in the last place of that
value (``ULP``), plus a float32-sized slack relative to the tensor's largest entry (``SLACK``). A sum
kept in half precision misses that by orders of magnitude (a table's gradient sums hundreds of
pair gradients; aten's half CPU kernel gives lse errors of 5e-5 where float32 gives 5e-7).
"""

import pytest
import torch

import foveal.kernels.blocksparse as blocksparse
import foveal.kernels.cpu as cpu
from foveal import ALiBi, Neighborhood, RelativePositionBias, attend
from foveal.kernels.plan import build_plan
from foveal.kernels.select import BACKENDS

#: one unit in the last place, relative: the rounding of a float32 result to the inputs' dtype (half of it, doubled)
ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
#: float32 accumulation error, relative to a tensor's largest entry
SLACK = 1e-5
#: the lse is returned in float32: float32 accumulation error only (absolute; lse is O(log n))
LSE_TOL = 1e-5

GRID = (8, 8)
MAX_OFFSET = 3
HEADS = 3


@pytest.fixture(autouse=True)
def _many_chunks(monkeypatch):
    """The chunked kernels cut the pattern into many chunks: a table's gradient sums across them."""
    monkeypatch.setattr(cpu, "build_plan", lambda pattern, tile=None: build_plan(pattern, (2, 2), chunk_elements=256))
    monkeypatch.setattr(blocksparse, "SCORE_ELEMENTS", 1024)
    monkeypatch.setattr(BACKENDS["blocksparse"], "block", 16)
    cpu.PLANS.clear()
    yield
    cpu.PLANS.clear()


def _inputs(dtype, term):
    """q, k, v and a table (or None) rounded to ``dtype``, and a function making the term from a table."""
    q, k, v = (torch.randn(2, HEADS, GRID[0] * GRID[1], 16).to(dtype) for _ in range(3))
    if term == "table":
        table = torch.randn(HEADS, 2 * MAX_OFFSET + 1, 2 * MAX_OFFSET + 1).to(dtype)
        return (q, k, v, table), lambda t: RelativePositionBias(GRID, MAX_OFFSET, table=t)
    return (q, k, v, None), lambda t: ALiBi(HEADS) if term == "alibi" else None


def _run(tensors, make_term, dtype, backend, scale):
    """out, lse and the gradients of a fixed loss in out and lse, everything as float64."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
    q, k, v, table = leaves
    out, lse = attend(q, k, v, Neighborhood(GRID, 5), bias=make_term(table), scale=scale, backend=backend,
                      return_lse=True)
    # the output's gradient arrives in the output's dtype: a weight that half precision holds exactly
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(tensors[0].dtype).double()
    ((out.double() * weight).sum() + lse.double().sum()).backward()
    grads = [None if t is None else t.grad.double() for t in leaves]
    return [out.double(), lse.double(), *grads]


@pytest.mark.parametrize("backend", ["reference", "sdpa", "cpu", "blocksparse"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("term, scale", [("table", None), ("alibi", None), ("table", 1e-3), (None, 1e-3)])
def test_half_inputs_accumulate_in_float32(backend, dtype, term, scale):
    tensors, make_term = _inputs(dtype, term)
    got = _run(tensors, make_term, dtype, backend, scale)
    want = _run(tensors, make_term, torch.float64, "reference", scale)
    names = ["out", "lse", "dq", "dk", "dv", "dtable"]
    for name, g, w in zip(names, got, want):
        if w is None:
            continue
        if name == "lse":
            err = (g - w).abs().max().item()
            assert err <= LSE_TOL, f"{backend} {dtype} lse off by {err:.2e} (float32 accumulation: {LSE_TOL})"
            continue
        tol = ULP[dtype] * w.abs() + SLACK * w.abs().max()
        excess = ((g - w).abs() / tol).max().item()
        assert excess <= 1, f"{backend} {dtype} {name} off by {excess:.1f}x the final rounding of float32 accumulation"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flex_half_forward_accumulates_in_float32(dtype):
    """Compiled FlexAttention on CPU (forward only) holds to the same rule."""
    tensors, make_term = _inputs(dtype, "table")
    q, k, v, table = tensors
    pattern = Neighborhood(GRID, 5)
    try:
        out = attend(q, k, v, pattern, bias=make_term(table), backend="flex")
    except ValueError as e:  # flex cannot run here (reasons from its why_not)
        pytest.skip(str(e))
    want = attend(q.double(), k.double(), v.double(), pattern, bias=make_term(table.double()), backend="reference")
    tol = ULP[dtype] * want.abs() + SLACK * want.abs().max()
    assert ((out.double() - want).abs() / tol).max().item() <= 1
