"""CT noise model checks (Shen et al. 2020, Appendix and eq. 5): the NPS round trip of Figure A1,
dose scaling, slice independence, shapes/devices/reproducibility, the eq. 5 projection, NPS tables
and the config block."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ctharden.core.errors import ConfigError, DataError
from ctharden.noise import (
    NoiseConfig,
    ParametricNPS,
    TableNPS,
    default_nps,
    estimate_nps,
    estimate_nps_2d,
    grid_nps,
    grid_variance,
    load_nps_table,
    project_to_nps,
    radial_average,
    sample_nps_noise,
    tabulate,
)

SPACING = 0.7  # mm, a typical chest reconstruction pixel
MAS_LEVELS = (10.0, 50.0, 100.0, 200.0, 500.0)  # shen 2020, section 2.2.1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel_err(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (estimate / target - 1.0).abs()


# --------------------------------------------------------------------------- the parametric model


def test_parametric_defaults_are_a_realistic_chest_kernel() -> None:
    """σ = 12 HU at 250 mAs (σ ∝ 1/√mAs: 60 HU at 10 mAs), peak at 0.30 mm⁻¹, consistent amplitude."""
    nps = default_nps()
    assert nps.ref_mas == 250.0 and nps.ref_kvp == 120.0
    assert nps.sigma(250.0) == pytest.approx(12.0)
    assert nps.sigma(10.0) == pytest.approx(60.0)
    assert 8.0 < nps.sigma(500.0) < 9.0
    f = torch.linspace(0.0, 3.0, 300001, dtype=torch.float64)
    s = nps(f)
    assert float(f[torch.argmax(s)]) == pytest.approx(0.30, abs=1e-4)
    assert float(s[0]) == 0.0  # the ramp: no power at DC
    # the amplitude really gives σ² = 2π ∫ f·NPS(f) df
    assert 2 * math.pi * float(torch.trapezoid(f * s, f)) == pytest.approx(144.0, rel=1e-6)
    # linear in 1/mAs
    assert torch.allclose(nps(f, 50.0), s * 5.0)
    with pytest.raises(ConfigError, match="sigma_ref_hu"):
        ParametricNPS(sigma_ref_hu=-1.0)


# --------------------------------------------------------------------------- Figure A1 round trip


def test_round_trip_matches_target_nps() -> None:
    """Figure A1: 1000 noise slices of 128×128 at 0.7 mm and 100 mAs, NPS re-estimated by eq. A.1.

    Tolerance, over every annulus from the first non-DC one to Nyquist (each holds >= 8 grid points
    × 1000 realisations): median relative error < 3 %, max < 10 % against the exact radial average
    of the target on the same grid; max < 10 % against the analytic curve at the annuli's mean
    frequency for f >= 0.05 mm⁻¹. Per-pixel variance within 1 % of the grid prediction.
    (Measured with this seed: median ≈ 0.2 %, max ≈ 1.7 %.)
    """
    mas, shape = 100.0, (1000, 128, 128)
    noise = sample_nps_noise(shape, mas, SPACING, generator=_gen(0))
    freqs, est = estimate_nps(noise, SPACING)
    t_freqs, target, counts = radial_average(grid_nps(shape[-2:], SPACING, mas), SPACING)
    assert torch.allclose(freqs, t_freqs)
    assert int(counts[1:].min()) >= 8
    assert float(freqs[-1]) <= 0.5 / SPACING + 1e-9 and float(freqs[1]) > 0

    rel = _rel_err(est[1:], target[1:])
    print(f"\nround trip 128x128x1000 @ {mas:g} mAs: relative error median {float(rel.median()):.4f}, "
          f"max {float(rel.max()):.4f}")
    assert float(rel.median()) < 0.03
    assert float(rel.max()) < 0.10

    band = freqs >= 0.05
    rel_curve = _rel_err(est[band], default_nps()(freqs[band], mas))
    assert float(rel_curve.max()) < 0.10

    assert float(noise.var()) == pytest.approx(grid_variance(shape[-2:], SPACING, mas), rel=0.01)
    assert float(est[0]) < 1e-6 * float(est.max())  # each realisation's mean is removed


def test_estimate_nps_numpy_in_numpy_out_and_white_noise_level() -> None:
    """White noise of variance σ² has a flat NPS σ²·Δx·Δy (eq. A.1 normalisation)."""
    rng = np.random.default_rng(0)
    white = rng.normal(0.0, 10.0, size=(400, 32, 32))
    freqs, est = estimate_nps(white, (0.5, 0.8))
    assert isinstance(freqs, np.ndarray) and isinstance(est, np.ndarray)
    assert np.median(est[1:]) == pytest.approx(100.0 * 0.5 * 0.8, rel=0.03)
    full = estimate_nps(torch.from_numpy(white), 0.5, up_to_corner=True)[0]
    assert float(full[-1]) > 0.5 / 0.5  # corner annuli beyond Nyquist on request
    with pytest.raises(ConfigError):
        estimate_nps_2d(torch.zeros(5), 1.0)


# --------------------------------------------------------------------------- dose scaling


def test_variance_scales_as_inverse_mas() -> None:
    """log-log slope of variance vs mAs over {10, 50, 100, 200, 500} is -1 ± 0.05 (independent draws);
    σ at 250 mAs on a 0.7 mm grid is in the realistic 10–15 HU range, σ at 10 mAs in 50–65 HU."""
    variances = [
        float(sample_nps_noise((200, 64, 64), mas, SPACING, generator=_gen(10 + i)).var())
        for i, mas in enumerate(MAS_LEVELS)
    ]
    slope = np.polyfit(np.log(MAS_LEVELS), np.log(variances), 1)[0]
    table = ", ".join(f"{m:g}: {v:.1f}" for m, v in zip(MAS_LEVELS, variances, strict=True))
    print(f"\nvariance (HU²) vs mAs: {table}; log-log slope {slope:.4f}")
    assert abs(slope + 1.0) < 0.05
    sigma_250 = float(sample_nps_noise((200, 64, 64), 250.0, SPACING, generator=_gen(3)).std())
    assert 10.0 <= sigma_250 <= 15.0
    assert 50.0 <= math.sqrt(variances[0]) <= 65.0


# --------------------------------------------------------------------------- sampling mechanics


def test_slices_are_independent() -> None:
    """Pixel-wise correlation between two slices of the same cube is ~0 (|r| < 0.02 over 2M pixels),
    while neighbouring pixels within a slice are correlated (CT noise is not white)."""
    noise = sample_nps_noise((500, 2, 64, 64), 50.0, SPACING, generator=_gen(4))
    a, b = noise[:, 0].reshape(-1), noise[:, 1].reshape(-1)
    r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(r) < 0.02
    x = noise[:, 0]
    r_neigh = float(torch.corrcoef(torch.stack([x[..., :-1].reshape(-1), x[..., 1:].reshape(-1)]))[0, 1])
    assert abs(r_neigh) > 0.1  # textured, not white


@pytest.mark.parametrize("shape", [(32, 32), (6, 32, 32), (3, 4, 32, 40), (2, 1, 3, 16, 16)])
def test_shapes_dtype_device(shape: tuple[int, ...]) -> None:
    noise = sample_nps_noise(shape, 100.0, 1.0, device="cpu")
    assert noise.shape == shape and noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.isfinite(noise).all()
    noise2 = sample_nps_noise(shape, 100.0, (1.0, 0.8), device=torch.device("cpu"))
    assert noise2.shape == shape


def test_generator_makes_draws_reproducible() -> None:
    a = sample_nps_noise((4, 32, 32), 50.0, 1.0, generator=_gen(7))
    b = sample_nps_noise((4, 32, 32), 50.0, 1.0, generator=_gen(7))
    c = sample_nps_noise((4, 32, 32), 50.0, 1.0, generator=_gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_sample_and_per_slice_mas() -> None:
    """mAs broadcast to shape[:-2]: (B, 1) per sample, (B, D) per slice; σ follows each mAs."""
    mas = torch.tensor([10.0, 50.0, 100.0, 500.0])
    noise = sample_nps_noise((4, 64, 32, 32), mas[:, None], 1.0, generator=_gen(5))
    sigma = noise.std(dim=(1, 2, 3))
    expected = torch.tensor([grid_variance((32, 32), 1.0, float(m)) ** 0.5 for m in mas], dtype=torch.float32)
    assert torch.allclose(sigma, expected, rtol=0.05)
    # same draw, rescaled: per-slice mAs equals a scalar-mAs draw times sqrt(ref/mAs)
    per_slice = torch.tensor([[250.0, 62.5]])
    x = sample_nps_noise((1, 2, 16, 16), per_slice, 1.0, generator=_gen(6))
    y = sample_nps_noise((1, 2, 16, 16), 250.0, 1.0, generator=_gen(6))
    assert torch.allclose(x[:, 0], y[:, 0]) and torch.allclose(x[:, 1], 2.0 * y[:, 1], rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mas": 0.0}, "mAs"),
        ({"mas": -5.0}, "mAs"),
        ({"mas": float("nan")}, "mAs"),
        ({"mas": torch.tensor([10.0, 20.0, 30.0])}, "broadcast"),
        ({"spacing_mm": 0.0}, "spacing"),
        ({"spacing_mm": (1.0, 2.0, 3.0)}, "spacing"),
        ({"shape": (32,)}, "shape"),
    ],
)
def test_bad_sampling_arguments(kwargs: dict, match: str) -> None:
    args = {"shape": (2, 4, 16, 16), "mas": 50.0, "spacing_mm": 1.0} | kwargs
    with pytest.raises(ConfigError, match=match):
        sample_nps_noise(args["shape"], args["mas"], args["spacing_mm"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_the_model() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    noise = sample_nps_noise((500, 64, 64), 100.0, SPACING, generator=gen)
    assert noise.device.type == "cuda" and noise.dtype == torch.float32
    freqs, est = estimate_nps(noise, SPACING)
    _, target, _ = radial_average(grid_nps((64, 64), SPACING, 100.0, device="cuda"), SPACING)
    assert float(_rel_err(est[1:], target[1:]).median()) < 0.03
    p = project_to_nps(torch.randn(4, 8, 64, 64, device="cuda"), 100.0, SPACING)
    _, est_p = estimate_nps(p, SPACING)
    assert torch.allclose(est_p[1:], target[1:], rtol=1e-4)


# --------------------------------------------------------------------------- eq. 5 projection


def _white(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return 30.0 * torch.randn(shape, generator=_gen(seed))


def test_projection_gives_the_target_spectrum_and_keeps_phase() -> None:
    """Projecting white noise (8 cubes × 16 slices of 64²) at 50 mAs: the eq. A.1 radial NPS of the
    result equals the target to float32 precision (rel < 1e-4), every Fourier phase is kept
    (median < 1e-5 rad, max < 1e-3 rad where target and input are not ~0), the image stays
    correlated with the input, and
    projecting twice equals projecting once (rel < 1e-5)."""
    a = _white((8, 16, 64, 64), 11)
    p = project_to_nps(a, 50.0, SPACING)
    assert p.shape == a.shape and p.dtype == torch.float32
    _, est = estimate_nps(p, SPACING)
    _, target, _ = radial_average(grid_nps((64, 64), SPACING, 50.0), SPACING)
    assert float(_rel_err(est[1:], target[1:]).max()) < 1e-4

    spec_a, spec_p = torch.fft.rfft2(a), torch.fft.rfft2(p)
    nonzero = grid_nps((64, 64), SPACING, 50.0, half=True) > 1e-4 * float(target.max())
    dphi = torch.angle(spec_p * spec_a.conj())[..., nonzero].abs()
    assert float(dphi.median()) < 1e-5
    # float32 round-off only: coefficients the input has at >= 1 % of its median magnitude
    clear = spec_a[..., nonzero].abs() >= 0.01 * spec_a.abs().median()
    assert float(dphi[clear].max()) < 1e-3
    assert float(torch.corrcoef(torch.stack([a.reshape(-1), p.reshape(-1)]))[0, 1]) > 0.7

    twice = project_to_nps(p, 50.0, SPACING)
    assert float((twice - p).norm() / p.norm()) < 1e-5


def test_projection_of_a_smooth_blob_and_no_autograd() -> None:
    """A smooth Gaussian blob keeps its sign pattern (phase) at low frequencies and gets the target
    spectrum; the projection is detached from autograd."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = (40.0 * torch.exp(-((yy - 16) ** 2 + (xx - 12) ** 2) / (2 * 4.0**2))).expand(4, 3, 32, 32).clone()
    blob.requires_grad_(True)
    p = project_to_nps(blob, 100.0, 1.0)
    assert not p.requires_grad and p.shape == blob.shape
    _, est = estimate_nps(p, 1.0)
    _, target, _ = radial_average(grid_nps((32, 32), 1.0, 100.0), 1.0)
    assert float(_rel_err(est[1:], target[1:]).max()) < 1e-3
    spec_b, spec_p = torch.fft.rfft2(blob.detach()), torch.fft.rfft2(p)
    low = (grid_nps((32, 32), 1.0, 100.0, half=True) > 0) & (
        torch.fft.fftfreq(32)[:, None] ** 2 + torch.fft.rfftfreq(32)[None, :] ** 2 < 0.1**2
    )
    assert float(torch.angle(spec_p * spec_b.conj())[..., low].abs().max()) < 1e-2


