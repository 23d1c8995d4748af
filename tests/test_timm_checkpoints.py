"""foveal's modules load their timm twins' state dicts as timm saves them, and agree with timm forward and backward.

Every test builds the timm module itself (random init, nothing downloaded), loads its
``state_dict()`` into the foveal module with ``strict=True`` and compares outputs and the
gradients of the input and of every parameter (matched by name: the names are timm's)
on the same input. Both sides run in float64 and agree to 1e-10 of the largest magnitude
compared (tests/precision.py: float32 rounding of a block depends on threads and ISA).
timm is a test dependency (the Makefile installs it); without it these tests skip.
"""

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.layers.halo_attn import HaloAttn  # noqa: E402
from timm.models import davit as timm_davit  # noqa: E402
from timm.models import focalnet as timm_focalnet  # noqa: E402
from timm.models import maxxvit as timm_maxxvit  # noqa: E402
from timm.models import swin_transformer as timm_swin  # noqa: E402

from foveal.nn import (  # noqa: E402
    ChannelBlock,
    FocalModulation,
    HaloAttention,
    MaxViTBlock,
    MultiAxisAttention,
    SpatialBlock,
    WindowAttention,
)
from precision import assert_close64  # noqa: E402


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic random (not timm's init), so every term shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = p[0].numel() ** -0.5 if p.dim() > 1 else 0.2  # weights: O(1) activations (fan-in scaling)
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
        for mod in module.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    return module


def _nchw(x):
    return x.permute(0, 3, 1, 2)


def _agree(ours, theirs, x, run_ours, run_theirs, tol=1e-10):
    """Same output, same gradients of x and of every parameter, name by name: both sides in float64."""
    ours.double(), theirs.double()
    ours_params, theirs_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert sorted(ours_params) == sorted(theirs_params)
    names = sorted(ours_params)
    xa = x.detach().double().requires_grad_()
    xb = x.detach().double().requires_grad_()
    out, want = run_ours(xa), run_theirs(xb)
    assert_close64(out, want, tol)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [xa] + [ours_params[n] for n in names], g, allow_unused=True)
    ref = torch.autograd.grad(want, [xb] + [theirs_params[n] for n in names], g, allow_unused=True)
    for name, a, b in zip(["input"] + names, got, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close64(a, b, tol, msg=lambda s: f"d{name}: {s}")


def _load(ours, theirs, state=None):
    ours.load_state_dict(theirs.state_dict() if state is None else state, strict=True)
    return ours.train(theirs.training)


# -- FocalNet -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(focal_window=3, focal_level=2),
        dict(focal_window=3, focal_level=3, use_post_norm=True, eps=1e-6),  # timm's module default LayerNorm2d
        dict(focal_window=1, focal_level=2, use_post_norm=True, eps=1e-5, normalize_modulator=True, bias=False),
    ],
)
def test_focal_modulation(kwargs):
    kwargs = dict(kwargs)
    eps = kwargs.pop("eps", 1e-5)
    norm = lambda dim, **kw: timm.layers.LayerNorm2d(dim, eps=eps, **kw)  # noqa: E731
    theirs = _randomize(timm_focalnet.FocalModulation(16, norm_layer=norm, **kwargs), 0)
    ours = _load(FocalModulation(16, norm_eps=eps, **kwargs), theirs)
    if ours.use_post_norm:
        assert ours.norm.eps == theirs.norm.eps == eps
    assert set(ours.state_dict()) == set(theirs.state_dict())
    x = torch.randn(2, 7, 5, 16)
    _agree(ours, theirs, x, ours, lambda t: theirs(_nchw(t)).permute(0, 2, 3, 1))


# -- Swin v1 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("stored_index", [False, True])
def test_swin_window_attention(shift, stored_index):
    blk = timm_swin.SwinTransformerBlock(16, (8, 12), num_heads=2, window_size=4, shift_size=shift)
    assert blk.shift_size == (shift, shift)
    theirs = _randomize(blk.attn, 1)
    state = theirs.state_dict()
    assert "relative_position_index" not in state  # timm 1.x: a non-persistent buffer
    if stored_index:  # timm 0.x and the official Swin checkpoints store the index
        state["relative_position_index"] = theirs.relative_position_index.clone()
    ours = _load(WindowAttention(16, 2, 4, shift), theirs, state)
    x = torch.randn(2, 8, 12, 16)
    # timm's block: roll, partition, windowed attention with its -100 region mask, reverse, roll back
    _agree(ours, theirs, x, ours, blk._attn)


# -- MaxViT -----------------------------------------------------------------------------------------
VARIANTS = {
    # timm config -> foveal flags
    "maxvit_pico_rw": dict(head_first=True, norm_eps=1e-6, conv_act_layer="silu", conv_output_bias=False),
    "maxvit_rmlp_pico_rw": dict(
        head_first=True, norm_eps=1e-6, conv_act_layer="silu", conv_output_bias=False, rel_pos_type="mlp"
    ),
    "maxvit_tiny_tf": dict(rel_pos_type="bias_tf", act_layer="gelu_tanh", conv_act_layer="gelu_tanh", conv_norm_eps=1e-3),
}


