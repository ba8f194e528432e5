"""STGP template: patching, task masks and scored cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from stgray.data.prepare import Prepared
from stgray.errors import ConfigError
from stgray.nn.stgp.template import PatchTemplate, node_mask


def test_forecast_template_12_in_6_out():
    t = PatchTemplate.for_forecast(12, 6, patch_len=6)
    assert (t.patch_len, t.num_patches, t.horizon_patches) == (6, 3, 1)
    assert (t.window_len, t.history_steps, t.horizon_steps) == (18, 12, 6)
    t3 = PatchTemplate.for_forecast(12, 6, patch_len=3)
    assert (t3.num_patches, t3.horizon_patches) == (6, 2)
    with pytest.raises(ConfigError, match="multiples"):
        PatchTemplate.for_forecast(12, 6, patch_len=4)
    with pytest.raises(ConfigError):
        PatchTemplate(patch_len=6, num_patches=3, horizon_patches=3)


def test_patchify_roundtrip_and_steps_mask():
    t = PatchTemplate(patch_len=4, num_patches=3)
    x = torch.arange(2 * 5 * 12.0).view(2, 5, 12)
    p = t.patchify(x)
    assert p.shape == (2, 5, 3, 4) and torch.equal(p[0, 0, 1], torch.tensor([4.0, 5, 6, 7]))
    assert torch.equal(t.unpatchify(p), x)
    m = torch.tensor([[[False, True, False]]])
    assert torch.equal(t.steps_mask(m)[0, 0], torch.tensor([False] * 4 + [True] * 4 + [False] * 4))
    with pytest.raises(ValueError, match="template needs"):
        t.patchify(torch.zeros(1, 1, 10))


def test_forecast_mask_is_last_patches_of_every_node():
    t = PatchTemplate(patch_len=6, num_patches=4, horizon_patches=2)
    m, score = t.task_masks("forecast", 3, 5)
    assert m.shape == (3, 5, 4) and m.dtype == torch.bool
    assert m[..., 2:].all() and not m[..., :2].any()
    assert torch.equal(score, m)


def test_kriging_masks_exactly_the_unobserved_nodes():
    t = PatchTemplate(patch_len=6, num_patches=3)
    un = np.array([1, 4])
    m, score = t.task_masks("kriging", 2, 6, unobserved=un)
    masked_nodes = m.any(-1)
    assert m.shape == (2, 6, 3)
    assert torch.equal(masked_nodes, torch.tensor([[False, True, False, False, True, False]] * 2))
    assert torch.equal(m.all(-1), masked_nodes)  # every patch of those nodes
    assert torch.equal(score, m)
    # the same from a bool node mask, and per-sample node masks
    assert torch.equal(t.kriging_mask(2, 6, torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool)), m)
    per = torch.zeros(2, 6, dtype=torch.bool)
    per[0, 0] = per[1, 5] = True
    mp = t.kriging_mask(2, 6, per)
    assert mp[0, 0].all() and mp[1, 5].all() and mp.sum() == 2 * 3
    with pytest.raises(ValueError, match="out of range"):
        t.kriging_mask(1, 6, [6])


def test_extrapolation_masks_unobserved_and_horizon_scores_horizon_of_unobserved():
    t = PatchTemplate(patch_len=6, num_patches=3)
    un = [0, 2]
    m, score = t.task_masks("extrapolation", 2, 4, unobserved=un)
    for n in range(4):
        if n in un:
            assert m[:, n].all()
        else:
            assert torch.equal(m[:, n], torch.tensor([[False, False, True]] * 2))
    expect = torch.zeros(2, 4, 3, dtype=torch.bool)
    expect[:, un, 2] = True
    assert torch.equal(score, expect)
    assert not (score & ~m).any()  # scored cells are always masked
    with pytest.raises(ValueError, match="unobserved"):
        t.task_masks("extrapolation", 2, 4)


def test_pretrain_mask_ratios_and_seed():
    t = PatchTemplate(patch_len=12, num_patches=20)
    B, N = 16, 50
    g = torch.Generator().manual_seed(3)
    m, score = t.task_masks("pretrain", B, N, generator=g)
    assert m.shape == (B, N, 20) and torch.equal(score, m)
    whole_nodes = m.all(-1)  # (B, N)
    assert (whole_nodes.sum(1) == 25).all()  # 50% of nodes
    visible_node = ~whole_nodes
    for b in range(B):  # the same 10 patches are masked at every other node
        rows = m[b][visible_node[b]]
        assert (rows == rows[0]).all() and int(rows[0].sum()) == 10
    assert abs(m.float().mean().item() - 0.75) < 1e-6
    m2 = t.pretrain_mask(B, N, generator=torch.Generator().manual_seed(3))
    m3 = t.pretrain_mask(B, N, generator=torch.Generator().manual_seed(4))
    assert torch.equal(m, m2) and not torch.equal(m, m3)
    # patches drawn per node: each visible node has its own 10 masked patches
    mi = t.pretrain_mask(B, N, ratio_patch=0.5, ratio_node=0.2, shared_patches=False,
                         generator=torch.Generator().manual_seed(0))
    vis_rows = mi[~mi.all(-1)]
    assert (vis_rows.sum(-1) == 10).all() and not (vis_rows == vis_rows[0]).all()
    assert ((mi.all(-1)).sum(1) == 10).all()
    # ratios are clipped so a sample always keeps a visible cell
    mf = t.pretrain_mask(2, 3, ratio_patch=1.0, ratio_node=1.0)
    assert (~mf).flatten(1).any(1).all()
    with pytest.raises(ConfigError):
        t.pretrain_mask(1, 3, ratio_patch=1.5)


def test_unknown_task():
    with pytest.raises(ConfigError, match="unknown task"):
        PatchTemplate().task_masks("classify", 1, 2)


def test_node_mask_forms():
    a = node_mask([2], 2, 3)
    assert torch.equal(a, torch.tensor([[False, False, True]] * 2))
    assert torch.equal(node_mask(np.array([2]), 2, 3), a)
    with pytest.raises(ValueError, match="shape"):
        node_mask(torch.zeros(4, dtype=torch.bool), 2, 3)


def _prepared(t_steps: int = 24 * 8, n: int = 3) -> Prepared:
    raw = np.arange(t_steps * n, dtype=np.float32).reshape(t_steps, n)
    ts = pd.date_range("2024-01-01", periods=t_steps, freq="h")
    return Prepared(name="toy", role="target", raw=raw, x=(raw - 1) / 2, mean=1.0, std=2.0,
                    tod=ts.hour.to_numpy().astype(np.int64), dow=ts.day_of_week.to_numpy().astype(np.int64),
                    adj=np.eye(n, dtype=np.float32),
                    splits={"train": (0, 72), "val": (72, 144), "test": (144, t_steps)},
                    unobserved=np.array([1]), step_s=3600, start=pd.Timestamp("2024-01-01"))


def test_window_starts_and_batch():
    p = _prepared()
    t = PatchTemplate.for_forecast(12, 6, patch_len=6)
    # forecast: the horizon lies in val, the history may reach back into train
    s = t.window_starts(p, "val", "forecast")
    assert s[0] == 72 - 12 and s[-1] + 18 == 144
    # kriging / pretrain: the whole window lies in the split
    k = t.window_starts(p, "val", "kriging")
    assert k[0] == 72 and k[-1] + 18 == 144
    b = t.batch(p, s[:2])
    assert b.x.shape == (2, 3, 18) and b.tod.shape == (2, 18) and b.dow.shape == (2, 18)
    assert b.x.dtype == torch.float32 and b.tod.dtype == torch.int64
    np.testing.assert_array_equal(b.x[0, 2].numpy(), p.x[60:78, 2])
    np.testing.assert_array_equal(b.tod[1].numpy(), p.tod[61:79])
