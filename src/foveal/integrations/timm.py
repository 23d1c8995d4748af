"""timm models on foveal: ``convert(model)`` puts foveal modules where timm's attention was, weights kept.

``convert(model)`` walks a model built by ``timm.create_model(name, pretrained=False)`` (or
loaded with its weights) and replaces, in place, the attention of these families by the
foveal module of the same mechanism, loaded with timm's own state dict (strictly):

========================  ===========================================  ==================================
timm module               foveal module                                what changes
========================  ===========================================  ==================================
Swin ``WindowAttention``  ``foveal.nn.WindowAttention``                the block's roll, partition and
(in ``SwinTransformer``                                                region mask become one shifted
``Block``)                                                             ``Window`` pattern on the whole map
MaxViT ``AttentionCl``    ``foveal.nn.MultiAxisAttention``             partition/reverse become ``Window``
(in ``PartitionAtten``    (``head_first`` for ``*_rw``, ``bias_tf``    / ``Grid`` patterns
``tionCl``)               for ``*_tf``, ``mlp`` for ``*_rmlp_*``)
HaloNet ``HaloAttn``      ``foveal.nn.HaloAttention`` (zero borders,   unfold windows become ``PaddedHalo``
                          timm's ``stride``)
FocalNet                  ``foveal.nn.FocalModulation``                (no pattern: the same maths,
``FocalModulation``                                                    channels last inside)
DaViT ``SpatialBlock``,   ``foveal.nn.SpatialBlock``, ``ChannelBlock``  window partition becomes ``Window``
``ChannelBlock``
========================  ===========================================  ==================================

Everything else (stems, norms, MLPs, heads) stays timm's, and so does a ``HaloAttn`` that
average-pools (``avg_down``) or has ``qk_ratio != 1``.
In eval mode the converted model's logits equal the original's to float32 rounding at the
resolution it was built for (Swin's ``-100`` region mask becomes exact exclusion, a
difference below ``e^-90`` in the weights).

Resolutions: ``convert`` also lets Swin's patch embedding take any size (timm's
``strict_img_size``); a converted Swin then runs at any resolution whose stage grids the
window divides (448² for a 224² model), where the original refuses the input. HaloNet's
zero borders extend to grids the block does not divide (padded up to whole blocks with
zero keys), where timm's ``HaloAttn`` refuses them: ``halonet26t`` runs at 224², where its
stage grids are 14 and 7. MaxViT needs the partition to divide every stage grid, as
timm; DaViT pads to whole windows, as timm; FocalNet runs anywhere, as timm. Any
resolution at all: swap the pattern for one that takes any grid (a neighbourhood).

``swap_pattern(model, fn)`` (or ``convert(model, pattern=fn)``) is the research knob:
every converted attention module that attends over its own token grid (Swin, MaxViT,
DaViT windows) then attends under ``fn(name, module, grid)`` — a foveal ``Pattern`` over
that grid, or ``None`` to keep the module's own — with every weight kept. Swin's windows
for a neighbourhood::

    from foveal.patterns import Neighborhood, GlobalTokens
    model = convert(timm.create_model("swin_tiny_patch4_window7_224"))
    swap_pattern(model, lambda name, m, grid: Neighborhood(grid, m.window_size))
    swap_pattern(model, lambda name, m, grid: own_pattern(m, grid) | GlobalTokens(math.prod(grid), 4))

Learned relative-position tables keep their meaning: the bias of a pair is the table's
entry for its offset, clamped to the table's edge for offsets beyond it.
``swap_pattern(model, None)`` gives every module its own pattern back. timm is imported
lazily: foveal never requires it.
"""

from __future__ import annotations

import weakref

from torch import nn

from foveal.nn._common import set_pattern_override
from foveal.nn.davit import ChannelBlock, SpatialBlock, _WindowAttention
from foveal.nn.focal import FocalModulation
from foveal.nn.halo import HaloAttention
from foveal.nn.maxvit import MultiAxisAttention, _RelPosMlp
from foveal.nn.window import WindowAttention

__all__ = ["convert", "swap_pattern", "converted_modules", "own_pattern"]


