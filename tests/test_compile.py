"""``torch.compile(model, fullgraph=True)`` on models built from foveal: one graph, eager's numbers, one recompile.

``attend`` is one opaque custom op under compile (``foveal.custom_op``). Here: tiny NAT-, Swin- and MaxViT-style
backbones (``foveal.models.backbone``) and a sparsified tiny random Llama compile with ``fullgraph=True`` (a graph
break is an error), give eager's forward and backward in float64, and a second batch size costs at most one
recompile (the batch becomes symbolic) and a third none. ``aot_eager`` runs AOTAutograd's forward and backward
graphs without inductor's code generation (seconds instead of minutes on a CPU); one test uses inductor.
"""

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

from foveal import attend
from foveal.bias import ALiBi, RelativePositionBias
from foveal.custom_op import key_of, value_of
from foveal.models.backbone import Backbone
from foveal.patterns import Neighborhood, SlidingWindow

import test_nn_api as nn_api  # its EXAMPLES: one small call of every foveal.nn module

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(loss, model, *inputs):
    return torch.autograd.grad(loss, [*inputs, *model.parameters()])


def _check_batches(model, make_input, run, batches=(2, 3, 4), backend="aot_eager", tol=TOL):
    """Compile ``run`` with fullgraph; per batch size: forward (and, for the first two, backward) equal eager;
    the second size recompiles at most once, the third not at all."""
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(run, backend=counter, fullgraph=True)
    frames = []
    for i, b in enumerate(batches):
        x = make_input(b)
        got, want = compiled(x), run(x)
        torch.testing.assert_close(got, want, **tol)
        if i < 2:
            inputs = [x] if x.is_floating_point() else []
            g_got = _grads(got.square().sum(), model, *inputs)
            g_want = _grads(want.square().sum(), model, *inputs)
            for a, w in zip(g_got, g_want):
                torch.testing.assert_close(a, w, **tol)
        frames.append(counter.frame_count)
    assert frames[0] == 1, frames
    assert frames[1] <= 2, f"a second batch size recompiled more than once: {frames}"
    assert frames[2] == frames[1], f"a third batch size recompiled: {frames}"


@pytest.mark.parametrize("mixer", ["neighborhood", "window", "maxvit"])
def test_backbone_compiles_to_one_graph_equal_to_eager(mixer):
    # NAT (NeighborhoodAttention2D, learned rpb), Swin (WindowAttention regular + shifted, Swin's table) and MaxViT
    # (MultiAxisAttention block + grid, timm's table): 16x16 images, two stages (8x8 and 4x4 grids)
    model = Backbone(mixer, img_size=16, dims=(8, 16), depths=(1, 1), heads=(2, 2)).double()
    for p in model.parameters():  # the tables start at zero in some modules: make every term matter
        torch.nn.init.normal_(p, std=0.3)
    _check_batches(model, lambda b: torch.randn(b, 3, 16, 16, dtype=torch.float64, requires_grad=True),
                   lambda x: model(x)[-1])


def _tiny_llama(transformers):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attn_implementation="sdpa")).double()


def test_sparsified_llama_compiles_to_one_graph_equal_to_eager():
    # under compile transformers makes the mask function (and_masks(causal, packed ids) of the traced positions) in
    # the traced forward, whose closure cells dynamo cannot read: each layer derives the mask and probes it at run time
    transformers = pytest.importorskip("transformers")
    from foveal import recipes
    from foveal.integrations.transformers import restore, sparsify

    model = _tiny_llama(transformers)
    sparsify(model, recipes.streaming_llm(sinks=2, window=4))  # 12 tokens: the window and sinks leave keys out
    try:
        _check_batches(model, lambda b: torch.randint(3, 97, (b, 12)),
                       lambda ids: model(input_ids=ids, use_cache=False).logits)
    finally:
        restore(model)


