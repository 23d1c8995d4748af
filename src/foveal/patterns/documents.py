"""Masks for packed sequences (the LongCA-bench family): documents, prefix-LM, shared question, causal blockwise.

``lengths`` lists the documents packed back to back; token ``i`` belongs to document
``doc(i)``. Every pattern here is a single per-axis progression on the flat index,
so its layout is analytic.
"""

from __future__ import annotations

from typing import Sequence

import torch

from foveal._checks import positive_int
from foveal.patterns.algebra import Union
from foveal.patterns.global_ import Causal, FlatPattern, _like

__all__ = ["Document", "PrefixLM", "SharedQuestion", "CausalBlockwise"]


def _lengths(value) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise TypeError(f"lengths must be a non-empty sequence of positive ints, got {value!r}")
    return tuple(positive_int(f"lengths[{i}]", v) for i, v in enumerate(value))


class _Packed(FlatPattern):
    """A flat pattern over documents packed back to back."""

    def _init_docs(self, lengths):
        lengths = _lengths(lengths)
        n = sum(lengths)
        self._init_shape(n)
        starts = torch.tensor((0,) + lengths[:-1]).cumsum(0)
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        self._set(lengths=lengths, _doc=doc, _start=starts[doc], _end=(starts + torch.tensor(lengths))[doc])

    def _doc_of(self, x):
        return self._doc.to(x.device)[x]

    def _start_of(self, x):
        return self._start.to(x.device)[x]

    def _end_of(self, x):
        """One past the last token of x's document."""
        return self._end.to(x.device)[x]


class Document(_Packed):
    """``doc(i) == doc(j)`` and ``inner`` within the document, on positions local to it.

    ``inner`` builds a 1-D pattern from a length (a class such as ``Causal`` or
    ``Full``, or e.g. ``lambda n: SlidingWindow(n, 128)``); it is applied to
    ``(i − start, j − start)``. ``Document(lengths, Causal)`` is LongCA-bench's causal
    document mask, ``Document(lengths, Full)`` its full document mask.
    """

    def __init__(self, lengths, inner=Causal):
        self._init_docs(lengths)
        if not callable(inner):
            raise TypeError(f"inner must build a pattern from a length (e.g. Causal), got {inner!r}")
        made = inner(max(self.lengths))
        if not isinstance(made, FlatPattern):
            raise TypeError(
                f"inner must build a 1-D pattern on the flat index (Causal, Full, SlidingWindow, ...), got {made!r}"
            )
        self._set(inner=inner, _inner=made)

    def progression(self, axis, x):
        start, end = self._start_of(x), self._end_of(x)
        first, step, count = self._inner.progression(0, x - start)
        # the inner pattern was built for the longest document: clip to this one
        count = torch.minimum(count, (end - start - 1 - first) // step + 1).clamp(min=0)
        return first + start, step, count

    def _key(self):
        return (self.lengths, self.inner)

    def __repr__(self):
        return f"Document(lengths={list(self.lengths)}, inner={getattr(self.inner, '__name__', repr(self.inner))})"


class PrefixLM(FlatPattern):
    """Prefix-LM: ``j <= i`` or ``j < prefix`` (the prefix is seen bidirectionally).

    ``0 <= prefix <= n``: ``prefix = 0`` is ``Causal``, ``prefix = n`` is ``Full`` (as
    attention-gym's ``generate_prefix_lm_mask``).
    """

    def __init__(self, n, prefix: int):
        self._init_shape(n)
        prefix = positive_int("prefix", prefix, minimum=0)
        if prefix > self.n:
            raise ValueError(f"prefix must be <= the number of tokens {self.n}, got {prefix}")
        self._set(prefix=prefix)

    def progression(self, axis, x):
        return _like(x, 0), _like(x, 1), torch.clamp(x, min=self.prefix - 1) + 1

    def _key(self):
        return (self.shape, self.prefix)

    def __repr__(self):
        return f"PrefixLM({self._n_repr()}, prefix={self.prefix})"


class CausalBlockwise(_Packed):
    """Causal within each document; the last document also sees every earlier one (LongCA-bench)."""

    def __init__(self, lengths):
        self._init_docs(lengths)

    def progression(self, axis, x):
        last = self._doc_of(x) == len(self.lengths) - 1
        first = torch.where(last, 0, self._start_of(x))
        return first, _like(x, 1), x - first + 1

    def _key(self):
        return (self.lengths,)

    def __repr__(self):
        return f"CausalBlockwise(lengths={list(self.lengths)})"


class _QuestionPrefix(FlatPattern):
    """Keys ``j <= min(i, question − 1)``: causal inside the question, the whole question after it."""

    def __init__(self, n, question: int):
        self._init_shape(n)
        self._set(question=question)

    def progression(self, axis, x):
        return _like(x, 0), _like(x, 1), torch.clamp(x, max=self.question - 1) + 1

    def _key(self):
        return (self.shape, self.question)

    def __repr__(self):
        return f"_QuestionPrefix({self._n_repr()}, question={self.question})"


class SharedQuestion(Union):
    """LongCA-bench ``share_question``: causal; the first document is a question every later document sees.

    Document ``d > 0`` sees the whole question and itself causally; the question sees
    itself causally.
    """

    def __init__(self, lengths):
        lengths = _lengths(lengths)
        n = sum(lengths)
        super().__init__(Document(lengths, Causal), _QuestionPrefix(n, lengths[0]))
        self._set(lengths=lengths)

    def _key(self):
        return (self.lengths,)

    def __repr__(self):
        return f"SharedQuestion(lengths={list(self.lengths)})"
