"""GraphLocalGlobalAttention against a dense implementation with an explicit adjacency mask."""

import random

import pytest
import torch
from torch.nn import functional as F

from foveal.nn.graph import GraphLocalGlobalAttention


def _sample(rng, n, m, s):
    """(n, s) sampled neighbour ids into m nodes, no repeats, not the node itself (when m == n), -1 padded."""
    rows = []
    for i in range(n):
        pool = [j for j in range(m) if not (m == n and j == i)]
        ids = rng.sample(pool, rng.randint(0, min(s, len(pool))))
        rows.append(ids + [-1] * (s - len(ids)))
    return torch.tensor(rows, dtype=torch.long).reshape(n, s)


def _masked_attention(q, k, v, mask, bias=None):
    """(h, n, d) x (h, m, d) with an (n, m) bool mask; rows with no key give zeros."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def dense_reference(m, x, neighbors, context=None):
    """LargeGT written densely: adjacency mask over all nodes (+ self), softmax over the codebook with log n."""
    n, c = x.shape
    h = m.num_heads
    keys = x if context is None else torch.cat([context, x])  # node i's own token: row i, or row M + i
    own = 0 if context is None else context.shape[0]
    adj = torch.zeros(n, keys.shape[0], dtype=torch.bool)
    for i in range(n):
        for j in neighbors[i].tolist():
            if j >= 0:
                adj[i, j] = True
        if m.include_self:
            adj[i, own + i] = True

    def heads(t):
        return t.reshape(t.shape[0], h, c // h).transpose(0, 1)

    wq, wk, wv = m.qkv.weight.chunk(3)
    bq, bk, bv = m.qkv.bias.chunk(3) if m.qkv.bias is not None else (None,) * 3
    local = _masked_attention(heads(F.linear(x, wq, bq)), heads(F.linear(keys, wk, bk)),
                              heads(F.linear(keys, wv, bv)), adj)
    qg = heads(m.q_global(x))
    kg, vg = (heads(t) for t in m.kv_global(m.codebook.to(x.dtype, copy=True)).chunk(2, dim=-1))
    bias = m.cluster_size.float().log().clone() if m.count_bias else None
    glob = _masked_attention(qg, kg, vg, torch.ones(n, m.num_centroids, dtype=torch.bool), bias)
    cat = torch.cat([local.transpose(0, 1).reshape(n, c), glob.transpose(0, 1).reshape(n, c)], -1)
    return m.proj(cat)


def _module(rng, **kw):
    heads = rng.choice([1, 2, 4])
    dim = heads * rng.choice([4, 8])
    m = GraphLocalGlobalAttention(dim, heads, num_centroids=rng.randint(2, 9), **kw)
    m.cluster_size.uniform_(0.1, 5.0)  # a non-uniform log n term
    return m


@pytest.mark.parametrize("seed", range(5))
def test_matches_dense_adjacency_forward_and_backward(seed):
    rng = random.Random(seed)
    m = _module(rng, include_self=seed != 1, count_bias=seed != 2, qkv_bias=seed != 3).eval()
    n = rng.randint(1, 30)
    use_context = seed >= 3
    ctx = torch.randn(rng.randint(1, 25), m.dim, requires_grad=True) if use_context else None
    x = torch.randn(n, m.dim, requires_grad=True)
    nb = _sample(rng, n, ctx.shape[0] if use_context else n, rng.randint(1, 6))
    out, want = m(x, nb, ctx), dense_reference(m, x, nb, ctx)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    tensors = [x] + ([ctx] if use_context else []) + list(m.parameters())
    for a, b in zip(torch.autograd.grad(out, tensors, g), torch.autograd.grad(want, tensors, g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def kmeans_step_reference(codebook, size, ema_sum, z, decay, eps=1e-5):
    """One EMA k-means step by loops: nearest centroid, counts and sums per cluster, Laplace smoothing."""
    k = codebook.shape[0]
    counts, sums = [0.0] * k, [torch.zeros(z.shape[1]) for _ in range(k)]
    for row in z:
        j = min(range(k), key=lambda c: float(((row - codebook[c]) ** 2).sum()))
        counts[j] += 1
        sums[j] = sums[j] + row
    size = decay * size + (1 - decay) * torch.tensor(counts)
    total = size.sum()
    size = (size + eps) / (total + k * eps) * total
    ema_sum = decay * ema_sum + (1 - decay) * torch.stack(sums)
    return ema_sum / size[:, None], size, ema_sum


def test_training_forward_uses_old_codebook_then_takes_an_ema_kmeans_step():
    rng = random.Random(7)
    m = _module(rng, decay=0.9)
    x = torch.randn(20, m.dim) * 2
    nb = _sample(rng, 20, 20, 3)
    before = {k: b.clone() for k, b in m.named_buffers()}
    want_out = dense_reference(m, x, nb)
    want = kmeans_step_reference(before["codebook"], before["cluster_size"], before["ema_sum"], x, 0.9)
    out = m.train()(x, nb)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    params = list(m.parameters())
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want_out, params, g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for name, w in zip(("codebook", "cluster_size", "ema_sum"), want):
        torch.testing.assert_close(getattr(m, name), w, atol=1e-5, rtol=1e-5)
    m.eval()(x, nb)
    torch.testing.assert_close(m.codebook, want[0])  # eval leaves the codebook alone


def test_codebook_converges_to_cluster_means():
    torch.manual_seed(0)
    centres = torch.tensor([[5.0, 0.0, 0.0, 0.0], [-5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
    m = GraphLocalGlobalAttention(4, 1, num_centroids=3, decay=0.5)
    m.codebook.copy_(centres + 0.5)
    m.ema_sum.copy_(m.codebook)
    for _ in range(30):
        z = centres.repeat_interleave(10, 0) + 0.1 * torch.randn(30, 4)
        m.update_codebook(z)
    torch.testing.assert_close(m.codebook, centres, atol=0.1, rtol=0)
    torch.testing.assert_close(m.cluster_size, torch.full((3,), 10.0), atol=0.1, rtol=0)


def test_node_without_neighbours_and_without_self_gets_only_the_global_path():
    m = GraphLocalGlobalAttention(8, 2, num_centroids=4, include_self=False).eval()
    x = torch.randn(3, 8, requires_grad=True)
    nb = torch.tensor([[-1, -1], [0, -1], [2, 0]])
    out = m(x, nb)
    assert torch.isfinite(out).all()
    assert m.local_path(x, nb)[0].abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bfloat16_loosely_matches_float32():
    rng = random.Random(11)
    mb = _module(rng).eval().to(torch.bfloat16)
    m = GraphLocalGlobalAttention(mb.dim, mb.num_heads, num_centroids=mb.num_centroids).eval()
    m.load_state_dict({k: v.float() for k, v in mb.state_dict().items()})
    xb = torch.randn(16, mb.dim, dtype=torch.bfloat16, requires_grad=True)
    xf = xb.detach().float().requires_grad_()
    nb = _sample(rng, 16, 16, 4)
    out, want = mb(xb, nb), dense_reference(m, xf, nb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=0.05, rtol=0.05)
    g = torch.randn(out.shape)
    (out.float() * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(xb.grad.float(), xf.grad, atol=0.05, rtol=0.05)


def test_pattern_and_torch_compile_eager_smoke():
    m = GraphLocalGlobalAttention(8, 2, num_centroids=5).eval()
    assert (m.pattern(7).n_q, m.pattern(7).n_kv) == (7, 5)
    x, nb = torch.randn(7, 8), _sample(random.Random(0), 7, 7, 3)
    torch.testing.assert_close(torch.compile(m, backend="eager")(x, nb), m(x, nb))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="dim must be divisible by num_heads, got 10 and 4"):
        GraphLocalGlobalAttention(10, 4)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\), got 1.5"):
        GraphLocalGlobalAttention(8, 2, decay=1.5)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of .* got 'fast'"):
        GraphLocalGlobalAttention(8, 2, backend="fast")
    m = GraphLocalGlobalAttention(8, 2)
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="neighbors must be a torch.long tensor of node indices, got torch.int32"):
        m(x, torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"neighbors must have shape \(4, S\): S sampled ids per node, got \(3, 2\)"):
        m(x, torch.zeros(3, 2, dtype=torch.long))
    msg = r"neighbors must hold ids in \[0, 4\) or -1 \(no neighbour\), got values in \[-2, 4\]"
    with pytest.raises(ValueError, match=msg):
        m(x, torch.tensor([[0, 4], [-2, 1], [0, 0], [1, 1]]))
    with pytest.raises(ValueError, match="x has 6 channels but dim is 8"):
        m(torch.randn(4, 6), torch.zeros(4, 2, dtype=torch.long))


def test_graph_example_runs(capsys):
    from foveal.examples.graph import main

    result = main(["--nodes", "60", "--epochs", "2", "--sample", "4"])
    assert 0.0 <= result["accuracy"] <= 1.0
    assert "test accuracy" in capsys.readouterr().out
