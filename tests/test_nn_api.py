"""One naming and validation policy for every module ``foveal.nn`` exports (the README's modules section).

Constructors: ``(dim, num_heads, <the paper's own arguments>, qkv_bias, qk_scale, attn_drop,
proj_drop, drop_path, backend)``, the common tail in that order, as far as a module has
those arguments; names from the papers and timm; upstream names (``embed_dim``) only in
documented drop-ins (NATTEN's ``NeighborhoodAttention*D``, which keep NATTEN's positional
order and add foveal's arguments keyword-only). Every argument is checked at construction
(a bad ``backend``, ``qk_scale=0``, a str where a flag or a number is wanted) and a
non-tensor ``forward`` input is a ``TypeError``. Every module calls ``attend`` through
``foveal.nn._common.attend`` and keeps its patterns in one bounded cache.
"""

import ast
import inspect
import pathlib

import pytest
import torch

import foveal.nn as fnn
from foveal.nn import _common

TAIL = ("qkv_bias", "qk_scale", "attn_drop", "proj_drop", "drop_path", "backend")
#: names the policy replaces, and by what
FORBIDDEN = {
    "window": "window_size",
    "embed_dim": "dim (embed_dim only in documented drop-ins)",
    "dims": "dim / in_dims",
    "heads": "num_heads",
    "n_heads": "num_heads",
    "kernel": "kernel_size",
    "scale": "qk_scale",
    "dropout": "proj_drop",
    "drop": "proj_drop",
    "attn_dropout": "attn_drop",
}
#: documented drop-ins for another library: class -> (library, the upstream class's import path)
DROP_INS = {
    "NeighborhoodAttention1D": ("natten", "NeighborhoodAttention1D"),
    "NeighborhoodAttention2D": ("natten", "NeighborhoodAttention2D"),
    "NeighborhoodAttention3D": ("natten", "NeighborhoodAttention3D"),
}

MODULES = {
    name: obj
    for name in fnn.__all__
    if isinstance(obj := getattr(fnn, name), type) and issubclass(obj, torch.nn.Module)
}


def _maps(b, n):
    return [torch.softmax(torch.randn(b, 2, n, n), -1)]


#: name -> (constructor kwargs of a small instance, builder of a valid forward call (args, kwargs))
EXAMPLES = {
    "NeighborhoodAttention1D": (dict(embed_dim=8, num_heads=2, kernel_size=3),
                                lambda: ((torch.randn(2, 6, 8),), {})),
    "NeighborhoodAttention2D": (dict(embed_dim=8, num_heads=2, kernel_size=3),
                                lambda: ((torch.randn(2, 5, 5, 8),), {})),
    "NeighborhoodAttention3D": (dict(embed_dim=8, num_heads=2, kernel_size=3),
                                lambda: ((torch.randn(1, 4, 4, 4, 8),), {})),
    "WindowAttention": (dict(dim=8, num_heads=2, window_size=2, shift_size=1),
                        lambda: ((torch.randn(2, 4, 4, 8),), {})),
    "MultiAxisAttention": (dict(dim=8, num_heads=2, partition_size=2), lambda: ((torch.randn(2, 4, 4, 8),), {})),
    "MaxViTBlock": (dict(dim=8, num_heads=2, partition_size=2), lambda: ((torch.randn(2, 4, 4, 8),), {})),
    "MBConv": (dict(dim=8), lambda: ((torch.randn(2, 8, 4, 4),), {})),
    "HaloAttention": (dict(dim=8, num_heads=2, block_size=2, halo_size=1), lambda: ((torch.randn(2, 4, 4, 8),), {})),
    "ChannelAttention": (dict(dim=8, num_heads=2), lambda: ((torch.randn(2, 4, 4, 8),), {})),
    "DaViTBlock": (dict(dim=8, num_heads=2, window_size=2), lambda: ((torch.randn(2, 4, 4, 8),), {})),
    "SpatialBlock": (dict(dim=8, num_heads=2, window_size=2), lambda: ((torch.randn(2, 4, 4, 8),), {})),
    "ChannelBlock": (dict(dim=8, num_heads=2), lambda: ((torch.randn(2, 4, 4, 8),), {})),
    "ConvPosEnc": (dict(dim=8), lambda: ((torch.randn(2, 4, 4, 8),), {})),
    "FocalModulation": (dict(dim=8), lambda: ((torch.randn(2, 4, 4, 8),), {})),
    "EfficientLocalAttention": (dict(dim=8, num_groups=4), lambda: ((torch.randn(2, 4, 4, 8),), {})),
    "PositionAttention": (dict(dim=8), lambda: ((torch.randn(2, 4, 4, 8),), {})),
    "ChannelAffinityAttention": (dict(dim=8), lambda: ((torch.randn(2, 4, 4, 8),), {})),
    "GlobalLocalCrossAttention": (dict(dim=8, num_heads=2, top_ratio=0.5),
                                  lambda: ((torch.randn(2, 5, 8),), dict(attn_maps=_maps(2, 5)))),
    "PairwiseCrossAttention": (dict(dim=8, num_heads=2),
                               lambda: ((torch.randn(2, 5, 8),), dict(x_pair=torch.randn(2, 3, 8)))),
    "VaryingWindowAttention": (dict(dim=16, num_heads=2, window_size=2, ratios=(2,)),
                               lambda: ((torch.randn(2, 4, 4, 16),), {})),
    "ContMix": (dict(dim=8, num_heads=2, kernel_size=3, smk_size=3, region=2),
                lambda: ((torch.randn(1, 5, 5, 8),), dict(context=torch.randn(1, 5, 5, 8)))),
    "ScaleWiseAttention": (dict(dim=8, num_heads=2, in_dims=(4, 8)),
                           lambda: (([torch.randn(2, 4, 4, 4), torch.randn(2, 2, 2, 8)],), {})),
    "HierarchicalLocalAttention": (dict(dim=8, num_heads=2, window_size=2, pool=2),
                                   lambda: ((torch.randn(2, 4, 4, 8),), dict(low=torch.randn(2, 2, 2, 8)))),
    "ScatteredLinearAttention": (dict(dim=8, num_heads=2),
                                 lambda: ((torch.randn(6, 8), torch.tensor([0, 0, 1, 1, 1, 2])), {})),
    "GraphLocalGlobalAttention": (
        dict(dim=8, num_heads=2, num_centroids=4),
        lambda: ((torch.randn(5, 8), torch.tensor([[1, -1], [0, 2], [4, 3], [2, 2], [-1, -1]])),
                 dict(context=torch.randn(5, 8))),
    ),
    "CoreContextAttention": (dict(dim=8, num_heads=2, group_size=2, window_size=2),
                             lambda: ((torch.randn(2, 6, 8),), {})),
}

