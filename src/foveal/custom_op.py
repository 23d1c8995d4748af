"""``attend`` as one opaque ``torch.library`` custom op, so that ``torch.compile`` keeps one graph.

While ``torch.compile`` traces a model, ``attend`` validates its arguments in the traced
Python (shapes, dtypes, devices: no tensor values are read there) and then calls the
custom op ``foveal::attend`` (FlashAttention's ``torch.library`` wrappers are the model):

* its tensor arguments are tensors: ``q``, ``k``, ``v``, the optional ``key_padding_mask``
  and ``sink_logits``, and the tensors of the score term (``compile_spec``, below), so
  that their gradients flow;
* everything else is a constant: ``scale``, ``softcap``, ``backend``, ``return_lse``, and
  the pattern and the score term's remaining description as *keys*: short strings
  (``"Neighborhood_3"``) that the registry here maps back to the values. A key is
  given per distinct value (patterns are values: equal patterns get the same key, so a
  pattern built anew does not recompile anything), deterministic within a process.
  The registry is bounded (``MAX_KEYS`` values, least recently used dropped first); a
  compiled graph that outlived its key says so when it runs.

The op's real implementation is the eager ``attend`` (every value-reading check runs
there); its fake implementation gives ``out`` (B, Hq, Nq, Dv) in q's dtype and ``lse``
(B, Hq, Nq) in ``foveal.inputs.lse_dtype`` (an empty tensor unless ``return_lse``), for
any symbolic batch size.

Backward: checkpoint-style. The op keeps only its inputs; the registered backward calls
a second custom op, ``foveal::attend_backward``, which recomputes the eager forward under
``enable_grad`` and takes ``torch.autograd.grad`` through it (the backends' own backward
passes run there). It costs one extra forward pass per backward and no stored
activations beyond the inputs, whatever the backend.

Score terms under compile: a term with ``compile_spec()`` (``RelativePositionBias``,
``ALiBi``) passes its tensors as op inputs and rebuilds itself inside the op with
``spec[0].from_spec(spec[1:], tensors)``; a plain function that is not a closure (or any
hashable term without tensors that require grad) is passed by key as it is. Others
(closures, terms with parameters but no ``compile_spec``) run ``attend`` eagerly outside
the graph (a graph break, as before compile support: ``fullgraph=True`` refuses it with
that reason); so do ``BlockSelection`` patterns made beforehand (they hold tensors) and
patterns built inside the compiled code (build them outside, e.g. in ``__init__``, or
through ``built(cls, *args)``, which builds them once at trace time).
"""

from __future__ import annotations

import threading
import types
from collections import OrderedDict
from typing import Optional

import torch

__all__ = ["attend_traced", "attend_outside_graph", "built", "key_of", "value_of", "trace_constant", "MAX_KEYS"]

#: how many distinct patterns and score-term descriptions the key registry holds
MAX_KEYS = 4096

_LOCK = threading.Lock()
_KEYS: "OrderedDict[object, str]" = OrderedDict()
_COUNT = [0]


class _Values:
    """The registry's values, one attribute per key: dynamo reads (and guards) one attribute at a time."""


_VALUES = _Values()


def _register(value) -> str:
    with _LOCK:
        key = _KEYS.get(value)
        if key is not None:
            _KEYS.move_to_end(value)
            return key
        _COUNT[0] += 1
        name = value[0].__name__ if isinstance(value, tuple) and isinstance(value[0], type) else type(value).__name__
        key = f"{name}_{_COUNT[0]}"
        _KEYS[value] = key
        setattr(_VALUES, key, value)
        while len(_KEYS) > MAX_KEYS:
            _, old = _KEYS.popitem(last=False)
            delattr(_VALUES, old)
        return key


def key_of(value) -> str:
    """The registry key of a hashable value (a pattern, a score term's spec): the same for equal values."""
    try:
        hash(value)
    except Exception as e:  # a pattern built while tracing reaches here as an empty shell
        raise TypeError(
            f"under torch.compile, attend takes a pattern (and score term) built outside the traced code "
            f"(e.g. in __init__, or through foveal.custom_op.trace_constant / foveal.nn._common.cached_pattern); "
            f"{type(value).__name__} could not be read: {e}"
        ) from None
    return _register(value)


def value_of(key: str):
    """The value registered under ``key`` (raises if it was dropped from the bounded registry)."""
    try:
        return getattr(_VALUES, key)
    except AttributeError:
        raise RuntimeError(
            f"foveal's compiled attend lost the value of key {key!r}: more than {MAX_KEYS} distinct patterns were "
            f"used since this graph was compiled; call torch._dynamo.reset() (or raise foveal.custom_op.MAX_KEYS)"
        ) from None


