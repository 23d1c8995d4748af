"""Backend registry: what each backend supports, why not, and the ``auto`` choice.

A backend is an object with a ``name``, ``why_not(call) -> list[str]`` (empty when
it can run the call) and ``run(call) -> (out, lse)``. ``select(call, "auto")`` takes
the first backend in ``AUTO_ORDER`` that supports the call; a named backend that
cannot run the call raises with its reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from foveal.kernels.reference import reference_attention

__all__ = ["Call", "BACKENDS", "AUTO_ORDER", "select", "why_not"]


@dataclass(frozen=True)
class Call:
    """Everything a backend needs to decide whether it can run, and to run."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pattern: object
    scale: float
    #: whether the caller wants the log-sum-exp (backends may skip it otherwise)
    need_lse: bool = True
    #: an additive score term ``bias(h, q_idx, kv_idx)`` (see ``foveal.bias``), or None
    bias: object = None

    @property
    def needs_grad(self) -> bool:
        from foveal.bias import bias_parameters

        tensors = [self.q, self.k, self.v] + (bias_parameters(self.bias) if self.bias is not None else [])
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class ReferenceBackend:
    """Dense masked attention over the pattern's full mask: exact, O(N²) memory."""

    name = "reference"
    #: refuse above this many score elements per (batch, head): a dense N×N is the point
    #: of this backend, but not for sizes that would exhaust memory by surprise
    max_pairs = 1 << 28

    def why_not(self, call: Call) -> list[str]:
        pairs = call.pattern.n_q * call.pattern.n_kv
        if pairs > self.max_pairs:
            return [f"reference materialises {call.pattern.n_q}x{call.pattern.n_kv} scores (> {self.max_pairs} pairs)"]
        return []

    def run(self, call: Call):
        mask = call.pattern.dense_mask(device=call.q.device)
        bias = None
        if call.bias is not None:
            dev = call.q.device
            h = torch.arange(call.q.shape[1], device=dev)[:, None, None]
            qi = torch.arange(call.pattern.n_q, device=dev)[None, :, None]
            ki = torch.arange(call.pattern.n_kv, device=dev)[None, None, :]
            bias = call.bias(h, qi, ki)
        return reference_attention(call.q, call.k, call.v, mask, call.scale, bias)


class CpuBackend:
    """Gather-based sparse attention in eager PyTorch: exact, no compile step, forward and backward."""

    name = "cpu"

    def why_not(self, call: Call) -> list[str]:
        return []

    def run(self, call: Call):
        from foveal.kernels.cpu import gather_attention

        return gather_attention(
            call.q, call.k, call.v, call.pattern, call.scale, need_lse=call.need_lse, bias=call.bias
        )


class FlexBackend:
    """Compiled FlexAttention with the pattern's analytic BlockMask (compiles once per shape)."""

    name = "flex"

    def why_not(self, call: Call) -> list[str]:
        if call.q.device.type == "cpu":
            from foveal.kernels.flex import cpu_limits

            return cpu_limits(call.q.dtype, call.needs_grad, call.need_lse)
        return []

    def run(self, call: Call):
        from foveal.kernels.flex import flex_attention_run

        return flex_attention_run(call.q, call.k, call.v, call.pattern, call.scale, call.need_lse, call.bias)


BACKENDS = {b.name: b for b in (ReferenceBackend(), CpuBackend(), FlexBackend())}

#: ``auto`` tries these in order, per device type. Measured with ``foveal bench speed
#: --suite full`` on a 2-core CPU (BENCHMARKS.md), float32, head_dim 64, forward:
#: ``cpu`` beat compiled FlexAttention's kernel time on every case, with no compile
#: step: 7x7 neighbourhood on 64x64 15 ms vs 62 ms, on 128x128 67 ms vs 349 ms; 3x3x3
#: on 32^3 166 ms vs 997 ms; causal window 512 on 16k tokens 233 ms vs 303 ms, on 64k
#: 0.88 s vs 1.22 s. Compiled flex also pays 4-10 s of compile per shape and, on CPU,
#: has no backward pass and no log-sum-exp. So on CPU: ``cpu``.
#: GPU: ``flex``, whose fused Triton kernel is FlexAttention's fast path there, then
#: ``cpu`` (runs on CUDA too). No GPU was available to measure this rule; it follows
#: FlexAttention's own GPU results and should be re-measured.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("flex", "cpu", "reference")}
_AUTO_DEFAULT = ("cpu", "reference")


def why_not(call: Call, backend: str) -> list[str]:
    """Reasons ``backend`` cannot run ``call`` (empty if it can)."""
    return BACKENDS[backend].why_not(call)


def select(call: Call, backend: str):
    """The backend object that will run ``call``."""
    if backend == "auto":
        reasons = {}
        for name in AUTO_ORDER.get(call.q.device.type, _AUTO_DEFAULT):
            r = BACKENDS[name].why_not(call)
            if not r:
                return BACKENDS[name]
            reasons[name] = r
        detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items())
        raise ValueError(f"no backend can run this call ({detail})")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    reasons = BACKENDS[backend].why_not(call)
    if reasons:
        raise ValueError(f"backend {backend!r} cannot run this call: {'; '.join(reasons)}")
    return BACKENDS[backend]
