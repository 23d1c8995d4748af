"""The package's structure: no import circle between foveal's modules, one export list."""

import ast
from pathlib import Path

import torch

import foveal
import foveal.patterns

SRC = Path(foveal.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the foveal modules it imports, at module level or inside a function alike."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("foveal"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("foveal")}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _circles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_between_modules_not_even_inside_functions():
    graph = _import_graph()
    assert "foveal.patterns.base" in graph and graph["foveal.patterns.algebra"] >= {"foveal.patterns.base"}
    assert _circles(graph) == []


def test_patterns_import_no_later_layer():
    """DESIGN.md: patterns -> layout -> kernels -> functional -> nn; a pattern uses a native op through torch.ops."""
    later = ("foveal.kernels", "foveal.functional", "foveal.eager", "foveal.nn", "foveal.integrations", "foveal.bench")
    graph = _import_graph()
    wrong = {m: sorted(t for t in ts if t.startswith(later)) for m, ts in graph.items()
             if m.startswith("foveal.patterns")}
    assert not {m: ts for m, ts in wrong.items() if ts}


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_one_export_list_every_pattern_name_is_exported_at_the_top():
    assert set(foveal.__all__) >= set(foveal.patterns.__all__) | set(foveal.patterns.DYNAMIC)
    assert "PaddedHalo" in foveal.__all__
    assert len(foveal.__all__) == len(set(foveal.__all__))
    for name in foveal.__all__:
        assert getattr(foveal, name) is not None, name
    for name in foveal.patterns.__all__:
        assert getattr(foveal, name) is getattr(foveal.patterns, name)


def test_one_copy_of_the_mlp_the_backend_check_and_a_shapes_defaults():
    import inspect

    from foveal import recipes
    from foveal.kernels.select import check_backend_name
    from foveal.models.backbone import Block
    from foveal.nn._common import check_backend
    from foveal.nn.davit import SpatialBlock
    from foveal.nn.maxvit import MaxViTBlock
    from foveal.nn.mlp import Mlp

    assert check_backend is check_backend_name
    assert isinstance(Block(8, torch.nn.Identity()).mlp, Mlp)
    assert isinstance(SpatialBlock(8, 2, window_size=2).mlp, Mlp)
    assert any(isinstance(m, Mlp) for m in MaxViTBlock(8, 2, partition_size=2).modules())
    shape = inspect.signature(foveal.patterns.a_shape).parameters
    recipe = inspect.signature(recipes.a_shape).parameters
    assert (shape["sinks"].default, shape["local"].default) == (recipe["sinks"].default, recipe["local"].default)
    sources = [p.read_text() for p in SRC.rglob("*.py") if p.name != "mlp.py"]
    assert not any("class _Mlp" in s or "class Mlp" in s for s in sources)