def _timm():
    try:
        import timm  # noqa: F401
    except ImportError as e:  # pragma: no cover - the tests skip without timm
        raise ImportError("foveal.integrations.timm needs timm (pip install timm)") from e
    import timm.layers.halo_attn as halo
    import timm.layers.pos_embed_rel as rel
    import timm.models.davit as davit
    import timm.models.focalnet as focalnet
    import timm.models.maxxvit as maxxvit
    import timm.models.swin_transformer as swin

    return swin, maxxvit, halo, rel, focalnet, davit


def _drop_prob(module) -> float:
    return float(getattr(module, "drop_prob", 0.0) or 0.0)


def _load(new: nn.Module, old: nn.Module, what: str) -> nn.Module:
    """``new`` with ``old``'s state dict (strict), on ``old``'s device and dtype, in ``old``'s mode."""
    p = next(old.parameters())
    new = new.to(device=p.device, dtype=p.dtype)
    try:
        new.load_state_dict(old.state_dict(), strict=True)
    except RuntimeError as e:
        raise ValueError(f"convert: {what}: timm's weights do not fit foveal's module ({e})") from e
    return new.train(old.training)


def _subclass(cls, name, body):
    """A subclass of timm's ``cls`` whose attention path runs the foveal module (one per class)."""
    key = (cls, name)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Foveal{cls.__name__}", (cls,), dict(body, __module__=__name__))
    return _SUBCLASSES[key]


_SUBCLASSES: dict = {}


# -- Swin -------------------------------------------------------------------------------------
def _swin_attn(self, x):
    """The block's shifted-window attention on the whole (B, H, W, C) map: one foveal module call."""
    return self.attn(x)


def _convert_swin_block(blk, backend):
    attn = blk.attn
    dim = blk.dim
    if attn.qkv.out_features != 3 * dim:
        raise ValueError(f"convert: Swin block with head_dim * num_heads != dim ({attn.qkv.out_features // 3} != {dim})")
    new = WindowAttention(
        dim, attn.num_heads, window_size=tuple(blk.window_size), shift_size=tuple(blk.shift_size),
        qkv_bias=attn.qkv.bias is not None, qk_scale=attn.scale, backend=backend,
    )
    new.proj_drop.p = attn.proj_drop.p
    blk.attn = _load(new, attn, "Swin WindowAttention")
    blk.__class__ = _subclass(type(blk), "swin", {"_attn": _swin_attn})


# -- MaxViT -----------------------------------------------------------------------------------
def _partition_attn(self, x):
    """Block or grid attention on the whole (B, H, W, C) map (the partitions are the pattern's)."""
    return self.attn(x)


def _convert_partition(part, rel, backend):
    attn = part.attn
    dim = attn.qkv.in_features
    if attn.qkv.out_features != 3 * dim or attn.proj.out_features != dim:
        raise ValueError("convert: MaxViT attention whose width differs from its input's is not supported")
    rp = attn.rel_pos
    if rp is None:
        kind, hidden = None, None
    elif isinstance(rp, rel.RelPosBiasTf):
        kind, hidden = "bias_tf", None
    elif isinstance(rp, rel.RelPosMlp):
        if rp.mode != "cr" or rp.prefix_tokens:
            raise ValueError(f"convert: MaxViT RelPosMlp(mode={rp.mode!r}) is not supported (only mode='cr')")
        kind, hidden = "mlp", rp.mlp.fc1.out_features
    elif isinstance(rp, rel.RelPosBias):
        if rp.prefix_tokens:
            raise ValueError("convert: MaxViT RelPosBias with prefix tokens is not supported")
        kind, hidden = "bias", None
    else:
        raise ValueError(f"convert: MaxViT relative position {type(rp).__name__} is not supported")
    new = MultiAxisAttention(
        dim, attn.num_heads, tuple(part.partition_size), "block" if part.partition_block else "grid",
        rel_pos_bias=rp is not None, rel_pos_type=kind or "bias", head_first=bool(attn.head_first),
        qkv_bias=attn.qkv.bias is not None, qk_scale=attn.scale, attn_drop=0.0, proj_drop=attn.proj_drop.p,
        backend=backend,
    )
    if attn.proj.bias is None:
        raise ValueError("convert: MaxViT attention without a projection bias is not supported")
    if kind == "mlp" and hidden != new.rel_pos.mlp.fc1.out_features:
        new.rel_pos = _RelPosMlp(new.partition_size, attn.num_heads, hidden)
    part.attn = _load(new, attn, "MaxViT AttentionCl")
    part.__class__ = _subclass(type(part), "maxvit", {"_partition_attn": _partition_attn})


