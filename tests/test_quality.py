"""The quality benchmarks: tasks mean what they say, every mixer trains in the backbone, the harness writes its report."""

import dataclasses
import json

import pytest
import torch

from foveal.bench import lm_tasks as T
from foveal.bench import quality_lm as QL
from foveal.bench import quality_vision as QV
from foveal.bench.train import Budget
from foveal.bench.vision_tasks import TASKS, cue_segmentation, match, pathfinder
from foveal.models import Classifier, Segmenter, mixer_names
from foveal.patterns import Causal, SlidingWindow


# -- vision tasks ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [pathfinder, match, cue_segmentation])
def test_vision_tasks_are_deterministic_and_balanced(make):
    x1, y1 = make(40, size=32, seed=3)
    x2, y2 = make(40, size=32, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (40, 1, 32, 32)
    assert not torch.equal(make(40, size=32, seed=4)[0], x1)
    labels = y1 if y1.dim() == 1 else y1.flatten(1).max(1).values - 1
    assert labels.float().mean().item() == 0.5


def test_match_labels_say_whether_the_two_glyphs_are_equal():
    from foveal.bench.vision_tasks import GLYPHS

    x, y = match(30, size=24, seed=0)
    third = 24 // 3
    for img, label in zip(x[:, 0], y):
        found = []
        for c0, c1 in ((0, third), (24 - third, 24)):
            hits = [(r, c) for r in range(22) for c in range(c0, c1 - 2)
                    if any(torch.equal(img[r : r + 3, c : c + 3], 0.2 + 0.8 * gl) for gl in GLYPHS)]
            assert len(hits) == 1
            r, c = hits[0]
            found.append(img[r : r + 3, c : c + 3])
        assert torch.equal(found[0], found[1]) == bool(label)


def test_match_scale_draws_aligned_enlarged_glyphs():
    from foveal.bench.vision_tasks import GLYPHS

    size, scale = 32, 2
    x, y = match(20, size=size, seed=3, scale=scale)
    third, g = size // 3, 3 * scale
    for img, label in zip(x[:, 0], y):
        found = []
        for c0, c1 in ((0, third), (size - third, size)):
            big = [gl.repeat_interleave(scale, 0).repeat_interleave(scale, 1) for gl in GLYPHS]
            hits = [(r, c) for r in range(size - g + 1) for c in range(c0, c1 - g + 1)
                    if any(torch.equal(img[r : r + g, c : c + g], 0.2 + 0.8 * gl) for gl in big)]
            assert len(hits) == 1 and hits[0][0] % scale == 0 and hits[0][1] % scale == 0
            r, c = hits[0]
            found.append(img[r : r + g, c : c + g])
        assert torch.equal(found[0], found[1]) == bool(label)


def test_cue_segmentation_class_is_given_by_the_cue_in_a_corner():
    x, masks = cue_segmentation(30, size=32, seed=0)
    for img, mask in zip(x[:, 0], masks):
        cls = int(mask.max())
        corners = [img[:4, :4], img[:4, -4:], img[-4:, :4], img[-4:, -4:]]
        cue = [c for c in corners if c.max() == 1.0]
        assert len(cue) == 1
        assert (cls == 2) == bool((cue[0] == 1).all())
        assert set(mask.unique().tolist()) == {0, cls}


def test_pathfinder_dots_are_path_ends():
    x, y = pathfinder(10, size=32, seed=0)
    for img in x[:, 0]:
        assert (img == 1.0).sum() >= 9  # two 3×3 dots (clipped at most by the margin)


# -- backbone ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixer", mixer_names())
def test_backbone_trains_with_every_mixer(mixer):
    torch.manual_seed(0)
    model = Classifier(2, mixer=mixer, in_chans=1, img_size=16, dims=(8, 16), depths=(1, 1), heads=(2, 2))
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([0, 1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_segmenter_gives_per_pixel_logits():
    model = Segmenter(3, mixer="neighborhood", in_chans=1, img_size=16, dims=(8, 16), depths=(1, 1), heads=(2, 2))
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3, 16, 16)


def test_backbone_refuses_bad_configurations():
    with pytest.raises(ValueError, match="mixer must be one of"):
        Classifier(2, mixer="nope", img_size=16, dims=(8,), depths=(1,), heads=(2,))
    with pytest.raises(ValueError, match="img_size must be divisible"):
        Classifier(2, img_size=18, dims=(8, 16), depths=(1, 1), heads=(2, 2))
    with pytest.raises(ValueError, match="one entry per stage"):
        Classifier(2, img_size=16, dims=(8, 16), depths=(1,), heads=(2, 2))
    model = Classifier(2, img_size=16, dims=(8,), depths=(1,), heads=(2,))
    with pytest.raises(ValueError, match="images must be"):
        model(torch.randn(1, 3, 8, 8))


def test_vision_harness_writes_table_json_and_plot(tmp_path, monkeypatch):
    tiny = QV.Suite(("match", "cue-seg"), ("neighborhood", "focal"), 16, 8, Budget(steps=2, batch=4),
                    dict(img_size=16, dims=(8, 16), depths=(1, 1), heads=(2, 2)), seeds=(0, 1), steps={"cue-seg": 3})
    monkeypatch.setitem(QV.SUITES, "tiny", tiny)
    result = QV.run_vision_quality("tiny", tmp_path, progress_bar=False)
    assert [(r["task"], r["mixer"], r["seed"], r["steps"]) for r in result["rows"]] == [
        ("match", "neighborhood", 0, 2), ("match", "neighborhood", 1, 2), ("match", "focal", 0, 2),
        ("match", "focal", 1, 2), ("cue-seg", "neighborhood", 0, 3), ("cue-seg", "neighborhood", 1, 3),
        ("cue-seg", "focal", 0, 3), ("cue-seg", "focal", 1, 3)]
    for r in result["rows"]:
        assert r["status"] == "ok" and 0 <= r["value"] <= 1 and r["flops"] > 0 and r["params"] > 0
    # the seeds train different models: the same mixer's two rows differ
    a, b = result["rows"][4:6]
    assert a["value"] != b["value"] or a["train_s"] != b["train_s"]
    saved = json.loads((tmp_path / "quality-vision.json").read_text())
    assert saved["suite"] == "tiny" and saved["budget"]["seeds"] == [0, 1]
    assert saved["budget"]["steps_per_task"] == {"match": 2, "cue-seg": 3}
    assert (tmp_path / "quality-vision.png").stat().st_size > 0
    text = (tmp_path / "quality-vision.md").read_text()
    assert "neighborhood" in text and "±" in text and "seeds [0, 1]" in text
    with pytest.raises(ValueError, match="suite must be one of"):
        QV.run_vision_quality("nope", tmp_path)


def test_vision_summary_and_calibration():
    rows = [dict(task="match", mixer="global", metric="accuracy", seed=s, steps=9, status="ok", value=v,
                 train_s=1.0, params=5, flops=7) for s, v in enumerate((0.8, 1.0, 0.9))]
    rows += [dict(task="cue-seg", mixer="global", metric="mIoU", seed=0, steps=9, status="ok", value=0.5,
                  train_s=1.0, params=5, flops=7),
             dict(task="cue-seg", mixer="focal", metric="mIoU", seed=0, steps=9, status="diverged: x")]
    by = {(e["task"], e["mixer"]): e for e in QV.summarise(rows)}
    e = by["match", "global"]
    assert e["mean"] == pytest.approx(0.9) and e["std"] == pytest.approx(0.1) and (e["min"], e["max"]) == (0.8, 1.0)
    assert "mean" not in by["cue-seg", "focal"] and by["cue-seg", "focal"]["status"].startswith("diverged")
    cal = QV.calibration(rows)
    assert cal["match"]["calibrated"] and not cal["cue-seg"]["calibrated"]
    table = QV.format_table(rows)
    assert "0.900 ± 0.100 (0.80–1.00)" in table and "cue-seg: full attention 0.500 (needed 0.9) — NOT calibrated" in table


def test_evaluate_miou_is_the_mean_over_classes():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 3, 2, 2)
            logits[:, 0] = 1  # predicts class 0 everywhere
            return logits

    labels = torch.tensor([[[0, 0], [1, 2]]])
    # class 0: inter 2, union 4 → 0.5; class 1: 0/1; class 2: 0/1
    assert QV.evaluate(Fixed(), TASKS["cue-seg"], torch.zeros(1, 1, 2, 2), labels) == pytest.approx(0.5 / 3)


# -- LM tasks ---------------------------------------------------------------------------------------------------------
def test_passkey_target_is_the_token_after_the_key_marker():
    tokens, targets = T.passkey(20, 50, seed=0, depths=(0.0, 0.5, 0.9))
    for t, y in zip(tokens, targets):
        pos = (t == T.KEY).nonzero().flatten()
        assert len(pos) == 1 and t[-1] == T.QUERY
        assert y[-1] == t[pos[0] + 1] and (y[:-1] == T.IGNORE).all()


def test_mqar_targets_are_the_values_of_the_queried_keys():
    tokens, targets = T.mqar(10, 40, seed=0, pairs=5)
    for t, y in zip(tokens, targets):
        table = {int(t[i]): int(t[i + 1]) for i in range(0, 10, 2)}
        asked = (y != T.IGNORE).nonzero().flatten()
        assert len(asked) == 5
        for i in asked:
            assert table[int(t[i])] == int(y[i])


def test_icl_regression_ridge_is_exact_without_noise():
    tokens, y = T.icl_regression(16, 24, seed=0, dim=4)
    ridge, gd = T.ridge_and_gd(tokens, lam=1e-9)
    torch.testing.assert_close(ridge, y, atol=1e-4, rtol=1e-4)
    assert (gd - y).square().mean() > 1e-3


def test_cross_recall_pairs_are_visible_to_their_query_under_causal_cross():
    src, values = T.cross_recall(4, 40, seed=0, pairs=8)
    p = Causal(8, n_kv=40)
    for t, v in zip(src, values):
        pos = (t == T.KEY).nonzero().flatten()
        assert torch.equal(t[pos + 1], v)
        for i, j in enumerate(pos + 1):
            assert bool(p.mask(torch.tensor(i), j))


def test_match_density_hits_the_target():
    dense = Causal(256)
    pattern, knob, density = QL.match_density(lambda k: SlidingWindow(256, k), dense, 0.25, hi=256)
    exact = pattern.density() * 256 * 256 / (dense.density() * 256 * 256)
    assert density == pytest.approx(exact)
    assert abs(density - 0.25) < 0.01
    assert isinstance(pattern, SlidingWindow) and pattern.left == knob


def test_lm_harness_runs_every_task_family(tmp_path, monkeypatch):
    spec = QL.SUITES["lm-quick"]
    tiny = dataclasses.replace(spec, tasks=tuple(dataclasses.replace(t, n=48) for t in spec.tasks),
                               patterns={f: ("full", "window") for f in QL.FAMILIES}, train=16, test=8,
                               budget=Budget(steps=1, batch=4))
    monkeypatch.setitem(QL.SUITES, "tiny", tiny)
    result = QL.run_lm_quality("tiny", tmp_path, progress_bar=False)
    rows = result["rows"]
    assert len(rows) == 2 * len(spec.tasks)
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert all(r["density"] == 1.0 for r in rows if r["pattern"] == "full")
    assert all(abs(r["density"] - 0.25) < 0.1 for r in rows if r["pattern"] == "window")
    icl = next(r for r in rows if r["task"] == "icl-regression")
    assert {"nmse", "nmse_2L", "ridge_nmse", "gd_nmse"} <= set(icl)
    assert (tmp_path / "quality-lm.png").exists() and (tmp_path / "quality-lm.md").exists()


def test_passkey_value_appears_only_once():
    tokens, targets = T.passkey(20, 64, seed=1)
    for t, y in zip(tokens, targets):
        assert (t == y[-1]).sum() == 1


def test_flops_are_counted_in_eval_mode_and_the_mode_restored():
    # VWFormer's pooled branch has a batch norm over one pooled value per channel: one image cannot train it
    model = Classifier(2, mixer="vwa", in_chans=1, img_size=16, dims=(16, 32), depths=(1, 1), heads=(2, 2))
    assert QV.flops_per_image(model, torch.randn(2, 1, 16, 16)) > 0
    assert model.training
