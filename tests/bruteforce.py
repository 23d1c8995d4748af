"""Independent brute-force definitions of every built-in pattern, written from the spec.

Plain Python over coordinates (no foveal code), deliberately in a different form from
the library's (sets of keys per query, window *starts* instead of clamped centres), so
that a shared mistake is unlikely. Each returns a dense (n, n) bool tensor.
"""

import itertools
import math

import torch


def _dense(n, allowed):
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in allowed(i):
            m[i, j] = True
    return m


def full(n):
    return torch.ones(n, n, dtype=torch.bool)


def causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def sliding_window(n, left, right, dilation):
    return _dense(n, lambda i: [j for j in range(n) if i - left <= j <= i + right and (i - j) % dilation == 0])


def global_tokens(n, count):
    return _dense(n, lambda i: range(n) if i < count else range(count))


def sinks(n, count):
    return _dense(n, lambda i: range(min(count, i + 1)))


def strided(n, stride):
    return _dense(n, lambda i: [j for j in range(n) if (i - j) % stride == 0])


def _na_axis_keys(x, length, k, d, s, causal):
    """Keys of coordinate x on one axis, NATTEN's rule, via the window start."""
    g = x % d
    xp = x // d
    sub_len = len(range(g, length, d))
    if causal:
        leader = min((xp // s) * s + s - 1, sub_len - 1)
        keys = [yp for yp in range(sub_len) if yp <= xp and leader - yp < k]
    else:
        leader = min((xp // s) * s + s // 2, sub_len - 1)
        start = max(0, min(leader - k // 2, sub_len - k))
        keys = list(range(start, start + k))
    return [yp * d + g for yp in keys]


def _product(shape, axis_keys):
    """Dense mask of a per-axis rule: j allowed iff every coordinate of j is in its axis's key list."""
    n = math.prod(shape)
    coords = list(itertools.product(*[range(s) for s in shape]))
    index = {c: i for i, c in enumerate(coords)}
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, c in enumerate(coords):
        per_axis = [axis_keys(a, c[a]) for a in range(len(shape))]
        for key in itertools.product(*per_axis):
            m[i, index[key]] = True
    return m


def neighborhood(shape, k, d, s, causal):
    return _product(shape, lambda a, x: _na_axis_keys(x, shape[a], k[a], d[a], s[a], causal[a]))


def window(shape, w):
    return _product(shape, lambda a, x: [y for y in range(shape[a]) if y // w[a] == x // w[a]])


def grid(shape, size):
    return _product(shape, lambda a, x: [y for y in range(shape[a]) if y % (shape[a] // size[a]) == x % (shape[a] // size[a])])


def halo(shape, block, h):
    def keys(a, x):
        b = x // block[a]
        return [y for y in range(shape[a]) if b * block[a] - h[a] <= y <= (b + 1) * block[a] - 1 + h[a]]

    return _product(shape, keys)


def _doc_ids(lengths):
    return [d for d, length in enumerate(lengths) for _ in range(length)]


def dilated(n, pairs):
    def allowed(i):
        keys = set()
        for w, r in pairs:
            keys |= {j for j in range(n) if i // w == j // w and (i % w) % r == (j % w) % r}
        return keys

    return _dense(n, allowed)


def power(n, block, window, sinks):
    def ok(i, j):
        d = i // block - j // block
        return j <= i and (d <= window or j // block < sinks or (d > 0 and d & (d - 1) == 0))

    return _dense(n, lambda i: [j for j in range(n) if ok(i, j)])


def document(lengths, inner):
    """``inner(local_i, local_j, length) -> bool`` within each document."""
    doc = _doc_ids(lengths)
    start = {d: doc.index(d) for d in set(doc)}
    n = len(doc)
    return _dense(n, lambda i: [j for j in range(n) if doc[i] == doc[j]
                                and inner(i - start[doc[i]], j - start[doc[j]], lengths[doc[i]])])


def prefix_lm(n, prefix):
    return _dense(n, lambda i: [j for j in range(n) if j <= i or j < prefix])


def shared_question(lengths):
    doc = _doc_ids(lengths)
    return _dense(len(doc), lambda i: [j for j in range(i + 1) if doc[j] == doc[i] or doc[j] == 0])


def causal_blockwise(lengths):
    doc, last = _doc_ids(lengths), len(lengths) - 1
    return _dense(len(doc), lambda i: [j for j in range(i + 1) if doc[j] == doc[i] or doc[i] == last])