# -- HaloNet ----------------------------------------------------------------------------------
class _HaloAttentionNCHW(HaloAttention):
    """``foveal.nn.HaloAttention`` on timm's (B, C, H, W) maps (zero borders, timm's ``HaloAttn`` weights)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _convert_halo(attn, backend):
    if not isinstance(attn.pool, nn.Identity):
        return None  # timm's average-pooled HaloAttn (stride not dividing the block, or avg_down) stays
    dim = attn.q.in_channels
    if attn.dim_head_qk != attn.dim_head_v or attn.dim_out_v != dim:
        return None  # qk_ratio != 1 or dim_out != dim: not offered by foveal's module
    new = _HaloAttentionNCHW(
        dim, attn.num_heads, attn.block_size, attn.halo_size, stride=attn.block_stride,
        scale_pos_embed=bool(attn.scale_pos_embed), qkv_bias=attn.q.bias is not None, backend=backend,
    )
    return _load(new, attn, "HaloNet HaloAttn")


# -- FocalNet ---------------------------------------------------------------------------------
class _FocalModulationNCHW(FocalModulation):
    """``foveal.nn.FocalModulation`` on timm's (B, C, H, W) maps."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _convert_focal(mod):
    post = mod.use_post_norm
    new = _FocalModulationNCHW(
        mod.dim, mod.focal_window, mod.focal_level, mod.focal_factor, bias=mod.f.bias is not None,
        use_post_norm=post, normalize_modulator=mod.normalize_modulator,
        norm_eps=float(mod.norm.eps) if post else 1e-5, proj_drop=mod.proj_drop.p,
    )
    return _load(new, mod, "FocalNet FocalModulation")


# -- DaViT ------------------------------------------------------------------------------------
class _SpatialBlockNCHW(SpatialBlock):
    """``foveal.nn.SpatialBlock`` on timm's (B, C, H, W) maps."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ChannelBlockNCHW(ChannelBlock):
    """``foveal.nn.ChannelBlock`` on timm's (B, C, H, W) maps."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _davit_common(blk):
    dim = blk.norm1.normalized_shape[0]
    ffn = blk.mlp is not None
    mlp_ratio = blk.mlp.fc1.out_features / dim if ffn else 4.0
    cpe_act = isinstance(blk.cpe1.act, nn.GELU)
    return dim, ffn, mlp_ratio, cpe_act, _drop_prob(blk.drop_path1)


def _convert_davit(blk, davit, backend):
    dim, ffn, mlp_ratio, cpe_act, dp = _davit_common(blk)
    if isinstance(blk, davit.SpatialBlock):
        ws = tuple(blk.window_size)
        if ws[0] != ws[1]:
            raise ValueError(f"convert: DaViT SpatialBlock with a non-square window {ws} is not supported")
        new = _SpatialBlockNCHW(
            dim, blk.num_heads, ws[0], mlp_ratio, ffn, cpe_act, blk.attn.qkv.bias is not None, dp, backend=backend
        )
        return _load(new, blk, "DaViT SpatialBlock")
    v2 = isinstance(blk.attn, davit.ChannelAttentionV2)
    heads = blk.attn.groups if v2 else blk.attn.num_heads
    new = _ChannelBlockNCHW(dim, heads, mlp_ratio, ffn, cpe_act, v2, blk.attn.qkv.bias is not None, dp)
    if v2:
        new.attn.dynamic_scale = bool(blk.attn.dynamic_scale)
    return _load(new, blk, "DaViT ChannelBlock")