NAMES = sorted(MODULES)


def _params(cls):
    return [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]


def _build(name, **override):
    return MODULES[name](**{**EXAMPLES[name][0], **override})


def test_every_exported_module_has_an_example():
    assert sorted(EXAMPLES) == NAMES, "add every new foveal.nn module to EXAMPLES (and so to this policy)"


@pytest.mark.parametrize("name", NAMES)
def test_constructor_names_and_order(name):
    cls = MODULES[name]
    params = _params(cls)
    names = [p.name for p in params]
    module = _build(name)
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params), f"{name}: no *args/**kwargs"
    if name in DROP_INS:
        library, upstream = DROP_INS[name]
        doc = (cls.__doc__ or "") + (inspect.getmodule(cls).__doc__ or "")
        assert "drop-in" in doc and library.upper() in doc.upper(), f"{name} must document that it is a drop-in"
        theirs = getattr(pytest.importorskip(library), upstream)
        their_names = [p.name for p in _params(theirs)]
        positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
        assert positional == their_names, f"{name}: {library}'s positional arguments, in {library}'s order"
        extras = [p for p in params if p.kind != p.POSITIONAL_OR_KEYWORD]
        assert all(p.kind == p.KEYWORD_ONLY for p in extras), f"{name}: foveal's additions are keyword-only"
        assert names[-1] == "backend"
        return
    for n in names:
        assert n not in FORBIDDEN, f"{name}: argument {n!r} should be {FORBIDDEN[n]}"
    assert names[0] == "dim", f"{name}: the first argument is dim, got {names[0]!r}"
    if "num_heads" in names or hasattr(module, "num_heads"):
        assert names[1] == "num_heads", f"{name}: num_heads comes second, got {names}"
    tail = [n for n in names if n in TAIL]
    assert tail == [n for n in TAIL if n in tail], f"{name}: the common tail is in the order {TAIL}, got {tail}"
    assert names[len(names) - len(tail):] == tail, f"{name}: {tail} close the signature, got {names}"


@pytest.mark.parametrize("name", NAMES)
def test_backend_is_an_argument_of_every_module_that_attends_and_reaches_every_part(name):
    uses_attend = any(hasattr(m, "backend") for m in _build(name).modules())
    assert uses_attend == ("backend" in [p.name for p in _params(MODULES[name])])
    if uses_attend:
        module = _build(name, backend="reference")
        assert {m.backend for m in module.modules() if hasattr(m, "backend")} == {"reference"}


@pytest.mark.parametrize("name", NAMES)
def test_arguments_are_checked_at_construction(name):
    params = {p.name: p for p in _params(MODULES[name])}
    if "backend" in params:
        with pytest.raises(ValueError, match="backend must be 'auto' or one of .*got 'fast'"):
            _build(name, backend="fast")
        with pytest.raises(TypeError, match="backend must be a str"):
            _build(name, backend=1)
    if "qk_scale" in params:
        with pytest.raises(ValueError, match=r"qk_scale must be > 0 .*got 0"):
            _build(name, qk_scale=0)
        with pytest.raises(ValueError, match=r"qk_scale must be > 0 .*got -0.5"):
            _build(name, qk_scale=-0.5)
        with pytest.raises(TypeError, match="qk_scale must be a number or None"):
            _build(name, qk_scale=True)
    if "attn_drop" in params:
        with pytest.raises(ValueError, match="attn_drop must be 0.0"):
            _build(name, attn_drop=0.1)
    for drop in ("proj_drop", "drop_path"):
        if drop in params:
            with pytest.raises(ValueError, match=rf"{drop} must be in \[0, 1\), got 1.5"):
                _build(name, **{drop: 1.5})
    for arg, p in params.items():
        if isinstance(p.default, bool):  # a flag: a str is the wrong kind
            with pytest.raises(TypeError, match=arg):
                _build(name, **{arg: "yes"})
        elif isinstance(p.default, (int, float)) and arg != "backend":  # a number: a bool is the wrong kind
            with pytest.raises(TypeError, match=arg):
                _build(name, **{arg: True})


