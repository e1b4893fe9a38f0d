"""Random and optimised NPS attacks (Shen et al. 2020, 2.2.1-2.2.2) and their metrics (SAN, SAR, curves),
on a hand-built classifier whose decision is the mean HU of a small central region vs a threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ctharden.attacks.losses import AttackError
from ctharden.attacks.nps import optimized_nps_attack, random_nps_attack
from ctharden.attacks.nps_metrics import sar_above_curve
from ctharden.models import CTClassifier
from ctharden.noise import default_nps, estimate_nps, grid_variance

MAS = [10.0, 50.0, 100.0, 200.0, 500.0]
WINDOW = (-1000.0, 400.0)
T_HU = 0.0  # decision threshold on the central mean, HU
SHAPE = (8, 16, 16)  # (D, H, W): 16x16 axial slices, 1 mm


class RegionMean(nn.Module):
    """logit = gain · (mean of the central 2x2 column over all slices − threshold), model-input units."""

    def __init__(self, threshold: float, gain: float = 500.0) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))
        self.gain = gain

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, *spatial)
        h, w = x.shape[-2:]
        region = x[..., h // 2 - 1 : h // 2 + 1, w // 2 - 1 : w // 2 + 1]
        return (self.gain * (region.flatten(1).mean(1) - self.threshold))[:, None]


def hu_model() -> CTClassifier:
    t = (T_HU - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    return CTClassifier(RegionMean(t), arch="region_mean", arch_kwargs={}, spatial_dims=3, output="logit",
                        window_hu=WINDOW)


def cubes(offsets_hu: list[float] | Tensor) -> Tensor:
    """(N, 8, 16, 16) HU: lung background (−800 HU), central 2x2 column at T_HU + offset."""
    off = torch.as_tensor(offsets_hu, dtype=torch.float32)
    x = torch.full((off.shape[0], *SHAPE), -800.0)
    x[..., 7:9, 7:9] = T_HU + off[:, None, None, None]
    return x


OFFSETS = torch.linspace(-40.0, 40.0, 24)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_attack_san_monotone_and_metrics_consistent() -> None:
    model = hu_model()
    res = random_nps_attack(model, cubes(OFFSETS), MAS, k=16, spacing_mm=1.0, generator=gen())
    sans = [res[m].san for m in MAS]
    assert sans == sorted(sans, reverse=True), sans
    assert sans[0] > sans[-1] > 0  # noise flips more samples at low dose, but some even at 500 mAs
    assert np.array_equal(res.clean_pred, (OFFSETS > 0).long().numpy())
    for m in MAS:
        lv = res[m]
        assert lv.sar.shape == (24,) and lv.sar.min() >= 0 and lv.sar.max() <= 1
        assert lv.san_rate == pytest.approx(100.0 * lv.san / 24)
        assert np.array_equal(lv.flipped_any, lv.sar > 0)
        assert np.allclose(lv.sar * 16, np.round(lv.sar * 16))
    # JSON round trip and Table-2 rows
    d = json.loads(json.dumps(res.to_dict()))
    assert [lv["san"] for lv in d["levels"]] == sans
    rows = res.table()
    assert [r["mas"] for r in rows] == MAS and rows[0]["san_rate"] == res[10].san_rate


def test_far_sample_never_flipped_boundary_sample_flipped() -> None:
    model = hu_model()
    x = cubes([300.0, -300.0, 0.5, -0.5])
    res = random_nps_attack(model, x, [10.0, 500.0], k=32, spacing_mm=1.0, generator=gen(1))
    assert not res[500].flipped_any[:2].any() and not res[10].flipped_any[:2].any()
    assert res[10].flipped_any[2:].all()
    assert res[10].sar[2:].min() > 0.2  # about half the draws cross a 0.5 HU margin at σ ≈ 10 HU


def test_batching_and_determinism() -> None:
    model = hu_model()
    x = cubes(OFFSETS)
    a = random_nps_attack(model, x, MAS, k=8, spacing_mm=1.0, generator=gen(3), batch_size=1000)
    b = random_nps_attack(model, x, MAS, k=8, spacing_mm=1.0, generator=gen(3), batch_size=7)
    c = random_nps_attack(model, x, MAS, k=8, spacing_mm=1.0, generator=gen(3))
    for m in MAS:
        assert np.array_equal(a[m].sar, b[m].sar) and np.array_equal(a[m].sar, c[m].sar)
    kw = dict(restarts=3, step_hu=5.0, tol=1e-4, n_iter=5, return_perturbations=True)
    o1 = optimized_nps_attack(model, x[:6], 50.0, 1.0, generator=gen(4), batch_size=100, **kw)
    o2 = optimized_nps_attack(model, x[:6], 50.0, 1.0, generator=gen(4), batch_size=4, **kw)
    assert np.array_equal(o1[50].sar, o2[50].sar)
    assert torch.allclose(o1.perturbations[50.0], o2.perturbations[50.0], atol=1e-4)


def test_optimized_beats_random_and_keeps_nps() -> None:
    model = hu_model()
    x = cubes(OFFSETS)
    k, mas = 6, 100.0
    rnd = random_nps_attack(model, x, [mas], k=k, spacing_mm=1.0, generator=gen(5))
    opt = optimized_nps_attack(model, x, mas, 1.0, restarts=k, step_hu=4.0, tol=1e-4, n_iter=15,
                               generator=gen(5), return_perturbations=True)
    assert opt[mas].san >= rnd[mas].san
    assert opt[mas].san > rnd[mas].san  # it deliberately searches: strictly more here
    assert np.all(opt[mas].flipped_any[rnd[mas].flipped_any])
    # the final perturbations are realistic CT noise: radial NPS of the mAs level
    p = opt.perturbations[mas]
    assert p.shape == (24, k, *SHAPE)
    freqs, est = estimate_nps(p, 1.0)
    target = default_nps()(freqs, mas).numpy()
    est = est.numpy()
    band = (freqs.numpy() > 0.1) & (freqs.numpy() < 0.5)
    assert np.allclose(est[band], target[band], rtol=0.25), (est[band], target[band])
    # and not arbitrary: the same total power as a random sample at this mAs
    var = p.square().flatten(2).mean(2)  # per (sample, restart)
    assert torch.allclose(var, torch.full_like(var, grid_variance(SHAPE[1:], 1.0, mas)), rtol=0.05)


def test_covid_style_display_units_match_hu_model() -> None:
    lo, hi = WINDOW
    t = (T_HU - lo) / (hi - lo)
    disp = CTClassifier(RegionMean(t), arch="region_mean2d", arch_kwargs={}, spatial_dims=2, output="logit",
                        window_hu=None)
    hu2d = CTClassifier(RegionMean(t), arch="region_mean2d", arch_kwargs={}, spatial_dims=2, output="logit",
                        window_hu=WINDOW)
    x_hu = cubes(OFFSETS)[:, 4]  # (N, 16, 16) single slices
    x_disp = (x_hu - lo) / (hi - lo)
    with pytest.raises(AttackError, match="hu_per_unit"):
        random_nps_attack(disp, x_disp, [50.0], k=2, spacing_mm=0.7)
    with pytest.raises(AttackError, match="own HU window"):
        random_nps_attack(hu2d, x_hu, [50.0], k=2, spacing_mm=0.7, hu_per_unit=1400.0)
    a = random_nps_attack(disp, x_disp, MAS, k=8, spacing_mm=0.7, hu_per_unit=hi - lo, generator=gen(6))
    b = random_nps_attack(hu2d, x_hu, MAS, k=8, spacing_mm=0.7, generator=gen(6))
    sans = [a[m].san for m in MAS]
    assert sans == [b[m].san for m in MAS] and sans[0] > 0
    assert sans == sorted(sans, reverse=True)
    o = optimized_nps_attack(disp, x_disp, 50.0, 0.7, restarts=2, step_hu=5.0, tol=1e-3, n_iter=4,
                             hu_per_unit=hi - lo, generator=gen(7), autocast=True)
    assert o[50].san >= 0 and o.settings["projection_pool"] == "sample"


def test_model_state_restored() -> None:
    model = hu_model()
    model.train()
    model.net.threshold.requires_grad_(True)
    random_nps_attack(model, cubes(OFFSETS[:4]), [100.0], k=2, spacing_mm=1.0, generator=gen())
    assert model.training and model.net.training and model.net.threshold.requires_grad
    model.net.eval()
    model.net.threshold.requires_grad_(False)
    optimized_nps_attack(model, cubes(OFFSETS[:4]), 100.0, 1.0, restarts=2, step_hu=3.0, tol=1e-3, n_iter=3,
                         generator=gen())
    assert model.training and not model.net.training and not model.net.threshold.requires_grad
    assert model.net.threshold.grad is None


def test_sar_above_curve() -> None:
    sar = np.array([0.0, 0.0, 0.1, 0.25, 0.5, 1.0, 0.05, 0.0])
    c = sar_above_curve(sar)
    pct = np.array(c["percent_of_samples_with_sar_above_level"])
    assert c["levels"][0] == 0.0 and len(c["levels"]) == 21
    assert pct[0] == pytest.approx(100 * np.mean(sar > 0)) and pct[-1] == 0.0
    assert np.all(np.diff(pct) <= 0)
    c2 = sar_above_curve(sar, levels=[0.5, 0.0, 0.2])
    assert c2["levels"] == [0.0, 0.2, 0.5]
    assert c2["percent_of_samples_with_sar_above_level"] == pytest.approx([62.5, 37.5, 12.5])
    with pytest.raises(AttackError):
        sar_above_curve(np.array([1.5]))


def test_bad_arguments() -> None:
    model = hu_model()
    x = cubes([1.0, 2.0])
    with pytest.raises(AttackError):
        random_nps_attack(model, x, [], k=2, spacing_mm=1.0)
    with pytest.raises(AttackError):
        random_nps_attack(model, x, [0.0], k=2, spacing_mm=1.0)
    with pytest.raises(AttackError):
        random_nps_attack(model, x, [10.0], k=0, spacing_mm=1.0)
    with pytest.raises(AttackError):
        optimized_nps_attack(model, x, 10.0, 1.0, restarts=1, step_hu=0.0, tol=1e-3, n_iter=2)