def trace_constant(fn):
    """``fn`` evaluated once at trace time under ``torch.compile`` and its result kept as a constant.

    For pure functions of Python values (ints, tuples, classes) that build patterns: the
    arguments must be constants under tracing (shapes that are not dynamic), and ``fn``
    must return the same value for the same arguments. Eager calls run ``fn`` as usual.
    """
    return torch.compiler.assume_constant_result(fn)


_traced_key = trace_constant(key_of)


def _build_key(build, *args, **kwargs) -> str:
    return key_of(build(*args, **kwargs))


_traced_build_key = trace_constant(_build_key)


def built(build, *args, **kwargs):
    """``build(*args, **kwargs)``; under ``torch.compile``, built once at trace time and kept as a constant.

    For pure builders of values (patterns) from Python constants (ints of static shapes,
    tuples, classes): equal arguments give the registry's one value for them, which the
    graph reads by identity and ``attend`` passes to the op by its key. Eager calls just build.
    """
    if torch.compiler.is_compiling():
        return getattr(_VALUES, _traced_build_key(build, *args, **kwargs))
    return build(*args, **kwargs)


# -- score terms ----------------------------------------------------------------------------------
def _bias_parts(bias):
    """``(spec, tensors)`` of a score term under tracing, or None when it cannot be carried by the op."""
    if bias is None:
        return None, []
    spec = getattr(bias, "compile_spec", None)
    if spec is not None:
        spec, tensors = spec()
        return spec, list(tensors)
    from foveal.bias import bias_parameters

    if bias_parameters(bias):
        return None
    if isinstance(bias, types.FunctionType) and bias.__code__.co_freevars:
        return None  # a closure: what it captured (perhaps a tensor of this very graph) cannot be a constant
    return (_Identity, bias), []


class _Identity:
    """Spec head of a score term passed as it is (a plain function, a term without tensors to train)."""

    @staticmethod
    def from_spec(rest, tensors):
        return rest[0]


def _bias_from(bias_key: str, tensors):
    if not bias_key:
        return None
    spec = value_of(bias_key)
    return spec[0].from_spec(spec[1:], list(tensors))


# -- the op ---------------------------------------------------------------------------------------
def _eager(q, k, v, key_padding_mask, sink_logits, bias_tensors, pattern_key, bias_key, scale, softcap, backend,
           return_lse):
    from foveal.functional import attend

    kwargs = {}
    if sink_logits is not None:
        kwargs["sink_logits"] = sink_logits
    return attend(q, k, v, value_of(pattern_key), bias=_bias_from(bias_key, bias_tensors), scale=scale,
                  key_padding_mask=key_padding_mask, softcap=softcap, backend=backend, return_lse=return_lse, **kwargs)


_AUTOGRAD_KEYS = tuple(getattr(torch._C.DispatchKey, name) for name in (
    "AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "AutogradCPU", "AutogradCUDA",
) if hasattr(torch._C.DispatchKey, name))


class _autograd_on:
    """Grad mode on, and autograd's dispatch keys back on inside a custom op's implementation (which runs below
    autograd: without this, the recomputed forward would record no graph and the score term's own backward, which
    differentiates it again, would see none)."""

    def __enter__(self):
        exclude = torch._C._dispatch_tls_local_exclude_set()
        for key in _AUTOGRAD_KEYS:
            if exclude.has(key):
                exclude = exclude.remove(key)
        self._keys = torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
        self._grad = torch.enable_grad()
        self._keys.__enter__()
        self._grad.__enter__()

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        self._keys.__exit__(*exc)


@torch.library.custom_op("foveal::attend", mutates_args=())
def _attend_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
    sink_logits: Optional[torch.Tensor], bias_tensors: list[torch.Tensor], pattern_key: str, bias_key: str,
    scale: float, softcap: Optional[float], backend: str, return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():  # the graph is the op's: the kernels need not keep anything for a backward
        result = _eager(q, k, v, key_padding_mask, sink_logits, bias_tensors, pattern_key, bias_key, scale, softcap,
                        backend, return_lse)
    if return_lse:
        out, lse = result
        return out.contiguous(), lse.contiguous()
    return result.contiguous(), _no_lse(q)


def _no_lse(q):
    from foveal.inputs import lse_dtype

    return q.new_empty(0, dtype=lse_dtype(q.dtype))


@_attend_op.register_fake
def _(q, k, v, key_padding_mask, sink_logits, bias_tensors, pattern_key, bias_key, scale, softcap, backend,
      return_lse):
    from foveal.inputs import lse_dtype

    b, h, n, _ = q.shape
    out = q.new_empty(b, h, n, v.shape[-1])
    lse = q.new_empty(b, h, n, dtype=lse_dtype(q.dtype)) if return_lse else _no_lse(q)
    return out, lse