def test_projection_pools_and_per_sample_mas() -> None:
    """pool='sample': each sample alone matches its own mAs; pool='all' with per-sample mAs stays
    idempotent; pool='slice' matches per slice. A 2D input works too."""
    a = _white((5, 4, 32, 32), 12)
    mas = torch.tensor(MAS_LEVELS)[:, None]
    p = project_to_nps(a, mas, 1.0, pool="sample")
    for i, m in enumerate(MAS_LEVELS):
        _, est = estimate_nps(p[i], 1.0)
        _, target, _ = radial_average(grid_nps((32, 32), 1.0, m), 1.0)
        assert float(_rel_err(est[1:], target[1:]).max()) < 1e-4
    # a sample's projection does not depend on the rest of the batch with pool='sample'
    assert torch.allclose(project_to_nps(a[:1], 10.0, 1.0, pool="sample"), p[:1], rtol=1e-4, atol=1e-3)
    q = project_to_nps(a, mas, 1.0, pool="all")
    assert float((project_to_nps(q, mas, 1.0) - q).norm() / q.norm()) < 1e-5
    s = project_to_nps(a, 100.0, 1.0, pool="slice")
    _, est = estimate_nps(s[2, 1], 1.0)
    _, target, _ = radial_average(grid_nps((32, 32), 1.0, 100.0), 1.0)
    assert float(_rel_err(est[1:], target[1:]).max()) < 1e-4
    assert project_to_nps(a[0, 0], 100.0, 1.0).shape == (32, 32)
    with pytest.raises(ConfigError, match="pool"):
        project_to_nps(a, 100.0, 1.0, pool="batch")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- NPS tables