@pytest.mark.parametrize("piece", ["chunked", "or_masks", "or_masks_padded"])
def test_a_foreign_mask_piece_is_still_refused_under_compile(piece, monkeypatch):
    # transformers' causal mask function replaced by one with a piece foveal cannot honour (chunked attention; an
    # or_masks overlay letting each token see the next, as image-token overlays do): eager refuses it by name; under
    # fullgraph compile the mask function is made in the traced code, wrapped in and_masks with the traced packed ids,
    # so the run-time probe refuses it, or, with a 2D attention_mask (no packed ids), its name at trace time
    transformers = pytest.importorskip("transformers")
    from transformers import masking_utils
    from foveal import recipes
    from foveal.integrations.transformers import restore, sparsify

    if piece == "chunked":
        fn = masking_utils.chunked_causal_mask_function(4, torch.zeros(8, dtype=torch.long))
    else:
        fn = masking_utils.or_masks(masking_utils.causal_mask_function, lambda b, h, q, kv: kv == q + 1)
    model = _tiny_llama(transformers)
    sparsify(model, recipes.streaming_llm(sinks=2, window=4))
    monkeypatch.setattr(masking_utils, "causal_mask_function", fn)
    ids = torch.randint(3, 97, (2, 12))
    kwargs = dict(attention_mask=torch.ones_like(ids)) if piece == "or_masks_padded" else {}
    try:
        with pytest.raises(ValueError, match="chunked_overlay|or_masks.<locals>.or_mask"):
            model(input_ids=ids, use_cache=False, **kwargs)
        compiled = torch.compile(lambda x: model(input_ids=x, use_cache=False, **kwargs).logits, backend="aot_eager",
                                 fullgraph=True)
        said = "or_masks.<locals>.or_mask" if piece == "or_masks_padded" else "is not the causal mask with window None"
        with pytest.raises(Exception, match=said):
            compiled(ids)
    finally:
        restore(model)


def test_inductor_compiles_a_neighborhood_block():
    # the default backend: inductor generates code around the opaque op (float32: its kernels' own tolerance)
    from foveal.nn import NeighborhoodAttention2D

    model = NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True)
    torch.nn.init.normal_(model.rpb, std=0.3)
    _check_batches(model, lambda b: torch.randn(b, 5, 5, 8, requires_grad=True), model, backend="inductor",
                   tol=dict(rtol=1e-5, atol=1e-5))