# -- the walk ---------------------------------------------------------------------------------
def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert(model: nn.Module, *, pattern=None, backend: str = "auto", relax_input_size: bool = True) -> nn.Module:
    """Replace, in place, the attention of a timm Swin, MaxViT, HaloNet, FocalNet or DaViT model by foveal modules.

    Weights are kept: each foveal module loads the timm module's state dict strictly,
    on its device and dtype. Returns ``model`` (the same object). ``pattern``: a
    ``swap_pattern`` function applied after the conversion. ``backend``: the foveal
    ``attend`` backend of every converted module. ``relax_input_size``: let Swin's patch
    embedding take any input size (timm's ``strict_img_size=False``), so the converted
    model runs at other resolutions. Raises ``ValueError`` when the model holds none of
    these attention modules, ``TypeError`` when ``model`` is not an ``nn.Module``.
    See the module docstring for what is replaced and which resolutions then run.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a timm model), got {type(model).__name__}")
    if not isinstance(relax_input_size, bool):
        raise TypeError(f"relax_input_size must be a bool, got {relax_input_size!r}")
    from foveal.nn._common import check_backend

    backend = check_backend(backend)
    swin, maxxvit, halo, rel, focalnet, davit = _timm()
    count = 0
    for name, mod in list(model.named_modules()):
        if type(mod).__module__ == __name__:
            continue  # converted already
        if isinstance(mod, swin.SwinTransformerBlock):
            _convert_swin_block(mod, backend)
        elif isinstance(mod, maxxvit.PartitionAttentionCl):
            _convert_partition(mod, rel, backend)
        elif isinstance(mod, halo.HaloAttn):
            new = _convert_halo(mod, backend)
            if new is None:
                continue
            _replace(model, name, new)
        elif isinstance(mod, focalnet.FocalModulation):
            _replace(model, name, _convert_focal(mod))
        elif isinstance(mod, (davit.SpatialBlock, davit.ChannelBlock)):
            _replace(model, name, _convert_davit(mod, davit, backend))
        else:
            continue
        count += 1
    if not count and not converted_modules(model):
        raise ValueError(
            "convert found no attention it knows in this model (timm Swin, MaxViT, HaloNet, FocalNet, DaViT); "
            f"got {type(model).__name__}"
        )
    if relax_input_size and any(isinstance(m, swin.SwinTransformerBlock) for m in model.modules()):
        for mod in model.modules():
            if hasattr(mod, "strict_img_size"):  # timm's PatchEmbed: any multiple of the patch size
                mod.strict_img_size = False
    if pattern is not None:
        swap_pattern(model, pattern)
    return model


_SWAPPABLE = (WindowAttention, MultiAxisAttention, _WindowAttention, HaloAttention)


def _swappable(module) -> bool:
    if isinstance(module, HaloAttention):
        return module.border == "mask"
    return isinstance(module, _SWAPPABLE)


def converted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The foveal attention modules in ``model`` whose pattern ``swap_pattern`` can change, with their names."""
    return [(n, m) for n, m in model.named_modules() if _swappable(m)]


class _Swap:
    """``grid -> fn(name, module, grid)`` for one module (held weakly: no reference cycle through the module)."""

    def __init__(self, fn, name, module):
        self.fn, self.name, self.module = fn, name, weakref.ref(module)

    def __call__(self, grid):
        return self.fn(self.name, self.module(), tuple(grid))


def own_pattern(module: nn.Module, grid):
    """``module``'s own pattern on ``grid``, ignoring any swap (what it attends under right after ``convert``)."""
    saved = module.__dict__.pop("pattern_override", None)
    try:
        return module.pattern(tuple(grid))
    finally:
        if saved is not None:
            module.pattern_override = saved


def swap_pattern(model: nn.Module, fn) -> list[str]:
    """Make every swappable foveal attention module of ``model`` attend under ``fn(name, module, grid)``.

    ``fn`` gets the module's name in ``model``, the module (its ``window_size``,
    ``partition_size``, ``kind``…; ``own_pattern(module, grid)`` is the pattern it had)
    and the token grid of the call, and returns a foveal ``Pattern`` over that grid (a
    self-attention pattern of ``prod(grid)`` tokens) or ``None`` to keep the module's
    own. No weight changes: relative-position tables are read at each pair's offset,
    clamped to the table. ``fn=None`` restores every module's own pattern. Swappable:
    ``WindowAttention`` (Swin), ``MultiAxisAttention`` (MaxViT), DaViT's window attention,
    ``HaloAttention(border="mask")``; convert's HaloNet modules (zero borders) are not,
    as their keys are the padded grid. Returns the names of the modules changed;
    ``ValueError`` if there are none.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if fn is not None and not callable(fn):
        raise TypeError(f"fn must be a callable (name, module, grid) -> Pattern | None, or None; got {fn!r}")
    names = []
    for name, mod in converted_modules(model):
        set_pattern_override(mod, None if fn is None else _Swap(fn, name, mod))
        names.append(name)
    if not names:
        raise ValueError(
            "swap_pattern found no foveal attention module with a swappable pattern in this model "
            "(convert a timm Swin, MaxViT or DaViT model first)"
        )
    return names