def test_table_from_the_parametric_model_reproduces_it(tmp_path: Path) -> None:
    """A 201-row table of the default model (0-1 mm⁻¹) written to CSV and read back gives the same
    NPS (rel < 0.5 % where it matters), the same grid variance and the same noise for one seed."""
    ref = default_nps()
    path = tabulate(ref, max_freq_per_mm=1.0, n=201).to_csv(tmp_path / "nps.csv")
    assert path.read_text().startswith("# ref_mas: 250\nfreq_per_mm,nps_hu2_mm2\n")
    table = load_nps_table(path)
    assert isinstance(table, TableNPS) and table.ref_mas == 250.0
    f = torch.linspace(0.02, 0.9, 500, dtype=torch.float64)
    assert torch.allclose(table(f, 50.0), ref(f, 50.0), rtol=5e-3, atol=1e-3 * float(ref(f, 50.0).max()))
    assert table.sigma() == pytest.approx(12.0, rel=0.01)
    assert grid_variance((64, 64), SPACING, 100.0, nps=table) == pytest.approx(
        grid_variance((64, 64), SPACING, 100.0), rel=0.005
    )
    a = sample_nps_noise((3, 64, 64), 100.0, SPACING, nps=table, generator=_gen(1))
    b = sample_nps_noise((3, 64, 64), 100.0, SPACING, generator=_gen(1))
    assert float((a - b).norm() / b.norm()) < 0.01
    assert float(table(torch.tensor([1.5], dtype=torch.float64))) == 0.0  # beyond the table
    # ref mAs as an argument instead of the header line
    (tmp_path / "nohdr.csv").write_text("\n".join(path.read_text().splitlines()[1:]) + "\n")
    assert load_nps_table(tmp_path / "nohdr.csv", ref_mas=200.0).ref_mas == 200.0


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("# ref_mas: 250\nfreq,nps_hu2_mm2\n0,0\n0.1,5\n", "missing column.*freq_per_mm"),
        ("# ref_mas: 250\nfreq_per_mm,nps_hu2_mm2\n0,0\n0.1,-5\n", "negative NPS"),
        ("# ref_mas: 250\nfreq_per_mm,nps_hu2_mm2\n0,0\n0.2,5\n0.2,4\n", "strictly increasing"),
        ("# ref_mas: 250\nfreq_per_mm,nps_hu2_mm2\n0,0\n0.3,5\n0.1,4\n", "strictly increasing"),
        ("# ref_mas: 250\nfreq_per_mm,nps_hu2_mm2\n0,0\n0.1,nan\n", "NaN"),
        ("# ref_mas: 250\nfreq_per_mm,nps_hu2_mm2\n0,0\n0.1,abc\n", "not a number"),
        ("# ref_mas: 250\nfreq_per_mm,nps_hu2_mm2\n0,0\n", "at least 2 rows"),
        ("freq_per_mm,nps_hu2_mm2\n0,0\n0.1,5\n", "reference mAs unknown"),
        ("# ref_mas: -3\nfreq_per_mm,nps_hu2_mm2\n0,0\n0.1,5\n", "reference mAs"),
        ("# only a comment\n", "empty"),
    ],
)
def test_bad_tables_raise_data_error_naming_the_file(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad_nps.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as info:
        load_nps_table(path)
    assert "bad_nps.csv" in str(info.value)


def test_table_missing_file_and_conflicting_ref_mas(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.csv.*not found"):
        load_nps_table(tmp_path / "nope.csv", ref_mas=250.0)
    path = tmp_path / "t.csv"
    path.write_text("# ref_mas: 250\nfreq_per_mm,nps_hu2_mm2\n0,0\n0.1,5\n")
    with pytest.raises(DataError, match="t.csv.*ref_mas"):
        load_nps_table(path, ref_mas=100.0)


# --------------------------------------------------------------------------- config


def test_noise_config_defaults_and_params(tmp_path: Path) -> None:
    cfg = NoiseConfig()
    assert cfg.build() == default_nps()
    noise = {"sigma_ref_hu": 10, "peak_freq_per_mm": 0.25}
    custom = NoiseConfig.from_params({"robustness": {"mas_levels": [10], "noise": noise}})
    model = custom.build()
    assert isinstance(model, ParametricNPS) and model.sigma() == pytest.approx(10.0)
    assert NoiseConfig.from_params({"robustness": {"mas_levels": [10]}}) == cfg  # block absent: defaults
    with pytest.raises(ConfigError, match="unknown key"):
        NoiseConfig.from_params({"robustness": {"noise": {"sigma": 3}}})
    with pytest.raises(ConfigError, match="table"):
        NoiseConfig(model="table")
    with pytest.raises(ConfigError, match="projection_pool"):
        NoiseConfig(projection_pool="batch")
    tabulate(default_nps()).to_csv(tmp_path / "m.csv")
    table = NoiseConfig.from_params({"model": "table", "table": "m.csv"}).build(root=tmp_path)
    assert isinstance(table, TableNPS) and table.ref_mas == 250.0