def _timm_maxvit_block(variant, partition):
    cfg = timm_maxxvit.model_cfgs[variant]
    tcfg = timm_maxxvit.cfg_window_size(cfg.transformer_cfg, tuple(32 * p for p in partition))
    return timm_maxxvit.MaxxVitBlock(64, 64, stride=1, conv_cfg=cfg.conv_cfg, transformer_cfg=tcfg)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("train", [False, True])
def test_maxvit_block(variant, train):
    if train and variant == "maxvit_rmlp_pico_rw":
        pytest.skip("RelPosMlp applies dropout in training: compared in eval mode")
    theirs = _randomize(_timm_maxvit_block(variant, (2, 3)), 2).train(train)
    ours = _load(MaxViTBlock(64, 2, (2, 3), **VARIANTS[variant]), theirs)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    x = torch.randn(2, 4, 6, 64)
    _agree(ours, theirs, x, ours, lambda t: theirs(_nchw(t)).permute(0, 2, 3, 1))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", ["block", "grid"])
def test_maxvit_attention_keys(variant, kind):
    # the attention alone: timm's key paths (attn.rel_pos.relative_position_bias_table, ...) and its partitions
    blk = _timm_maxvit_block(variant, (2, 2))
    part = blk.attn_block if kind == "block" else blk.attn_grid
    theirs = _randomize(part.attn, 3).eval()
    flags = VARIANTS[variant]
    ours = MultiAxisAttention(
        64, 2, 2, kind, rel_pos_type=flags.get("rel_pos_type", "bias"), head_first=flags.get("head_first", False)
    ).eval()
    _load(ours, theirs)
    x = torch.randn(2, 4, 8, 64)
    _agree(ours, theirs, x, ours, part._partition_attn)


def test_maxvit_tf_table_shape():
    theirs = _timm_maxvit_block("maxvit_tiny_tf", (3, 3)).attn_block.attn
    table = theirs.state_dict()["rel_pos.relative_position_bias_table"]
    assert table.shape == (2, 5, 5)  # RelPosBiasTf: (heads, 2P−1, 2P−1)
    ours = MultiAxisAttention(64, 2, 3, rel_pos_type="bias_tf")
    assert ours.state_dict()["rel_pos.relative_position_bias_table"].shape == table.shape


# -- HaloNet ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "block, halo, stride, qkv_bias, scale_pos_embed",
    [(4, 1, 1, False, False), (4, 2, 1, True, True), (3, 1, 1, False, True), (8, 2, 2, False, False), (4, 3, 2, True, True)],
)
def test_halo_attention(block, halo, stride, qkv_bias, scale_pos_embed):
    kwargs = dict(block_size=block, halo_size=halo, qkv_bias=qkv_bias, scale_pos_embed=scale_pos_embed)
    theirs = _randomize(HaloAttn(16, num_heads=2, stride=stride, **kwargs), 4)
    assert theirs.block_stride == stride  # stride 2: queries subsampled by the strided 1×1 q conv
    ours = _load(HaloAttention(16, 2, stride=stride, **kwargs), theirs)
    x = torch.randn(2, 2 * block, 3 * block, 16)
    _agree(ours, theirs, x, ours, lambda t: theirs(_nchw(t)).permute(0, 2, 3, 1))


# -- DaViT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(8, 12), (6, 9)])  # (6, 9): both pad to whole windows
@pytest.mark.parametrize("cpe_act", [False, True])
def test_davit_spatial_block(grid, cpe_act):
    theirs = _randomize(timm_davit.SpatialBlock(16, 2, window_size=4, mlp_ratio=2.0, cpe_act=cpe_act), 5)
    ours = _load(SpatialBlock(16, 2, 4, mlp_ratio=2.0, cpe_act=cpe_act), theirs)
    x = torch.randn(2, *grid, 16)
    _agree(ours, theirs, x, ours, lambda t: theirs(_nchw(t)).permute(0, 2, 3, 1))


@pytest.mark.parametrize("v2, ffn", [(False, True), (True, True), (False, False)])
def test_davit_channel_block(v2, ffn):
    theirs = _randomize(timm_davit.ChannelBlock(16, 4, mlp_ratio=2.0, qkv_bias=True, ffn=ffn, v2=v2), 6)
    ours = _load(ChannelBlock(16, 4, mlp_ratio=2.0, ffn=ffn, v2=v2, qkv_bias=True), theirs)
    x = torch.randn(2, 5, 7, 16)
    _agree(ours, theirs, x, ours, lambda t: theirs(_nchw(t)).permute(0, 2, 3, 1))


def test_a_wrong_flag_disagrees():
    # the flags matter: loading a *_tf block into foveal's defaults (no bias_tf) is refused, and the
    # *_rw block with the tf qkv layout loads (same shapes) but computes something else
    theirs = _randomize(_timm_maxvit_block("maxvit_pico_rw", (2, 2)), 7).eval()
    wrong = dict(VARIANTS["maxvit_pico_rw"], head_first=False)
    ours = _load(MaxViTBlock(64, 2, 2, **wrong).eval(), theirs)
    x = torch.randn(1, 4, 4, 64)
    with torch.no_grad():
        assert not torch.allclose(ours(x), theirs(_nchw(x)).permute(0, 2, 3, 1), atol=1e-3)
    tf = _timm_maxvit_block("maxvit_tiny_tf", (2, 2))
    with pytest.raises(RuntimeError, match="size mismatch"):
        MaxViTBlock(64, 2, 2).load_state_dict(tf.state_dict())
