"""``foveal show --module``: the pattern each attention module uses, drawn on a grid, against ``module.pattern``."""

import re

import numpy as np
import pytest
import torch

from foveal.cli import main
from foveal.gallery import MODULE_GALLERY
from foveal.nn.halo import HaloAttention
from foveal.nn.scatter import ScatteredLinearAttention
from foveal.nn.window import WindowAttention
from foveal.show import (
    DEFAULT_GROUPS,
    DEFAULT_SEED,
    mask_image,
    module_classes,
    module_pattern,
    parse_grid,
    parse_module,
    render_module,
)

PNG = b"\x89PNG\r\n\x1a\n"


def keys_of(pattern, query):
    """One query's allowed keys, one scalar ``mask`` call per key, in row-major key order."""
    return torch.tensor([bool(pattern.mask(torch.tensor(query), torch.tensor(j))) for j in range(pattern.n_kv)])


def own_pattern(module, grid):
    """The module's pattern, asked directly: a grid, or a token count for sequence modules."""
    import inspect

    first = next(iter(inspect.signature(module.pattern).parameters))
    return module.pattern(grid if first == "grid" else grid[0])


@pytest.mark.parametrize("name", sorted(n for n in MODULE_GALLERY if n != "scattered_linear_attention"))
def test_every_module_picture_draws_its_pattern(tmp_path, name):
    expr, grid = MODULE_GALLERY[name]
    module = parse_module(expr)
    expected = own_pattern(module, grid)
    pattern, note = module_pattern(module, grid)
    assert pattern == expected and note == ""
    img = mask_image(pattern)
    if img.kind == "matrix":  # keys on a line: the whole mask; rows checked at random, and the first and last
        assert img.data.shape == (pattern.n_q, pattern.n_kv)
        rows = torch.randint(0, pattern.n_q, (4,), generator=torch.Generator().manual_seed(0)).tolist()
        for i in {0, pattern.n_q - 1, *rows}:
            assert torch.equal(img.data[i].bool(), keys_of(pattern, i)), i
    else:  # one query on the key grid, and the query marked where it sits on that grid
        query = sum(s // 2 * int(np.prod(pattern.shape[a + 1 :])) for a, s in enumerate(pattern.shape))
        assert img.query == query
        assert torch.equal(img.allowed().flatten(), keys_of(pattern, query))
        if pattern.kv_shape == pattern.shape:
            assert img.marker == tuple(s // 2 for s in pattern.shape)
    path = render_module(module, grid, tmp_path / f"{name}.png")
    assert path.read_bytes()[:8] == PNG


def test_every_attention_module_has_a_gallery_picture():
    with_pattern = {n for n, c in module_classes().items() if callable(getattr(c, "pattern", None))}
    in_gallery = {type(parse_module(expr)).__name__ for expr, _ in MODULE_GALLERY.values()}
    assert with_pattern - in_gallery == set(), "add these modules to foveal.gallery.MODULE_GALLERY"
    assert {"WindowAttention", "HaloAttention", "NeighborhoodAttention2D"} <= with_pattern


def test_halo_module_is_drawn_on_the_padded_key_grid():
    module = HaloAttention(dim=16, num_heads=2, block_size=4, halo_size=1)
    pattern, _ = module_pattern(module, (8, 12))
    img = mask_image(pattern, 5 * 12 + 6)  # (5, 6): tile (1, 1), keys [4, 10) x [4, 10) on the padded grid
    assert img.data.shape == (10, 14)
    expected = torch.zeros(10, 14, dtype=torch.bool)
    expected[4:10, 4:10] = True
    assert torch.equal(img.allowed(), expected)
    assert img.marker == (6, 7) and img.box == ((1, 9), (1, 13))


def test_scattered_module_gets_seeded_random_groups(tmp_path):
    module = ScatteredLinearAttention(dim=16, num_heads=2)
    pattern, note = module_pattern(module, (40,))
    ids = torch.randint(0, DEFAULT_GROUPS, (40,), generator=torch.Generator().manual_seed(DEFAULT_SEED))
    group = ids.sort().values  # tokens sorted by group: pairs interact iff in the same group
    assert torch.equal(pattern.dense_mask(), group[:, None] == group[None, :])
    assert f"{DEFAULT_GROUPS} random groups" in note
    expr, grid = MODULE_GALLERY["scattered_linear_attention"]
    assert render_module(parse_module(expr), grid, tmp_path / "s.png").read_bytes()[:8] == PNG


def test_parse_module_builds_the_module():
    m = parse_module("WindowAttention(dim=32, num_heads=2, window_size=4, shift_size=2)")
    assert isinstance(m, WindowAttention) and m.pattern((8, 8)).shift == (2, 2)


@pytest.mark.parametrize(
    "expr, match",
    [
        ("Swin(dim=32)", "cannot build a module from 'Swin.*NameError.*Available modules: .*WindowAttention"),
        ("WindowAttention(dim=32, num_heads=3)", "cannot build a module .*dim must be divisible"),
        ("WindowAttention(dim=32", "cannot build a module .*SyntaxError"),
        ("3 + 4", "is a int, not a module"),
        ("__import__('os')", "cannot build a module"),
        ("", "expected a module expression"),
    ],
)
def test_parse_module_errors(expr, match):
    with pytest.raises(ValueError, match=match):
        parse_module(expr)


def test_module_pattern_errors():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got str"):
        module_pattern("WindowAttention", (8, 8))
    with pytest.raises(TypeError, match="FocalModulation has no pattern.*modules with a pattern: .*WindowAttention"):
        module_pattern(parse_module("FocalModulation(dim=16)"), (8, 8))
    with pytest.raises(TypeError, match="has no pattern"):
        module_pattern(torch.nn.Linear(4, 4), (8, 8))
    cca = parse_module("CoreContextAttention(dim=16, num_heads=2, group_size=4, window_size=8)")
    with pytest.raises(ValueError, match=r"CoreContextAttention.pattern takes a number of tokens n .* grid \(8, 8\)"):
        module_pattern(cca, (8, 8))
    maxvit = parse_module("MultiAxisAttention(dim=16, num_heads=2, partition_size=4)")
    with pytest.raises(ValueError, match=r"MultiAxisAttention.pattern\(\(10, 8\)\) refused: .*10"):
        module_pattern(maxvit, (10, 8))
    with pytest.raises(ValueError, match="grid must be positive integers"):
        module_pattern(maxvit, "8;8")


@pytest.mark.parametrize("text, grid", [("16,16", (16, 16)), ("16x8", (16, 8)), ("(4, 4, 2)", (4, 4, 2)),
                                        ("64", (64,)), (12, (12,)), ((3, 5), (3, 5))])
def test_parse_grid(text, grid):
    assert parse_grid(text) == grid


def test_parse_grid_errors():
    for bad in ("", "a,b", "16,-2", "16.5"):
        with pytest.raises(ValueError, match="grid must be"):
            parse_grid(bad)
    with pytest.raises(ValueError, match="grid"):
        parse_grid((4, 0))


def test_cli_module_round_trip(tmp_path, capsys):
    out = tmp_path / "swin.png"
    expr = "WindowAttention(dim=32, num_heads=2, window_size=4, shift_size=2)"
    assert main(["show", "--module", expr, "--grid", "16,16", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    printed = capsys.readouterr().out
    assert "Window(grid=(16, 16), window=(4, 4), shift=(2, 2))" in printed and str(out) in printed
    out = tmp_path / "scatter.png"
    assert main(["show", "--module", "ScatteredLinearAttention(dim=16, num_heads=2)", "--grid", "32",
                 "-o", str(out), "--query", "3", "--block", "8"]) == 0
    assert "random groups" in capsys.readouterr().out and out.read_bytes()[:8] == PNG
    for argv, message in [
        (["--module", expr], "--module needs --grid"),
        (["--module", "Swin(dim=8)", "--grid", "8,8"], "cannot build a module"),
        (["--module", "FocalModulation(dim=16)", "--grid", "8,8"], "has no pattern"),
        (["--module", expr, "--grid", "8;8"], "grid must be positive integers"),
        (["Causal(8)", "--module", expr, "--grid", "8,8"], "not both"),
        (["--module", expr, "--grid", "16,16", "--query", "999"], r"query must be a token index in \[0, 255\]"),
    ]:
        assert main(["show", *argv, "-o", str(tmp_path / "bad.png")]) == 2
        assert re.search(message, capsys.readouterr().err), argv
    assert not (tmp_path / "bad.png").exists()
