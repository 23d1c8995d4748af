"""Pictures and the ``foveal`` command line: the arrays drawn against the patterns' definitions."""

import itertools

import numpy as np
import pytest
import torch

import foveal.gallery
from foveal.cli import main
from foveal.gallery import GALLERY
from foveal.patterns import Causal, Full, Halo, Neighborhood, SlidingWindow, Window
from foveal.patterns.local import PaddedHalo
from foveal.patterns.order import Ordered, hilbert, tiles
from foveal.show import gallery, layout_image, mask_image, parse_pattern, render

PNG = b"\x89PNG\r\n\x1a\n"


def keys_of(pattern, query):
    """One query's allowed keys, one scalar ``mask`` call per key, in row-major key order."""
    return torch.tensor([bool(pattern.mask(torch.tensor(query), torch.tensor(j))) for j in range(pattern.n_kv)])


def padded_halo_keys(grid, block, halo, query):
    """PaddedHalo from HaloNet's definition: the query's tile grown by the halo, on the grid framed by ``halo``."""
    coords = np.unravel_index(query, grid)
    kv = [g + 2 * halo for g in grid]
    allowed = torch.zeros(kv, dtype=torch.bool)
    window = tuple(slice((c // block) * block, (c // block) * block + block + 2 * halo) for c in coords)
    allowed[window] = True
    return allowed


def block_states(dense, block_q, block_k):
    """0 empty, 1 partial, 2 full, from a dense mask whose sides the blocks divide."""
    n_q, n_kv = dense.shape
    counts = dense.reshape(n_q // block_q, block_q, n_kv // block_k, block_k).sum((1, 3))
    return (counts > 0).long() + (counts == block_q * block_k).long()


@pytest.mark.parametrize("name", sorted(GALLERY))
def test_gallery_picture_data(name):
    """What each gallery picture draws (the pictures themselves: ``foveal show --gallery`` in ``make demo``)."""
    pattern = GALLERY[name]
    img = mask_image(pattern)
    if img.kind == "matrix":
        assert torch.equal(img.data.bool(), pattern.dense_mask())
    else:
        query = img.query
        assert torch.equal(img.allowed().flatten(), pattern.dense_mask()[query])
    states, lay, _ = layout_image(pattern, 16)
    assert states.shape == (lay.num_q_blocks, lay.num_kv_blocks)
    assert int((states == 2).sum()) == lay.num_full and int((states == 1).sum()) == lay.num_partial


def test_gallery_writes_one_png_per_picture(tmp_path, monkeypatch):
    small = {n: GALLERY[n] for n in ("causal", "window_2d_shifted", "neighborhood_3d")}
    monkeypatch.setattr(foveal.gallery, "GALLERY", small)
    paths = gallery(tmp_path, modules=False)
    assert [p.name for p in paths] == [f"{n}.png" for n in small]
    for p in paths:
        assert p.read_bytes()[:8] == PNG


@pytest.mark.parametrize("name", sorted(GALLERY))
def test_parse_pattern_round_trips_repr(name):
    assert parse_pattern(repr(GALLERY[name])) == GALLERY[name]


@pytest.mark.parametrize(
    "pattern",
    [
        Neighborhood((7, 9), kernel_size=3, dilation=2),
        Window((8, 8), window=4, shift=2),
        Halo((6, 5), block=2, halo=1),
        Neighborhood((3, 4, 5), kernel_size=(1, 3, 3)),
        Neighborhood((2, 3, 2, 3), kernel_size=2),
    ],
    ids=repr,
)
def test_mask_image_of_grid_patterns_is_one_row_of_the_mask(pattern):
    gen = torch.Generator().manual_seed(0)
    for query in torch.randint(0, pattern.n, (3,), generator=gen).tolist():
        img = mask_image(pattern, query)
        assert img.kind == "grid" and tuple(img.data.shape) == pattern.shape
        assert torch.equal(img.allowed().flatten(), keys_of(pattern, query))
        coords = tuple(int(c) for c in np.unravel_index(query, pattern.shape))
        assert img.coords == coords and img.marker == coords
        assert int(img.data[coords]) in (2, 3) and int((img.data >= 2).sum()) == 1
        assert (int(img.data[coords]) == 2) == bool(pattern.mask(torch.tensor(query), torch.tensor(query)))


def test_mask_image_default_query_is_the_centre():
    assert mask_image(Neighborhood((7, 10), 3)).coords == (3, 5)


@pytest.mark.parametrize(
    "pattern, definition",
    [
        (SlidingWindow(20, left=3, right=1), lambda i, j: i - 3 <= j <= i + 1),
        (Causal(8, n_kv=12), lambda i, j: j <= i + 4),  # cross, aligned bottom-right
        (Full((4, 4), n_kv=6), lambda i, j: True),  # N-D queries, flat keys
    ],
    ids=repr,
)
def test_mask_image_with_flat_keys_is_the_whole_mask(pattern, definition):
    img = mask_image(pattern)
    expected = torch.tensor([[definition(i, j) for j in range(pattern.n_kv)] for i in range(pattern.n_q)])
    assert img.kind == "matrix" and torch.equal(img.data.bool(), expected)
    assert img.marker is None


@pytest.mark.parametrize("grid, block, halo", [((8, 8), 2, 1), ((4, 6), 2, 2), ((4, 2, 6), 2, 1)])
def test_cross_pattern_is_drawn_on_its_key_grid(grid, block, halo):
    pattern = PaddedHalo(grid, block, halo)
    for query in (0, pattern.n // 2 + 1, pattern.n - 1):
        img = mask_image(pattern, query)
        assert img.kind == "grid" and tuple(img.data.shape) == tuple(g + 2 * halo for g in grid)
        assert torch.equal(img.allowed(), padded_halo_keys(grid, block, halo, query))
        coords = tuple(int(c) for c in np.unravel_index(query, grid))
        assert img.coords == coords
        assert img.marker == tuple(c + halo for c in coords) and int(img.data[img.marker]) == 2
        assert img.box == tuple((halo, halo + g) for g in grid)


def test_cross_pattern_without_a_placement_has_no_marker():
    pattern = Full((4, 4), n_kv=(3, 5))
    img = mask_image(pattern, 5)
    assert img.kind == "grid" and img.data.shape == (3, 5) and bool(img.data.eq(1).all())
    assert img.coords == (1, 1) and img.marker is None and img.box is None


@pytest.mark.parametrize(
    "pattern",
    [PaddedHalo((8, 8), 2, 1), Full((4, 4), n_kv=(3, 5)), Full((2, 3), n_kv=(2, 4, 4)), Causal(8, n_kv=12),
     Full(4, n_kv=64), PaddedHalo((4, 2, 6), 2, 1)],
    ids=repr,
)
def test_render_cross_patterns(tmp_path, pattern):
    assert render(pattern, tmp_path / "x.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("block", [4, 16])
def test_layout_image_is_the_blocks_of_the_mask(block):
    pattern = Neighborhood((16, 16), kernel_size=5)
    states, lay, label = layout_image(pattern, block)
    assert label == "block layout"
    assert torch.equal(states, block_states(pattern.dense_mask(), block, block))


@pytest.mark.parametrize("order", ["hilbert", "tiles"])
def test_ordered_layout_is_drawn_in_the_order(order):
    grid = (8, 8)
    perm = hilbert(grid) if order == "hilbert" else tiles(grid, (2, 4))
    inner = SlidingWindow(64, left=5, right=2)
    pattern = Ordered(inner, order if order == "hilbert" else perm, grid)
    states, _, label = layout_image(pattern, 8)
    # the blocks the kernels run: the row-major mask with its tokens taken in the order
    in_order = pattern.dense_mask()[perm][:, perm]
    assert torch.equal(states, block_states(in_order, 8, 8))
    assert not torch.equal(states, block_states(pattern.dense_mask(), 8, 8))
    assert ("hilbert" if order == "hilbert" else "custom") + " order" in label
    img = mask_image(pattern, 27)  # the mask panel stays on the grid, in row-major coordinates
    assert torch.equal(img.allowed().flatten(), keys_of(pattern, 27))


def test_render_ordered(tmp_path):
    pattern = Ordered(SlidingWindow(256, left=8, right=8), "hilbert", (16, 16))
    assert render(pattern, tmp_path / "o.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    "expr, match",
    [
        ("Neighborhood(grid=(8,8)", "cannot build a pattern"),
        ("Mystery(8)", "cannot build a pattern .*Mystery.*Available patterns: Full"),
        ("Neighborhood((8, 8), 9)", r"kernel_size\[0\]=9 > grid\[0\]=8"),
        ("3 + 4", "is a int, not a pattern"),
        ("__import__('os')", "cannot build a pattern"),
    ],
)
def test_parse_pattern_errors(expr, match):
    with pytest.raises(ValueError, match=match):
        parse_pattern(expr)


def test_render_checks_its_arguments(tmp_path):
    with pytest.raises(TypeError, match="pattern must be a foveal Pattern"):
        render("Causal(8)", tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"query must be a token index in \[0, 63\], got 64"):
        render(Neighborhood((8, 8), 3), tmp_path / "x.png", query=64)
    with pytest.raises(ValueError, match="block must be >= 1, got 0"):
        render(Causal(8), tmp_path / "x.png", block=0)
    with pytest.raises(ValueError, match="block must be <= the number of tokens 8, got 9"):
        render(Causal(8), tmp_path / "x.png", block=9)
    assert not list(tmp_path.iterdir())


def test_cli_show(tmp_path, capsys, monkeypatch):
    out = tmp_path / "na.png"
    assert main(["show", "Neighborhood(grid=(16,16), kernel_size=5)", "-o", str(out), "--query", "3"]) == 0
    assert out.read_bytes()[:8] == PNG
    assert main(["show", "Nope(3)"]) == 2
    assert "cannot build a pattern" in capsys.readouterr().err
    assert main(["show", "Causal(8)", "--grid", "8"]) == 2
    assert "--grid goes with --module" in capsys.readouterr().err
    # the gallery command on a small gallery (the whole one is drawn by the tests above and in test_show_modules)
    monkeypatch.setattr(foveal.gallery, "GALLERY", {"causal": Causal(16)})
    monkeypatch.setattr(foveal.gallery, "MODULE_GALLERY",
                        {"window": ("WindowAttention(dim=8, num_heads=2, window_size=2)", (4, 4))})
    assert main(["show", "--gallery", str(tmp_path / "g")]) == 0
    assert "wrote 2 pictures" in capsys.readouterr().out
    for p in (tmp_path / "g" / "causal.png", tmp_path / "g" / "modules" / "window.png"):
        assert p.read_bytes()[:8] == PNG


def test_cli_check(capsys):
    """Every gallery pattern on every backend against dense attention (the costliest test here: ~10 s of CPU)."""
    assert main(["check"]) == 0
    assert "all backends agree with dense attention" in capsys.readouterr().out


def test_all_grid_cells_are_drawn_once_in_3d_tiling():
    from foveal.show import _tile_slices

    img = torch.arange(5 * 3 * 4).reshape(5, 3, 4)
    canvas, per_row = _tile_slices(img)
    assert per_row == 3
    assert sorted(canvas[canvas >= 0].tolist()) == list(range(60))
    for i, (r, c) in zip(range(5), itertools.product(range(2), range(3))):
        assert torch.equal(canvas[r * 4 : r * 4 + 3, c * 5 : c * 5 + 4], img[i])
