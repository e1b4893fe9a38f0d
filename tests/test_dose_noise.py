"""Dose-aware NPS noise (``robustness.noise.mode: dose``, :mod:`ctharden.noise.dose`): the 1/mAs law
of a rescan at a lower dose, its counting, and its wiring into the NPS attacks and the evaluation.

The variance check simulates a scan: noise-only images (zero background) with their own NPS noise at
the scan mAs s, plus the dose-mode increment for a target t; the total must have the noise of a scan
at t: variance σ²(t) (measured: within 0.3 % with 256 × 64² pixels per case; asserted within 3 %)
and the NPS of t.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from ctharden.attacks.losses import AttackError
from ctharden.attacks.nps import optimized_nps_attack, random_nps_attack
from ctharden.config.robustness import job_settings, noise_mode, parse_settings
from ctharden.core.errors import ConfigError, DataError
from ctharden.data.arrays import ArraySet
from ctharden.evaluation.robustness import nps_tables, optimized_nps_run, random_nps_run, scan_mas_of
from ctharden.noise import (
    NoiseConfig,
    count_dose_cases,
    default_nps,
    dose_cases,
    dose_scale,
    estimate_nps,
    grid_variance,
    sample_dose_noise,
    sample_nps_noise,
)

NAN = math.nan
SPACING = 0.7  # mm, the nodule2d pixel size
HW = (64, 64)
N_VAR = 256  # noise-only slices per variance case: 256 x 64 x 64 ≈ 1.05 M pixels
VAR_TOL = 0.03  # relative


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# the law


def test_dose_scale_and_cases() -> None:
    scan = torch.tensor([NAN, 250.0, 100.0, 50.0, 40.0])
    a = dose_scale(50.0, scan)
    expected = torch.tensor([1.0, math.sqrt(1 - 50 / 250), math.sqrt(0.5), 0.0, 0.0], dtype=torch.float64)
    assert a.dtype == torch.float64 and a.shape == (5,)
    assert torch.allclose(a, expected)
    assert dose_cases(50.0, scan) == ["additive_fallback", "dose", "dose", "none", "none"]
    c = count_dose_cases(50.0, scan)
    assert c.to_dict() == {"mode": "dose", "target_mas": 50.0, "n": 5, "dose": 2, "none": 2, "additive_fallback": 1}
    # a² σ²(t) = σ²(t) − σ²(s), with σ² from the NPS model's 1/mAs law
    nps = default_nps()
    for s, t in [(250.0, 10.0), (130.0, 100.0), (350.0, 200.0)]:
        a2 = float(dose_scale(t, [s])[0]) ** 2
        assert a2 * nps.sigma(t) ** 2 == pytest.approx(nps.sigma(t) ** 2 - nps.sigma(s) ** 2, rel=1e-12)
    with pytest.raises(DataError, match="positive and finite"):
        dose_scale(50.0, [100.0, 0.0])
    with pytest.raises(DataError, match="positive and finite"):
        dose_scale(50.0, [math.inf])
    with pytest.raises(DataError, match="target mAs"):
        dose_scale(-1.0, [100.0])


@pytest.mark.parametrize(("scan", "target"), [(250.0, 10.0), (250.0, 100.0), (130.0, 100.0), (350.0, 200.0)])
def test_rescan_has_the_target_noise(scan: float, target: float) -> None:
    """Own scan noise at s + the dose increment for t < s = noise of a scan at t (variance and NPS)."""
    shape = (N_VAR, *HW)
    image = torch.zeros(shape)  # constant background: what remains is noise
    own = sample_nps_noise(shape, scan, SPACING, generator=gen(1))  # the scan's own noise (additive draw at s)
    inc = sample_dose_noise(shape, target, torch.full((N_VAR,), scan), SPACING, generator=gen(2))
    total = (image + own + inc).double()
    var_t, var_s = grid_variance(HW, SPACING, target), grid_variance(HW, SPACING, scan)
    assert float(total.square().mean()) == pytest.approx(var_t, rel=VAR_TOL)
    assert float(inc.double().square().mean()) == pytest.approx(var_t - var_s, rel=VAR_TOL)
    # the grid variance is the band-limited part of the model's σ²(t) (≈ 1 % above Nyquist at 0.7 mm)
    assert var_t == pytest.approx(default_nps().sigma(target) ** 2, rel=0.03)
    # same NPS shape: the radial NPS of the total is the NPS at t where it carries power
    freqs, est = estimate_nps(total, SPACING)
    ref = default_nps()(freqs, target)
    strong = ref > 0.2 * ref.max()
    assert torch.allclose(est[strong], ref[strong], rtol=0.1)


def test_target_at_or_above_scan_adds_nothing() -> None:
    scan = torch.tensor([100.0, 100.0, 50.0])
    noise = sample_dose_noise((3, *HW), 100.0, scan, SPACING, generator=gen(3))
    assert noise[:2].abs().max() == 0.0 and noise[2].abs().max() == 0.0
    assert count_dose_cases(100.0, scan).none == 3
    assert count_dose_cases(500.0, scan).to_dict()["none"] == 3


def test_unknown_mas_is_additive_and_counted() -> None:
    scan = torch.tensor([NAN, 300.0, NAN, 20.0])
    dose = sample_dose_noise((4, *HW), 50.0, scan, SPACING, generator=gen(4))
    additive = sample_nps_noise((4, *HW), 50.0, SPACING, generator=gen(4))
    assert torch.equal(dose[[0, 2]], additive[[0, 2]])  # unknown: exactly the paper's draw
    assert torch.allclose(dose[1], additive[1] * math.sqrt(1 - 50 / 300))
    assert dose[3].abs().max() == 0.0
    c = count_dose_cases(50.0, scan)
    assert (c.n, c.dose, c.none, c.additive_fallback) == (4, 1, 1, 2)
    assert count_dose_cases(50.0, [NAN] * 3).additive_fallback == 3


# --------------------------------------------------------------------------------------------------
# attacks

T_HU = 0.0
AT_HW = (16, 16)


class CentralMean(nn.Module):
    """logit = gain · (mean HU of the central 2x2 pixels − threshold); takes HU ``(N, 1, H, W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(T_HU))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        region = x[..., h // 2 - 1 : h // 2 + 1, w // 2 - 1 : w // 2 + 1]
        return (10.0 * (region.flatten(1).mean(1) - self.threshold))[:, None]


def slices(offsets: Tensor) -> Tensor:
    """(N, 1, 16, 16) HU: background −800 HU, central 2x2 at T_HU + offset."""
    x = torch.full((offsets.shape[0], 1, *AT_HW), -800.0)
    x[..., 7:9, 7:9] = T_HU + offsets[:, None, None, None]
    return x


N_AT = 12
OFFSETS = torch.linspace(-30.0, 30.0, N_AT)
# unknown, high-dose (dose at every level), 60 mAs (none at 100), 8 mAs (none everywhere)
SCAN = torch.tensor([NAN, 400.0, 60.0, 8.0] * (N_AT // 4))
LEVELS = [10.0, 50.0, 100.0]


def test_random_attack_dose_mode_reports_counts() -> None:
    model, x = CentralMean(), slices(OFFSETS)
    add = random_nps_attack(model, x, LEVELS, 8, 1.0, generator=gen(5))
    dose = random_nps_attack(model, x, LEVELS, 8, 1.0, generator=gen(5), noise_mode="dose", scan_mas=SCAN)
    fallback, none_all = torch.isnan(SCAN).numpy(), (SCAN == 8.0).numpy()
    for m in LEVELS:
        noise = dose[m].noise
        assert noise is not None
        cases = dose_cases(m, SCAN)
        assert (noise.n, noise.dose, noise.none, noise.additive_fallback) == (
            N_AT, cases.count("dose"), cases.count("none"), cases.count("additive_fallback"))
        assert np.array_equal(dose[m].sar[fallback], add[m].sar[fallback])  # unknown mAs: the additive result
        assert (dose[m].sar[none_all] == 0).all()  # nothing added: never flipped
        assert dose[m].sar.sum() <= add[m].sar.sum()  # lower-dose increments flip no more here
    assert dose[100.0].noise is not None and dose[100.0].noise.none == 2 * N_AT // 4  # 60 and 8 mAs scans
    out = json.loads(json.dumps(dose.to_dict()))
    assert out["settings"]["noise_mode"] == "dose"
    assert out["levels"][0]["noise"] == dose[10.0].noise.to_dict()


def test_additive_default_unchanged() -> None:
    model, x = CentralMean(), slices(OFFSETS)
    default = random_nps_attack(model, x, LEVELS, 4, 1.0, generator=gen(6))
    explicit = random_nps_attack(model, x, LEVELS, 4, 1.0, generator=gen(6), noise_mode="additive")
    all_unknown = random_nps_attack(model, x, LEVELS, 4, 1.0, generator=gen(6), noise_mode="dose", scan_mas=None)
    assert json.dumps(default.to_dict()) == json.dumps(explicit.to_dict())
    assert "noise" not in json.dumps(default.to_dict())  # the additive JSON has no noise block
    for m in LEVELS:
        assert np.array_equal(all_unknown[m].sar, default[m].sar)
        assert all_unknown[m].noise is not None and all_unknown[m].noise.additive_fallback == N_AT
    with pytest.raises(AttackError, match="only used with noise_mode='dose'"):
        random_nps_attack(model, x, LEVELS, 1, 1.0, scan_mas=SCAN)
    with pytest.raises(AttackError, match="noise_mode"):
        random_nps_attack(model, x, LEVELS, 1, 1.0, noise_mode="rescan")
    with pytest.raises(AttackError, match="one value per sample"):
        random_nps_attack(model, x, LEVELS, 1, 1.0, noise_mode="dose", scan_mas=SCAN[:3])


def test_optimized_attack_dose_budget() -> None:
    """Each final perturbation has the NPS a² · S_t: variance a² · σ²_grid(t); a = 0 chains stay 0."""
    model, x, m = CentralMean(), slices(OFFSETS), 50.0
    kw = {"restarts": 2, "step_hu": 5.0, "tol": 1e-3, "n_iter": 3, "generator": gen(7), "return_perturbations": True}
    res = optimized_nps_attack(model, x, m, 1.0, noise_mode="dose", scan_mas=SCAN, **kw)
    assert res.perturbations is not None
    p = res.perturbations[m].double()  # (N, K, 1, H, W)
    a = dose_scale(m, SCAN)
    var = p.flatten(2).square().mean(2)  # (N, K)
    target = a[:, None] ** 2 * grid_variance(AT_HW, 1.0, m)
    assert torch.allclose(var, target, rtol=1e-3, atol=1e-6)
    assert (res[m].sar[(SCAN == 8.0).numpy()] == 0).all()
    noise = res[m].noise
    assert noise is not None and (noise.dose, noise.none, noise.additive_fallback) == (6, 3, 3)
    assert res.settings["noise_mode"] == "dose" and res.settings["mean_steps"] > 0
    kw["generator"] = gen(7)
    add = optimized_nps_attack(model, x, m, 1.0, **kw)
    assert "noise_mode" not in add.settings and add[m].noise is None
    assert add.perturbations is not None
    unknown = torch.isnan(SCAN)
    assert torch.allclose(p[unknown], add.perturbations[m][unknown].double(), atol=1e-3)  # fallback = additive


# --------------------------------------------------------------------------------------------------
# configuration and evaluation

SETTINGS = {
    "mas_levels": LEVELS, "splits": ["test"], "spacing_mm": 1.0, "examples": 0, "random": {"k": 3},
    "optimized": {"restarts": 1, "n_iter": 2, "max_samples": 8, "autocast": False},
    "pgd": {"steps": 2, "linf": [0.01]},
}


def test_config_mode() -> None:
    assert noise_mode({}) == "additive"
    assert NoiseConfig().mode == "additive"
    params = {"robustness": {"defaults": SETTINGS, "noise": {"mode": "dose"}}, "train": {"jobs": {"j": {}}}}
    assert job_settings(params, "j").noise_mode == "dose"
    assert parse_settings(SETTINGS).noise_mode == "additive"
    with pytest.raises(ConfigError, match="mode"):
        noise_mode({"robustness": {"noise": {"mode": "rescan"}}})
    with pytest.raises(ConfigError, match="noise.mode"):
        replace(parse_settings(SETTINGS), noise_mode="rescan")


def arrayset(manifest: pd.DataFrame | None) -> ArraySet:
    x = slices(OFFSETS)
    data = ArraySet.from_tensors(x, x, (OFFSETS > 0).long(), ["test"] * N_AT)
    return replace(data, manifest=manifest)


def test_scan_mas_from_manifest() -> None:
    mas = SCAN.numpy().copy()
    source = np.where(np.isnan(mas), "unknown", "current_x_time")
    manifest = pd.DataFrame({"mas": mas, "mas_source": source})
    idx = np.array([1, 0, 6])
    got = scan_mas_of(arrayset(manifest), idx)
    assert torch.equal(torch.isnan(got), torch.tensor([False, True, False]))
    assert got[[0, 2]].tolist() == [400.0, 60.0]
    source[1] = "unknown"  # a source saying unknown wins over a number
    assert math.isnan(float(scan_mas_of(arrayset(pd.DataFrame({"mas": mas, "mas_source": source})), idx)[0]))
    assert torch.isnan(scan_mas_of(arrayset(None), idx)).all()  # no manifest: unknown
    assert torch.isnan(scan_mas_of(arrayset(pd.DataFrame({"x": np.zeros(N_AT)})), idx)).all()
    with pytest.raises(DataError, match="positive"):
        scan_mas_of(arrayset(pd.DataFrame({"mas": -mas})), idx)


def test_evaluation_writes_noise_blocks() -> None:
    model = CentralMean()
    manifest = pd.DataFrame({"mas": SCAN.numpy(), "mas_source": np.where(torch.isnan(SCAN), "unknown", "x")})
    data = arrayset(manifest)
    kw = {"split_index": 0, "model_index": 0, "seed": 3}
    additive = parse_settings(SETTINGS)
    dose = replace(additive, noise_mode="dose")
    blocks = {}
    for name, s in (("additive", additive), ("dose", dose)):
        rnd = random_nps_run(model, data, s, **kw)
        opt = [optimized_nps_run(model, data, s, mas_index=i, **kw) for i in range(len(LEVELS))]
        blocks[name] = json.loads(json.dumps(nps_tables([[rnd]], [[opt]], s)))
    for attack in (0, 1):
        add_levels = blocks["additive"][attack]["test"]["levels"]
        dose_levels = blocks["dose"][attack]["test"]["levels"]
        assert all("noise" not in lv for lv in add_levels.values())
        for key, lv in dose_levels.items():
            noise = lv["noise"]
            assert noise["mode"] == "dose" and noise["target_mas"] == lv["mas"]
            n = blocks["dose"][attack]["test"]["n"]
            assert noise["n"] == n == noise["dose"] + noise["none"] + noise["additive_fallback"]
            assert key in add_levels
    assert blocks["dose"][0]["test"]["levels"]["mas100"]["noise"] == {
        "mode": "dose", "target_mas": 100.0, "n": N_AT, "dose": 3, "none": 6, "additive_fallback": 3}
    # a set without the mas column: every sample falls back to additive, counted
    rnd = random_nps_run(model, arrayset(None), dose, **kw)
    assert rnd[10.0].noise is not None and rnd[10.0].noise.additive_fallback == N_AT
    assert "noise_mode" not in additive.to_dict() and dose.to_dict()["noise_mode"] == "dose"
