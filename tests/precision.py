"""How tests compare results that went through more arithmetic than one attention call.

float32 rounding of a deep model depends on the summation order, hence on the thread count, the
ISA (AVX2, AVX-512) and the BLAS: a fixed float32 tolerance that holds on one machine fails on the
next. So a whole model, or anything deeper than one attention call, is compared with its peer
(timm, transformers, a written-out definition) with both sides in float64, where rounding is
~1e-16 of the magnitudes and a 1e-10 tolerance is all margin: a real difference (a weight off by
1e-6, a wrong term) is orders of magnitude above it. Where float32 itself is what is tested, the
tolerance is derived from a float64 truth and the peer's own float32 rounding on the same machine.
"""

import torch

EPS32 = torch.finfo(torch.float32).eps


def scale(t: torch.Tensor) -> float:
    """The magnitude a tolerance is relative to: the largest |value|, at least 1."""
    return max(1.0, float(t.detach().abs().max())) if t.numel() else 1.0


def assert_close64(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-10, msg=None):
    """``got == want`` to ``tol`` times the largest |want| (at least 1); both float64."""
    assert got.dtype == want.dtype == torch.float64, (got.dtype, want.dtype)
    torch.testing.assert_close(got, want, atol=tol * scale(want), rtol=0, msg=msg)


def assert_rounding_like_peer(got32, peer32, truth64, factor: float = 4.0, what: str = "output"):
    """float32 ``got32`` is no further from the float64 ``truth64`` than ``factor`` times the float32
    ``peer32`` (the same computation by the peer, on the same input), plus a few ulps of the magnitude:
    a bound that grows with depth and magnitude exactly as float32 rounding does on this machine."""
    assert got32.dtype == peer32.dtype == torch.float32 and truth64.dtype == torch.float64
    err = float((got32.double() - truth64).abs().max())
    peer_err = float((peer32.double() - truth64).abs().max())
    bound = factor * peer_err + 4 * EPS32 * scale(truth64)
    assert err <= bound, f"{what}: float32 error {err:.3g} from the float64 truth, peer's {peer_err:.3g}, bound {bound:.3g}"


def attention_tol32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_keys: int, scale: float | None = None) -> float:
    """Rounding of one float32 attention call, for comparing two float32 implementations of it.

    A score ``q·k·scale`` over ``d`` terms carries ~eps·sqrt(d)·max|q|·max|k|·scale; softmax turns a
    score error δ into at most ~δ·max|v| in the output; the weighted sum over ``n_keys`` adds
    ~eps·sqrt(n_keys)·max|v|. Random-walk (sqrt) growth, not the worst case: measured errors sit
    10-30x below it, whatever the summation order (threads, ISA, BLAS).
    """
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    score = d**0.5 * scale * float(q.abs().max()) * float(k.abs().max())
    return EPS32 * (score + n_keys**0.5) * float(v.abs().max())