@torch.library.custom_op("foveal::attend_backward", mutates_args=())
def _attend_backward_op(
    grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], sink_logits: Optional[torch.Tensor], bias_tensors: list[torch.Tensor],
    pattern_key: str, bias_key: str, scale: float, softcap: Optional[float], backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Gradients of ``foveal::attend`` for q, k, v, sink_logits (empty when None) and the score term's tensors,
    by recomputing the eager forward under ``enable_grad`` (one extra forward pass)."""
    with _autograd_on():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        sinks = None if sink_logits is None else sink_logits.detach().requires_grad_(True)
        terms = [t.detach().requires_grad_(t.is_floating_point()) for t in bias_tensors]
        need_lse = grad_lse is not None
        result = _eager(*leaves, key_padding_mask, sinks, terms, pattern_key, bias_key, scale, softcap, backend,
                        need_lse)
        outputs, grads = ([result[0], result[1]], [grad_out, grad_lse]) if need_lse else ([result], [grad_out])
        inputs = leaves + ([sinks] if sinks is not None else []) + [t for t in terms if t.requires_grad]
        got = torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
    got = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, got)]
    dq, dk, dv = got[:3]
    rest = iter(got[3:])
    dsinks = next(rest) if sinks is not None else q.new_empty(0)
    dterms = [next(rest) if t.requires_grad else torch.zeros_like(t) for t in terms]
    return dq, dk, dv, dsinks, dterms


@_attend_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, key_padding_mask, sink_logits, bias_tensors, pattern_key, bias_key, scale,
      softcap, backend):
    dsinks = q.new_empty(0) if sink_logits is None else torch.empty_like(sink_logits)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks,
            [torch.empty_like(t) for t in bias_tensors])


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, sink_logits, bias_tensors, pattern_key, bias_key, scale, softcap, backend, \
        return_lse = inputs
    ctx.save_for_backward(q, k, v, key_padding_mask, sink_logits, *bias_tensors)
    ctx.constants = (pattern_key, bias_key, scale, softcap, backend, return_lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, key_padding_mask, sink_logits, *bias_tensors = ctx.saved_tensors
    pattern_key, bias_key, scale, softcap, backend, return_lse = ctx.constants
    dq, dk, dv, dsinks, dterms = _attend_backward_op(
        grad_out, grad_lse if return_lse else None, q, k, v, key_padding_mask, sink_logits, bias_tensors,
        pattern_key, bias_key, scale, softcap, backend,
    )
    return (dq, dk, dv, None, dsinks if sink_logits is not None else None, list(dterms),
            None, None, None, None, None, None)


_attend_op.register_autograd(_backward, setup_context=_setup_context)


def attend_outside_graph(q, k, v, pattern, *, sink_logits=None, **kwargs):
    """``attend`` run eagerly outside the compiled graph (a graph break): for what the op cannot carry."""
    from foveal.functional import attend

    extra = {} if sink_logits is None else {"sink_logits": sink_logits}
    return attend(q, k, v, pattern, **kwargs, **extra)


_OUTSIDE = ("foveal.attend runs eagerly outside the graph: its pattern (one built inside the compiled code, or a "
            "BlockSelection) or its score term (a closure, or tensors that require grad and no compile_spec()) "
            "cannot be passed to the custom op foveal::attend; build patterns outside the compiled code or "
            "through foveal.custom_op.built(cls, *args)")
try:
    attend_outside_graph = torch._dynamo.disable(attend_outside_graph, reason=_OUTSIDE)
except TypeError:  # torch < 2.8: no reason
    attend_outside_graph = torch._dynamo.disable(attend_outside_graph)


def attend_traced(q, k, v, pattern, *, bias, scale, key_padding_mask, softcap, sink_logits, backend, return_lse):
    """``attend`` under ``torch.compile``: arguments already checked by shape (``foveal.functional``)."""
    from foveal.patterns.dynamic import BlockSelection

    parts = None if isinstance(pattern, BlockSelection) else _bias_parts(bias)
    if parts is None:
        return attend_outside_graph(q, k, v, pattern, bias=bias, scale=scale, key_padding_mask=key_padding_mask,
                                    softcap=softcap, sink_logits=sink_logits, backend=backend, return_lse=return_lse)
    spec, tensors = parts
    pattern_key = _traced_key(pattern)
    bias_key = "" if spec is None else _traced_key(spec)
    out, lse = _attend_op(q, k, v, key_padding_mask, sink_logits, tensors, pattern_key, bias_key, scale, softcap,
                          backend, return_lse)
    return (out, lse) if return_lse else out
