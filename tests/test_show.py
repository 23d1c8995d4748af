"""Pictures and the ``foveal`` command line."""

import pytest

from foveal.cli import main
from foveal.gallery import GALLERY
from foveal.patterns import Causal, Neighborhood
from foveal.show import gallery, parse_pattern, render

PNG = b"\x89PNG\r\n\x1a\n"


def test_gallery_writes_one_png_per_pattern(tmp_path):
    paths = gallery(tmp_path)
    assert sorted(p.stem for p in paths) == sorted(GALLERY)
    for p in paths:
        assert p.read_bytes()[:8] == PNG


@pytest.mark.parametrize("name", sorted(GALLERY))
def test_parse_pattern_round_trips_repr(name):
    assert parse_pattern(repr(GALLERY[name])) == GALLERY[name]


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


def test_cli_show_and_check(tmp_path, capsys):
    out = tmp_path / "na.png"
    assert main(["show", "Neighborhood(grid=(16,16), kernel_size=5)", "-o", str(out), "--query", "3"]) == 0
    assert out.read_bytes()[:8] == PNG
    assert main(["show", "Nope(3)"]) == 2
    assert "cannot build a pattern" in capsys.readouterr().err
    assert main(["show", "--gallery", str(tmp_path / "g")]) == 0
    assert main(["check"]) == 0
    assert "all backends agree with dense attention" in capsys.readouterr().out