def _tensors(args, kwargs):
    """Where the tensors of a call are: ('arg', i, j) / ('kw', key, j), j the index inside a list or None."""
    where = []
    for place, items in (("arg", enumerate(args)), ("kw", kwargs.items())):
        for key, value in items:
            if isinstance(value, torch.Tensor):
                where.append((place, key, None))
            elif isinstance(value, list):
                where += [(place, key, j) for j, v in enumerate(value) if isinstance(v, torch.Tensor)]
    return where


def _replace(args, kwargs, at, new):
    args, kwargs = list(args), dict(kwargs)
    place, key, j = at
    box = args if place == "arg" else kwargs
    if j is None:
        box[key] = new(box[key])
    else:
        box[key] = [new(v) if i == j else v for i, v in enumerate(box[key])]
    return args, kwargs


def _get(args, kwargs, at):
    place, key, j = at
    value = (args if place == "arg" else kwargs)[key]
    return value if j is None else value[j]


@pytest.mark.parametrize("name", NAMES)
def test_forward_runs_and_refuses_a_non_tensor_input(name):
    module = _build(name)
    args, kwargs = EXAMPLES[name][1]()
    out = module(*args, **kwargs)
    first = out[0] if isinstance(out, tuple) else out
    assert isinstance(first, torch.Tensor) and torch.isfinite(first).all()
    where = _tensors(args, kwargs)
    assert where
    for at in where:  # each tensor in turn as a (nested) list: same values, wrong kind
        bad_args, bad_kwargs = _replace(args, kwargs, at, lambda t: t.tolist())
        with pytest.raises(TypeError, match="must be a torch|must hold integers"):
            module(*bad_args, **bad_kwargs)
    floating = [at for at in where if _get(args, kwargs, at).is_floating_point()]
    bad_args, bad_kwargs = _replace(args, kwargs, floating[0], lambda t: t.long())
    with pytest.raises(TypeError, match="floating"):
        module(*bad_args, **bad_kwargs)


# -- one way to call attend, bounded pattern caches ----------------------------------------------------

NN_FILES = sorted(p for p in pathlib.Path(fnn.__file__).parent.glob("*.py") if p.name != "_common.py")


@pytest.mark.parametrize("path", NN_FILES, ids=lambda p: p.name)
def test_modules_take_attend_from_common_and_never_hide_it_from_compile(path):
    # one import point (foveal.nn._common), and no torch.compiler.disable: under torch.compile attend is one
    # opaque custom op (foveal.custom_op), so a compiled model built from these modules keeps one graph
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("foveal.functional", "foveal"):
            assert "attend" not in [a.name for a in node.names], f"{path.name}:{node.lineno} imports attend"
        if isinstance(node, ast.Import):
            assert all(a.name != "foveal.functional" for a in node.names), f"{path.name}:{node.lineno}"
        if isinstance(node, ast.Attribute):
            assert node.attr != "disable", f"{path.name}:{node.lineno} hides code from torch.compile"
        if isinstance(node, ast.Name):
            assert node.id != "attend_opaque", f"{path.name}:{node.lineno}"


@pytest.mark.parametrize("path", NN_FILES, ids=lambda p: p.name)
def test_modules_keep_no_unbounded_dicts(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            on_self = any(isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
                          for t in targets)
            value = node.value
            is_dict = isinstance(value, ast.Dict) or (
                isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict"
            )
            assert not (on_self and is_dict), f"{path.name}:{node.lineno}: use foveal.nn._common.cached_pattern"


def test_patterns_are_shared_by_value_and_the_cache_is_bounded():
    _common.PATTERNS.clear()
    a = fnn.WindowAttention(8, 2, window_size=2).pattern((4, 4))
    b = fnn.WindowAttention(16, 4, window_size=2, qkv_bias=False).pattern([4, 4])
    assert a is b and len(_common.PATTERNS) == 1
    m = fnn.PositionAttention(8)
    for side in range(1, _common.PATTERNS.maxsize + 20):
        assert m.pattern((side, 3)) == fnn.PositionAttention(8).pattern((side, 3))
    assert len(_common.PATTERNS) == _common.PATTERNS.maxsize


@pytest.mark.parametrize("name", ["NeighborhoodAttention2D", "DaViTBlock"])
def test_torch_compile_smoke(name):
    # the other modules that attend have their own compile test in tests/test_nn_<family>.py
    module = _build(name).eval()
    args, kwargs = EXAMPLES[name][1]()
    torch.testing.assert_close(torch.compile(module, backend="eager")(*args, **kwargs), module(*args, **kwargs))