def test_every_argument_of_attend_reaches_the_op_with_its_gradient():
    pattern = Neighborhood((4, 4), 3)
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True)
    table = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    alibi = ALiBi(2)

    def run(q, k, v, pad):
        out, lse = attend(q, k, v, pattern, sink_logits=sinks, key_padding_mask=pad, softcap=5.0, scale=0.4,
                          bias=RelativePositionBias((4, 4), (2, 2), table), return_lse=True)
        out2 = attend(q, k, v, pattern, bias=alibi, backend="reference")
        return out.square().sum() + lse[lse.isfinite()].sum() + out2.sum()

    q, k, v = (torch.randn(2, 2, 16, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[0, 3] = pad[1, :5] = True
    got = torch.compile(run, backend="aot_eager", fullgraph=True)(q, k, v, pad)
    want = run(q, k, v, pad)
    torch.testing.assert_close(got, want, **TOL)
    for a, w in zip(torch.autograd.grad(got, (q, k, v, sinks, table)), torch.autograd.grad(want, (q, k, v, sinks, table))):
        torch.testing.assert_close(a, w, **TOL)


def test_the_op_passes_torch_library_opcheck():
    # schema, fake implementation (shapes, dtypes, strides), autograd registration, dynamic shapes
    from foveal.custom_op import _attend_op

    pattern = SlidingWindow(10, left=3)
    q, k, v = (torch.randn(2, 4, 10, 8, requires_grad=True) for _ in range(3))
    sinks = torch.randn(4, requires_grad=True)
    table = torch.randn(4, 19, requires_grad=True)
    spec, tensors = RelativePositionBias((10,), (9,), table).compile_spec()
    for args in [
        (q, k[:, :2], v[:, :2], None, None, [], key_of(pattern), "", 0.3, None, "auto", False),
        (q, k, v, torch.rand(2, 10) < 0.2, sinks, tensors, key_of(pattern), key_of(spec), 0.3, 2.0, "cpu", True),
    ]:
        torch.library.opcheck(_attend_op, args)


def test_keys_are_one_per_value():
    a, b = Neighborhood((6, 6), 3), Neighborhood((6, 6), 3)
    assert a is not b and key_of(a) == key_of(b) and value_of(key_of(b)) is value_of(key_of(a))
    assert key_of(Neighborhood((6, 6), 5)) != key_of(a)
    with pytest.raises(RuntimeError, match="lost the value of key"):
        value_of("Neighborhood_0")


@pytest.mark.parametrize("kind", ["parameters", "closure", "pattern"])
def test_what_the_op_cannot_carry_still_compiles_with_a_graph_break(kind):
    # a score term with a parameter and no compile_spec(), a closure made in the traced code, or a pattern built
    # in the traced code: attend runs eagerly outside the graph (as before compile support), so fullgraph refuses
    # it by name and a plain compile gives eager's numbers and gradients
    class Slope:
        def __init__(self):
            self.w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

        def __call__(self, h, q_idx, kv_idx):
            return -self.w * (q_idx - kv_idx).abs()

        def parameters(self):
            return [self.w]

    slope, pattern = Slope(), SlidingWindow(12, left=4)
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def run(q, k, v):
        if kind == "closure":
            w = q.mean()

            def term(h, q_idx, kv_idx):
                return -w * (q_idx - kv_idx).abs()
        else:
            term = slope if kind == "parameters" else None
        inside = SlidingWindow(q.shape[2], left=4) if kind == "pattern" else pattern
        return attend(q * 2, k, v, inside, bias=term).sum()

    with pytest.raises(Exception, match="foveal.attend runs eagerly outside the graph"):
        torch.compile(run, backend="aot_eager", fullgraph=True)(q, k, v)
    torch._dynamo.reset()
    got, want = torch.compile(run, backend="aot_eager")(q, k, v), run(q, k, v)
    torch.testing.assert_close(got, want, **TOL)
    leaves = (q, slope.w) if kind == "parameters" else (q,)
    for a, w in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(a, w, **TOL)


@pytest.mark.parametrize("name", nn_api.NAMES)
def test_every_nn_module_traces_without_a_graph_break(name):
    # backend="eager": dynamo's tracing only (a graph break is an error under fullgraph), no AOT compile
    module = nn_api._build(name).eval()
    args, kwargs = nn_api.EXAMPLES[name][1]()
    got = torch.compile(module, backend="eager", fullgraph=True)(*args, **kwargs)
    torch.testing.assert_close(got, module(*args, **kwargs))


def test_sparsified_llama_with_padding_compiles_equal_to_eager():
    # a 2D attention_mask (left padding, a hole): foveal reads the padding's values, so the graph breaks there
    # (no fullgraph), and the compiled model gives eager's logits
    transformers = pytest.importorskip("transformers")
    from foveal import recipes
    from foveal.integrations.transformers import restore, sparsify

    model = sparsify(_tiny_llama(transformers), recipes.streaming_llm(sinks=2, window=4))
    ids = torch.randint(3, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = mask[1, 5] = 0
    try:
        run = lambda x: model(input_ids=x, attention_mask=mask, use_cache=False).logits  # noqa: E731
        torch.testing.assert_close(torch.compile(run, backend="aot_eager")(ids), run(ids), **TOL)
    finally:
        restore(model)


def test_packed_rows_under_fullgraph_compile_are_refused_at_run_time():
    # position_ids restarting in a row (packed sequences): eager attends each sequence on its own; under fullgraph
    # foveal cannot branch on their values and attends one sequence per row, so the run-time checks refuse them
    transformers = pytest.importorskip("transformers")
    from foveal import recipes
    from foveal.integrations.transformers import restore, sparsify

    model = sparsify(_tiny_llama(transformers), recipes.streaming_llm(sinks=2, window=4))
    ids, pos = torch.randint(3, 97, (2, 12)), torch.arange(6).repeat(2)[None].expand(2, -1)
    try:
        model(input_ids=ids, position_ids=pos, use_cache=False)  # eager: packed sequences, honoured
        compiled = torch.compile(lambda x, p: model(input_ids=x, position_ids=p, use_cache=False).logits,
                                 backend="aot_eager", fullgraph=True)
        compiled(ids, torch.arange(12)[None].expand(2, -1))  # one sequence per row: runs
        with pytest.raises(Exception, match="foveal: "):
            compiled(ids, pos)
    finally:
        restore(model)


def test_sparsified_mistral_keeps_its_native_window_under_fullgraph():
    # every Mistral layer slides (6 tokens): under compile the layer derives its window from the config and the
    # run-time probe checks it against transformers' traced sliding-window mask function
    transformers = pytest.importorskip("transformers")
    from foveal import recipes
    from foveal.integrations.transformers import restore, sparsify

    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=6, pad_token_id=0,
        attn_implementation="sdpa")).double()
    sparsify(model, recipes.streaming_llm(sinks=2, window=4), layers=[0, 1])
    ids = torch.randint(3, 97, (2, 12))
    try:
        run = lambda x: model(input_ids=x, use_cache=False).logits  # noqa: E731
        torch.testing.assert_close(torch.compile(run, backend="aot_eager", fullgraph=True)(ids), run(ids), **TOL)
    finally:
        restore(model)
