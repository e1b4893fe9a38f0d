"""Synthetic CT-like phantoms: a clearly labelled stand-in for LIDC-IDRI and COVID-CT.

There is no full LIDC-IDRI copy on this machine, so the pipeline can run end-to-end on phantoms.
They are never presented as real data: every manifest row has ``source="synthetic"`` and
``patient_id_kind="synthetic-phantom"``, and ``dataset.json`` provenance says ``synthetic``.

Two generators, both deterministic given a :class:`numpy.random.Generator`:

- :func:`nodule_phantom` -- a ``(32, 32, 32)`` float32 cube in HU, axes ``(z, y, x)``, 1 mm voxels
  (Shen et al. 2020, sec. 2.6): lung parenchyma (~-850 HU, smooth texture, gravity gradient),
  vessels (tapered, curved, sometimes branching tubes, +40 HU), sometimes a chest wall, and a
  centred nodule. Benign: small (4-11 mm), smooth, ~30 % calcified. Malignant: larger (9-25 mm),
  lobulated (radius modulated by low-order zonal harmonics) and/or spiculated, sometimes
  part-solid (ground-glass rim). Then partial-volume blur and correlated CT-like noise.
  Simulated LIDC reader ratings (1-4 readers, 1-5) agree with the label: mean < 3 benign, > 3
  malignant, never exactly 3.
- :func:`covid_phantom` -- an axial chest slice ``(H, W)`` in ``[0, 1]`` (lung window
  ``[-1000, 400]`` HU): body, two lungs with vessels, heart, aorta, spine, ribs. COVID: bilateral
  peripheral ground-glass opacities, sometimes consolidation. Non-COVID: clean lungs, sometimes a
  small nodule or an atelectasis streak.

:func:`generate_synthetic` writes a dataset in the one format (:class:`DatasetWriter`). Sample
``i`` is generated from child seed ``i`` of ``SeedSequence(seed).spawn(n)``, so it does not
depend on ``n`` given its label. Labels: exactly ``round(n * malignant_fraction)`` positives, the
samples whose first child-seed draw ``u_i`` ranks lowest -- random, and stable
across ``n`` for all but the samples whose ``u_i`` lies near the threshold.

All model constants live in :data:`NODULE_MODEL` and :data:`COVID_MODEL` and are recorded in the
dataset provenance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.polynomial import legendre
from scipy import ndimage
from tqdm import tqdm

from ctharden.core.errors import DataError
from ctharden.data.dataset import DatasetWriter, read_info, task_spec

GENERATOR_VERSION = 1
PATIENT_ID_KIND = "synthetic-phantom"
Range = tuple[float, float]


@dataclass(frozen=True)
class NoduleModel:
    """Parameters of :func:`nodule_phantom`. Lengths in mm (= voxels, 1 mm isotropic), values in HU."""

    cube: int = 32
    lung_hu: float = -850.0
    lung_offset_sd_hu: float = 20.0  # per-cube global density (inspiration, patient)
    lung_offset_max_hu: float = 50.0
    lung_texture_sd_hu: Range = (10.0, 30.0)  # low-frequency parenchymal texture
    lung_texture_sigma_mm: float = 2.5
    gravity_gradient_hu: Range = (0.0, 20.0)  # across the cube along y (dependent lung is denser)
    soft_tissue_hu: Range = (0.0, 60.0)
    tissue_texture_sd_hu: float = 8.0
    n_vessels: tuple[int, int] = (1, 5)  # inclusive
    vessel_radius_mm: Range = (0.5, 2.0)
    vessel_hu: float = 40.0
    vessel_branch_prob: float = 0.4
    pleura_prob: float = 0.2
    pleura_distance_mm: Range = (9.0, 13.0)  # from the nodule centre (at least nodule radius + 1)
    fat_hu: float = -100.0
    jitter_vox: float = 2.0
    benign_diameter_mm: Range = (4.0, 11.0)
    malignant_diameter_mm: Range = (9.0, 25.0)  # 9 + 16 * Beta(1.6, 2.4)
    ellipsoid_axis_ratio: Range = (0.8, 1.0)
    benign_lobulated_prob: float = 0.1
    benign_lobulation_amp: Range = (0.06, 0.12)
    malignant_lobulated_prob: float = 0.7
    malignant_spiculated_prob: float = 0.5  # a malignant nodule is lobulated and/or spiculated
    malignant_lobulation_amp: Range = (0.12, 0.3)
    malignant_irregularity_amp: Range = (0.03, 0.08)  # surface of a non-lobulated malignant nodule
    harmonic_orders: tuple[int, int] = (2, 5)  # inclusive Legendre orders of the lobulation
    n_spicules: tuple[int, int] = (12, 28)
    spicule_length_mm: Range = (4.0, 12.0)  # beyond the nodule surface
    spicule_base_radius_mm: Range = (0.7, 1.4)
    spicule_tip_radius_mm: float = 0.3
    part_solid_prob: float = 0.3  # malignant only
    solid_core_fraction: Range = (0.35, 0.7)
    ggo_hu: Range = (-600.0, -400.0)
    calcified_prob: float = 0.3  # benign only
    calcium_hu: Range = (200.0, 1000.0)
    calcified_core_fraction: Range = (0.3, 0.65)
    calcified_core_min_radius_mm: float = 1.5
    fully_calcified_prob: float = 0.4  # of calcified nodules
    blur_sigma_vox: Range = (0.5, 0.7)  # partial volume
    noise_sd_hu: Range = (15.0, 25.0)
    noise_corr_sigma_vox: float = 0.6
    reader_counts: tuple[int, ...] = (1, 2, 3, 4)
    reader_count_probs: tuple[float, ...] = (0.15, 0.2, 0.25, 0.4)
    reader_sd: float = 0.6
    hu_clip: Range = (-1024.0, 3071.0)


@dataclass(frozen=True)
class CovidModel:
    """Parameters of :func:`covid_phantom`. Lengths in field-of-view units (2.0 = FOV), values in HU."""

    fov_mm: float = 360.0
    window_hu: Range = (-1000.0, 400.0)
    air_hu: float = -1000.0
    fat_hu: float = -100.0
    soft_tissue_hu: float = 40.0
    lung_hu: float = -850.0
    lung_texture_sd_hu: float = 20.0
    gravity_gradient_hu: float = 40.0
    bone_cortex_hu: float = 700.0
    bone_marrow_hu: float = 250.0
    n_vessels_per_lung: tuple[int, int] = (6, 10)
    n_vessel_dots_per_lung: tuple[int, int] = (10, 25)
    n_opacities: tuple[int, int] = (2, 8)  # COVID; at least one per lung (bilateral)
    opacity_axes: Range = (0.05, 0.15)
    opacity_peripheral: float = 0.12  # max distance of an opacity centre from the pleura
    ggo_hu: Range = (-600.0, -300.0)
    consolidation_prob: float = 0.35
    consolidation_hu: Range = (0.0, 40.0)
    nodule_prob: float = 0.25  # non-COVID
    atelectasis_prob: float = 0.2  # non-COVID
    blur_sigma_px: float = 0.6
    noise_sd_hu: Range = (15.0, 30.0)
    noise_corr_sigma_px: float = 0.8


NODULE_MODEL = NoduleModel()
COVID_MODEL = CovidModel()
_MIN_COVID_SIZE = 32


# --------------------------------------------------------------------------------------------
# shared geometry and image helpers


@lru_cache(maxsize=8)
def _grid(shape: tuple[int, ...]) -> np.ndarray:
    """Voxel-centre coordinates, ``(prod(shape), ndim)`` float64 in voxel units, read-only."""
    pts = np.indices(shape, dtype=np.float64).reshape(len(shape), -1).T.copy()
    pts.flags.writeable = False
    return pts


def _uniform(rng: np.random.Generator, bounds: Range) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _unit_vectors(rng: np.random.Generator, k: int, dim: int = 3) -> np.ndarray:
    v = rng.normal(size=(k, dim))
    unit: np.ndarray = v / np.linalg.norm(v, axis=1, keepdims=True)
    return unit


def _soft(inside: np.ndarray) -> np.ndarray:
    """Partial-volume occupancy in [0, 1] from a signed 'inside' distance in voxels (linear ramp)."""
    return np.minimum(np.maximum(inside + 0.5, 0.0), 1.0)


def _blend(img: np.ndarray, value: np.ndarray | float, occupancy: np.ndarray) -> np.ndarray:
    """Replace ``img`` by ``value`` in proportion to ``occupancy`` (same shape as ``img``)."""
    return img + occupancy * (value - img)


def _tube_occupancy(
    shape: tuple[int, ...], a: np.ndarray, b: np.ndarray, ra: np.ndarray, rb: np.ndarray
) -> np.ndarray:
    """Soft occupancy (array of ``shape``) of the union of tapered tubes ``a[m] -> b[m]``.

    ``a``/``b`` ``(M, D)`` are end points in index (voxel/pixel) coordinates, ``ra``/``rb`` ``(M,)``
    the end radii in voxels/pixels; any ``D``. Each tube is rasterised only inside its bounding box.
    """
    out = np.zeros(shape)
    bound = np.asarray(shape)
    for ai, bi, rai, rbi in zip(a, b, ra, rb, strict=True):
        margin = max(rai, rbi) + 1.0
        lo = np.maximum(np.floor(np.minimum(ai, bi) - margin), 0).astype(int)
        hi = np.minimum(np.ceil(np.maximum(ai, bi) + margin) + 1, bound).astype(int)
        if np.any(hi <= lo):
            continue
        ndim = len(shape)
        # broadcastable per-axis offsets from the tube start: axis d has shape (1, .., h_d - l_d, .., 1)
        ap = [
            np.arange(lo[d], hi[d], dtype=np.float64).reshape([-1 if k == d else 1 for k in range(ndim)])
            - ai[d]
            for d in range(ndim)
        ]
        ab = bi - ai
        t = np.clip(sum(ap[d] * ab[d] for d in range(ndim)) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
        perp = np.sqrt(sum((ap[d] - t * ab[d]) ** 2 for d in range(ndim)))
        block = tuple(slice(l0, h0) for l0, h0 in zip(lo, hi, strict=True))
        np.maximum(out[block], _soft(rai + (rbi - rai) * t - perp), out=out[block])
    return out


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-SD Gaussian-filtered white noise of ``shape`` (correlation length ``sigma``)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    standardised: np.ndarray = (field - field.mean()) / max(float(field.std()), 1e-12)
    return standardised


def _ct_finish(
    rng: np.random.Generator, img: np.ndarray, blur: float, noise_sd: float, noise_sigma: float
) -> np.ndarray:
    """Partial-volume blur, then add correlated noise of SD ``noise_sd`` HU (voxel/pixel sigmas)."""
    img = ndimage.gaussian_filter(img, blur, mode="nearest")
    return img + noise_sd * _smooth_field(rng, img.shape, noise_sigma)


def _curve(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n_seg: int) -> np.ndarray:
    """``n_seg + 1`` points of the quadratic Bezier curve ``p0 -> p2`` with control point ``p1``."""
    t = np.linspace(0.0, 1.0, n_seg + 1)[:, None]
    points: np.ndarray = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    return points


def _polyline_tubes(points: np.ndarray, r_start: float, r_end: float) -> tuple[np.ndarray, ...]:
    """Segments ``(a, b, ra, rb)`` of a polyline whose radius tapers linearly from start to end."""
    r = np.linspace(r_start, r_end, len(points))
    return points[:-1], points[1:], r[:-1], r[1:]


def _concat_tubes(tubes: list[tuple[np.ndarray, ...]], dim: int) -> tuple[np.ndarray, ...]:
    if not tubes:
        return np.zeros((0, dim)), np.zeros((0, dim)), np.zeros(0), np.zeros(0)
    return tuple(np.concatenate(parts) for parts in zip(*tubes, strict=True))


# --------------------------------------------------------------------------------------------
# nodule3d


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _lung_background(rng: np.random.Generator, size: int, m: NoduleModel) -> np.ndarray:
    """Lung parenchyma ``(size,)*3`` HU: global offset, smooth texture and a gravity gradient in y."""
    shape = (size,) * 3
    offset = float(np.clip(rng.normal(0.0, m.lung_offset_sd_hu), -m.lung_offset_max_hu, m.lung_offset_max_hu))
    texture = _uniform(rng, m.lung_texture_sd_hu) * _smooth_field(rng, shape, m.lung_texture_sigma_mm)
    y = np.linspace(-0.5, 0.5, size)[None, :, None]
    return m.lung_hu + offset + texture + _uniform(rng, m.gravity_gradient_hu) * y


def _chest_wall(
    rng: np.random.Generator, rel: np.ndarray, min_distance: float, m: NoduleModel
) -> tuple[np.ndarray, np.ndarray]:
    """Occupancy and HU ``(N,)`` of a slightly curved chest wall (pleura/muscle, a fat layer) on one side."""
    normal = np.eye(3)[rng.integers(3)] * rng.choice([-1.0, 1.0]) + rng.normal(0.0, 0.25, 3)
    normal /= np.linalg.norm(normal)
    distance = max(min_distance, _uniform(rng, m.pleura_distance_mm))
    along = rel @ normal
    lateral2 = (rel**2).sum(1) - along**2
    depth = along - distance - rng.uniform(0.0, 0.01) * lateral2  # > 0 inside the wall
    muscle = rng.uniform(3.0, 7.0)
    fat = (depth > muscle) & (depth < muscle + rng.uniform(2.0, 4.0))
    return _soft(depth), np.where(fat, m.fat_hu, m.vessel_hu)


def _vessel_tubes(
    rng: np.random.Generator, centre: np.ndarray, m: NoduleModel
) -> tuple[tuple[np.ndarray, ...], int]:
    """Tubes of 1-5 curved vessels crossing the cube, some with a branch; and the vessel count."""
    tubes = []
    n_vessels = int(rng.integers(m.n_vessels[0], m.n_vessels[1] + 1))
    for _ in range(n_vessels):
        direction = _unit_vectors(rng, 1)[0]
        anchor = centre + rng.uniform(-12.0, 12.0, 3)
        bend = rng.normal(0.0, 4.0, 3)
        points = _curve(anchor - 28 * direction, anchor + bend, anchor + 28 * direction, 6)
        radius = _uniform(rng, m.vessel_radius_mm)
        r_end = radius * rng.uniform(0.6, 1.0)
        tubes.append(_polyline_tubes(points, radius, r_end))
        if rng.random() < m.vessel_branch_prob:
            start = points[rng.integers(2, 5)]
            turn = direction + rng.uniform(0.6, 1.4) * _unit_vectors(rng, 1)[0]
            turn /= np.linalg.norm(turn)
            branch = _curve(start, start + 8 * turn + rng.normal(0.0, 2.0, 3), start + 20 * turn, 4)
            tubes.append(_polyline_tubes(branch, 0.7 * r_end, max(0.35, 0.5 * r_end)))
    return _concat_tubes(tubes, 3), n_vessels


def _nodule_shape(
    rng: np.random.Generator, rel: np.ndarray, radius: float, amp: float, m: NoduleModel
) -> tuple[np.ndarray, np.ndarray]:
    """Radial distance ``rho`` and boundary radius ``R(u)`` ``(N,)`` of a (lobulated) ellipsoid.

    ``R(u) = radius * (1 + amp * sum_j w_j P_{l_j}(u . v_j) / sum_j |w_j|)`` in the ellipsoid's
    scaled frame (volume-preserving axes), with Legendre orders ``l_j`` and random axes ``v_j``.
    The occupancy of the nodule scaled by ``f`` is ``_soft(f * R - rho)``.
    """
    axes = rng.uniform(*m.ellipsoid_axis_ratio, 3)
    axes /= np.prod(axes) ** (1 / 3)
    q = rel @ _random_rotation(rng) / axes
    rho = np.linalg.norm(q, axis=1)
    boundary = np.full(len(rel), radius)
    if amp > 0:
        u = q / np.maximum(rho, 1e-9)[:, None]
        n_terms = int(rng.integers(3, 6))
        axes_v = _unit_vectors(rng, n_terms)
        weights = rng.normal(size=n_terms)
        orders = rng.integers(m.harmonic_orders[0], m.harmonic_orders[1] + 1, n_terms)
        mod = sum(
            w * legendre.legval(u @ v, np.eye(int(order) + 1)[int(order)])
            for w, v, order in zip(weights, axes_v, orders, strict=True)
        )
        boundary = radius * (1.0 + amp * mod / np.abs(weights).sum())
    return rho, boundary


def _spicule_tubes(
    rng: np.random.Generator, centre: np.ndarray, radius: float, m: NoduleModel
) -> tuple[np.ndarray, ...]:
    """Thin tapered spicules radiating from the nodule centre to beyond its surface."""
    k = int(rng.integers(m.n_spicules[0], m.n_spicules[1] + 1))
    directions = _unit_vectors(rng, k)
    lengths = radius + rng.uniform(*m.spicule_length_mm, k)
    a = np.repeat(centre[None], k, axis=0)
    base_radius = rng.uniform(*m.spicule_base_radius_mm, k)
    return a, a + lengths[:, None] * directions, base_radius, np.full(k, m.spicule_tip_radius_mm)


def _nodule_attributes(rng: np.random.Generator, malignant: bool, m: NoduleModel) -> dict[str, Any]:
    """Draw the ground-truth morphology of one nodule."""
    if malignant:
        lo, hi = m.malignant_diameter_mm
        diameter = lo + (hi - lo) * rng.beta(1.6, 2.4)
        lobulated = bool(rng.random() < m.malignant_lobulated_prob)
        spiculated = bool(rng.random() < m.malignant_spiculated_prob) or not lobulated
        part_solid = bool(rng.random() < m.part_solid_prob)
        calcified = False
        amp = _uniform(rng, m.malignant_lobulation_amp if lobulated else m.malignant_irregularity_amp)
    else:
        diameter = _uniform(rng, m.benign_diameter_mm)
        lobulated = bool(rng.random() < m.benign_lobulated_prob)
        spiculated = part_solid = False
        calcified = bool(rng.random() < m.calcified_prob)
        amp = _uniform(rng, m.benign_lobulation_amp) if lobulated else 0.0
    return {
        "diameter_mm": round(float(diameter), 3),
        "calcified": calcified,
        "spiculated": spiculated,
        "lobulated": lobulated,
        "part_solid": part_solid,
        "lobulation_amp": round(float(amp), 4),
    }


def _simulate_ratings(
    rng: np.random.Generator, malignant: bool, attrs: dict[str, Any], m: NoduleModel
) -> list[int]:
    """1-4 LIDC-style reader ratings (1-5) around a latent score; mean > 3 iff malignant, never 3."""
    if malignant:
        size_term = np.clip((attrs["diameter_mm"] - m.malignant_diameter_mm[0]) / 16.0, 0.0, 1.0)
        latent = 3.4 + 1.3 * size_term + 0.4 * attrs["spiculated"] + rng.uniform(-0.3, 0.3)
    else:
        latent = rng.uniform(1.3, 2.6) - 0.6 * attrs["calcified"]
    latent = float(np.clip(latent, 1.0, 5.0))
    for _ in range(100):
        k = int(rng.choice(m.reader_counts, p=m.reader_count_probs))
        ratings = np.clip(np.rint(latent + rng.normal(0.0, m.reader_sd, k)), 1, 5).astype(int)
        mean = ratings.mean()
        if (mean > 3) if malignant else (mean < 3):
            rating_list: list[int] = ratings.tolist()
            return rating_list
    return [4] if malignant else [2]  # unreachable in practice; keeps the label contract


def nodule_phantom(
    rng: np.random.Generator, malignant: bool, size: int = 32
) -> tuple[np.ndarray, dict[str, Any]]:
    """One synthetic nodule cube.

    Returns a float32 ``(size, size, size)`` array in HU, axes ``(z, y, x)``, 1 mm voxels, clipped
    to ``[-1024, 3071]``, and a dict of scalar ground-truth attributes (manifest columns):
    ``diameter_mm`` (volume-equivalent, outer), ``calcified``, ``spiculated``, ``lobulated``,
    ``part_solid``, ``pleura``, ``n_vessels``, ``center_z/y/x`` (voxels), ``noise_sd_hu``,
    ``spacing_mm`` (1.0) and the simulated readers: ``n_readers``, ``ratings`` ("4;5;5"),
    ``malignancy_mean``, ``malignancy_class`` (mean rounded half up, 1-5).
    """
    m = NODULE_MODEL
    if size < 16:
        raise DataError(f"nodule phantom size must be >= 16 voxels, got {size}")
    shape = (size,) * 3
    centre = np.full(3, (size - 1) / 2.0) + rng.uniform(-m.jitter_vox, m.jitter_vox, 3)
    rel = _grid(shape) - centre
    attrs = _nodule_attributes(rng, bool(malignant), m)
    radius = attrs["diameter_mm"] / 2.0
    outer = radius * (1.0 + attrs["lobulation_amp"])

    img = _lung_background(rng, size, m).reshape(-1)
    pleura = bool(rng.random() < m.pleura_prob)
    if pleura:
        occupancy, wall_hu = _chest_wall(rng, rel, outer + 1.0, m)
        img = _blend(img, wall_hu + 10.0 * _smooth_field(rng, shape, 1.5).reshape(-1), occupancy)
    vessels, n_vessels = _vessel_tubes(rng, centre, m)
    img = _blend(img, m.vessel_hu, _tube_occupancy(shape, *vessels).reshape(-1))

    texture = m.tissue_texture_sd_hu * _smooth_field(rng, shape, 1.0).reshape(-1)
    tissue = _uniform(rng, m.soft_tissue_hu) + texture
    rho, boundary = _nodule_shape(rng, rel, radius, attrs["lobulation_amp"], m)
    if attrs["part_solid"]:
        img = _blend(img, _uniform(rng, m.ggo_hu) + 2.0 * texture, _soft(boundary - rho))
        img = _blend(img, tissue, _soft(_uniform(rng, m.solid_core_fraction) * boundary - rho))
    else:
        img = _blend(img, tissue, _soft(boundary - rho))
    if attrs["spiculated"]:
        img = _blend(img, tissue, _tube_occupancy(shape, *_spicule_tubes(rng, centre, outer, m)).reshape(-1))
    if attrs["calcified"]:
        fraction = 1.0 if rng.random() < m.fully_calcified_prob else _uniform(rng, m.calcified_core_fraction)
        fraction = min(1.0, max(fraction, m.calcified_core_min_radius_mm / radius))
        img = _blend(img, _uniform(rng, m.calcium_hu), _soft(fraction * boundary - rho))

    noise_sd = _uniform(rng, m.noise_sd_hu)
    blur = _uniform(rng, m.blur_sigma_vox)
    img = _ct_finish(rng, img.reshape(shape), blur, noise_sd, m.noise_corr_sigma_vox)
    ratings = _simulate_ratings(rng, bool(malignant), attrs, m)
    mean = float(np.mean(ratings))
    attrs.update(
        pleura=pleura,
        n_vessels=n_vessels,
        center_z=round(float(centre[0]), 3),
        center_y=round(float(centre[1]), 3),
        center_x=round(float(centre[2]), 3),
        noise_sd_hu=round(noise_sd, 2),
        spacing_mm=1.0,
        n_readers=len(ratings),
        ratings=";".join(str(r) for r in ratings),
        malignancy_mean=round(mean, 4),
        malignancy_class=int(math.floor(mean + 0.5)),
    )
    return np.clip(img, *m.hu_clip).astype(np.float32), attrs


# --------------------------------------------------------------------------------------------
# covid2d


def _fov_block(
    shape: tuple[int, int], centre: tuple[float, float], extent: tuple[float, float]
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Pixels within ``extent`` (y, x) of ``centre``: their slices and FOV coordinates ``(h, 1)``, ``(1, w)``.

    FOV coordinates: pixel centres of a square ``shape`` at ``(i + 0.5) * 2 / size - 1`` in [-1, 1].
    """
    px = 2.0 / shape[0]
    slices, coords = [], []
    for d in range(2):
        lo = max(int(np.floor((centre[d] - extent[d] + 1.0) / px - 0.5)), 0)
        hi = max(min(int(np.ceil((centre[d] + extent[d] + 1.0) / px - 0.5)) + 1, shape[d]), lo)
        slices.append(slice(lo, hi))
        coords.append((np.arange(lo, hi) + 0.5) * px - 1.0)
    return (slices[0], slices[1]), coords[0][:, None], coords[1][None, :]


def _disc(
    shape: tuple[int, int], centre: tuple[float, float], axes: tuple[float, float], taper: float = 0.0
) -> np.ndarray:
    """Soft occupancy ``shape`` of an axis-aligned ellipse; ``centre``/``axes`` ``(y, x)`` in FOV units.

    ``taper`` > 0 widens it posteriorly (x semi-axis times ``1 + taper * (y - cy) / ay``), as lungs are.
    """
    px = 2.0 / shape[0]
    out = np.zeros(shape)
    block, yy, xx = _fov_block(shape, centre, (axes[0] + 2 * px, axes[1] * (1 + abs(taper)) + 2 * px))
    dy = (yy - centre[0]) / axes[0]
    ax = axes[1] * (1.0 + taper * np.clip(dy, -1.0, 1.0))
    r = np.sqrt(dy**2 + ((xx - centre[1]) / ax) ** 2)
    out[block] = _soft((1.0 - r) * min(axes) / px)  # approximate signed distance, in pixels
    return out


def _tubes_to_pixels(tubes: tuple[np.ndarray, ...], px: float) -> tuple[np.ndarray, ...]:
    """Tubes ``(a, b, ra, rb)`` from FOV units (``(y, x)`` in [-1, 1]) to pixel index units."""
    a, b, ra, rb = tubes
    return (a + 1.0) / px - 0.5, (b + 1.0) / px - 0.5, ra / px, rb / px


def _lung_vessel_tubes(
    rng: np.random.Generator, hilum: np.ndarray, side: float, c: CovidModel
) -> tuple[np.ndarray, ...]:
    """Vessels radiating laterally from a hilum (tapered curves) and vessel cross-sections (dots)."""
    tubes = []
    for _ in range(rng.integers(c.n_vessels_per_lung[0], c.n_vessels_per_lung[1] + 1)):
        angle = rng.uniform(-1.3, 1.3)
        direction = np.array([np.sin(angle), side * np.cos(angle)])
        length = rng.uniform(0.15, 0.45)
        bend = rng.normal(0.0, 0.05, 2)
        points = _curve(hilum, hilum + 0.5 * length * direction + bend, hilum + length * direction, 4)
        tubes.append(_polyline_tubes(points, rng.uniform(0.007, 0.013), 0.003))
    k = int(rng.integers(c.n_vessel_dots_per_lung[0], c.n_vessel_dots_per_lung[1] + 1))
    dots = hilum + np.column_stack([rng.uniform(-0.45, 0.5, k), side * rng.uniform(0.0, 0.45, k)])
    r = rng.uniform(0.004, 0.011, k)
    tubes.append((dots, dots, r, r))
    return _concat_tubes(tubes, 2)


def _chest_anatomy(
    rng: np.random.Generator, shape: tuple[int, int], c: CovidModel
) -> tuple[np.ndarray, np.ndarray]:
    """Healthy axial chest slice ``shape`` in HU and the lung occupancy ``shape`` in [0, 1].

    Fat envelope, muscle, two posteriorly widening lungs with texture, a gravity gradient and
    vessels, heart, descending aorta, vertebra with spinal canal, ribs and sternum.
    """
    px = 2.0 / shape[0]
    cy = rng.uniform(-0.03, 0.05)
    body = (rng.uniform(0.6, 0.7), rng.uniform(0.84, 0.93))  # (y, x) semi-axes: wider than deep
    fat = rng.uniform(0.03, 0.07)
    inner = (body[0] - fat, body[1] - fat)
    img = np.full(shape, c.air_hu)
    img = _blend(img, c.fat_hu, _disc(shape, (cy, 0.0), body))
    img = _blend(img, c.soft_tissue_hu, _disc(shape, (cy, 0.0), inner))

    lung_axes = (0.8 * inner[0], rng.uniform(0.3, 0.34) * inner[1])
    taper = rng.uniform(0.1, 0.25)
    lungs = [_disc(shape, (cy - 0.03 * inner[0], s * 0.45 * inner[1]), lung_axes, taper) for s in (-1.0, 1.0)]
    lung_occ = np.maximum(*lungs)
    spine = (cy + 0.72 * inner[0], 0.0)
    heart = _disc(shape, (cy - 0.15 * inner[0], 0.1 * inner[1]), (0.42 * inner[0], 0.26 * inner[1]))
    mediastinum = _disc(shape, (spine[0] - 0.12, 0.0), (0.27, 0.16))
    lung_occ *= (1.0 - heart) * (1.0 - mediastinum)
    y = ((np.arange(shape[0]) + 0.5) * px - 1.0)[:, None]
    lung_hu = (
        c.lung_hu
        + c.lung_texture_sd_hu * _smooth_field(rng, shape, shape[0] / 40)
        + c.gravity_gradient_hu * (y - cy) / inner[0]
    )
    img = _blend(img, lung_hu, lung_occ)
    sides = (-1.0, 1.0)
    vessels = _concat_tubes(
        [_lung_vessel_tubes(rng, np.array([cy - 0.05, s * 0.2 * inner[1]]), s, c) for s in sides], 2
    )
    img = _blend(img, c.soft_tissue_hu, _tube_occupancy(shape, *_tubes_to_pixels(vessels, px)) * lung_occ)

    spine_r = rng.uniform(0.09, 0.12)
    img = _blend(img, c.soft_tissue_hu + 5.0, _disc(shape, (spine[0] - 1.6 * spine_r, 0.12), (0.06, 0.06)))
    img = _blend(img, c.bone_cortex_hu, _disc(shape, spine, (spine_r, 1.1 * spine_r)))
    img = _blend(img, c.bone_marrow_hu, _disc(shape, spine, (0.8 * spine_r, 0.9 * spine_r)))
    img = _blend(img, c.soft_tissue_hu - 20.0, _disc(shape, (spine[0] + 1.55 * spine_r, 0.0), (0.045, 0.04)))
    n_ribs = int(rng.integers(8, 13))
    for angle in rng.uniform(0.3 * np.pi, 1.7 * np.pi, n_ribs) - np.pi / 2:  # none at the anterior midline
        rib = (cy + (inner[0] - 0.035) * np.sin(angle), (inner[1] - 0.035) * np.cos(angle))
        img = _blend(img, c.bone_cortex_hu, _disc(shape, rib, (0.022, 0.03)))
    img = _blend(img, c.bone_cortex_hu, _disc(shape, (cy - inner[0] + 0.03, 0.0), (0.02, 0.06)))
    return img, lung_occ


def _opacity_weight(
    rng: np.random.Generator,
    shape: tuple[int, int],
    centre: np.ndarray,
    c: CovidModel,
    patchiness: np.ndarray,
) -> np.ndarray:
    """Soft-edged, patchy, rotated elliptical ground-glass patch weight in [0, 1], ``shape``."""
    a, b = sorted(rng.uniform(*c.opacity_axes, 2), reverse=True)
    theta = rng.uniform(0.0, np.pi)
    out = np.zeros(shape)
    block, yy, xx = _fov_block(shape, tuple(centre), (3.0 * a, 3.0 * a))
    dy, dx = yy - centre[0], xx - centre[1]
    u = (dy * np.cos(theta) + dx * np.sin(theta)) / a
    v = (-dy * np.sin(theta) + dx * np.cos(theta)) / b
    out[block] = np.clip(1.6 * np.exp(-1.25 * (u**2 + v**2)) * (0.75 + 0.5 * patchiness[block]), 0.0, 1.0)
    return out


def _pick_point(rng: np.random.Generator, candidates: np.ndarray) -> np.ndarray:
    """FOV coordinates ``(y, x)`` of one random pixel of the 2-D boolean mask ``candidates``."""
    index = np.unravel_index(rng.choice(np.flatnonzero(candidates)), candidates.shape)
    point: np.ndarray = (np.asarray(index, dtype=np.float64) + 0.5) * (2.0 / candidates.shape[0]) - 1.0
    return point


def _add_covid_findings(
    rng: np.random.Generator, img: np.ndarray, lung_occ: np.ndarray, c: CovidModel
) -> tuple[np.ndarray, dict[str, Any]]:
    """Bilateral peripheral ground-glass patches (sometimes consolidation cores), inside the lungs."""
    shape = img.shape
    lung = lung_occ > 0.5
    depth = ndimage.distance_transform_edt(lung) * (2.0 / shape[0])  # FOV units from the pleura
    peripheral = lung & (depth < c.opacity_peripheral) & (depth > 0.01)
    right_half = np.arange(shape[1])[None, :] >= shape[1] / 2
    n = int(rng.integers(c.n_opacities[0], c.n_opacities[1] + 1))
    sides = np.r_[False, True, rng.random(n - 2) < 0.5]  # bilateral: at least one patch per lung
    patchiness = _smooth_field(rng, shape, shape[0] / 30)
    consolidation = bool(rng.random() < c.consolidation_prob)
    total = np.zeros(shape)
    for j, side in enumerate(sides):
        centre = _pick_point(rng, peripheral & (right_half == side))
        weight = _opacity_weight(rng, shape, centre, c, patchiness) * lung_occ
        img = _blend(img, _uniform(rng, c.ggo_hu) + 30.0 * patchiness, weight)
        if consolidation and j < 2:
            img = _blend(img, _uniform(rng, c.consolidation_hu), np.clip((weight - 0.75) / 0.2, 0.0, 1.0))
        total = np.maximum(total, weight)
    fraction = float((total > 0.3).sum() / max(lung.sum(), 1))
    return img, {"n_opacities": n, "opacity_fraction": round(fraction, 4), "consolidation": consolidation,
                 "nodule": False, "atelectasis": False}


def _add_incidental_findings(
    rng: np.random.Generator, img: np.ndarray, lung_occ: np.ndarray, c: CovidModel
) -> tuple[np.ndarray, dict[str, Any]]:
    """Non-COVID: sometimes a small solid nodule and/or a thin posterior atelectasis streak."""
    shape = img.shape
    lung = lung_occ > 0.5
    nodule = bool(rng.random() < c.nodule_prob)
    if nodule:
        r = rng.uniform(0.015, 0.03)
        nodule_occ = _disc(shape, tuple(_pick_point(rng, lung)), (r, r))
        img = _blend(img, c.soft_tissue_hu - 10.0, nodule_occ * lung_occ)
    atelectasis = bool(rng.random() < c.atelectasis_prob)
    if atelectasis:
        rows = np.flatnonzero(lung.any(axis=1))
        posterior = lung & (np.arange(shape[0])[:, None] >= rows[0] + 0.7 * (rows[-1] - rows[0]))
        start = _pick_point(rng, posterior)
        angle = rng.uniform(-0.4, 0.4)
        direction = np.array([np.sin(angle), rng.choice([-1.0, 1.0]) * np.cos(angle)])
        end = start + rng.uniform(0.1, 0.2) * direction
        r = rng.uniform(0.006, 0.012)
        tube = _tubes_to_pixels((start[None], end[None], np.array([r]), np.array([0.6 * r])), 2.0 / shape[0])
        img = _blend(img, rng.uniform(-200.0, 0.0), _tube_occupancy(shape, *tube) * lung_occ)
    return img, {"n_opacities": 0, "opacity_fraction": 0.0, "consolidation": False,
                 "nodule": nodule, "atelectasis": atelectasis}


def covid_phantom(
    rng: np.random.Generator, covid: bool, size: int = 224
) -> tuple[np.ndarray, dict[str, Any]]:
    """One synthetic axial chest slice.

    Returns a float32 ``(size, size)`` array in ``[0, 1]`` (lung window ``[-1000, 400]`` HU mapped
    linearly to ``[0, 1]`` and clipped), rows anterior -> posterior, pixel spacing
    ``fov_mm / size`` mm, and a dict of scalar attributes: ``n_opacities`` (ground-glass /
    consolidation patches, 0 for non-COVID), ``opacity_fraction`` (of lung area), ``consolidation``,
    ``nodule``, ``atelectasis``, ``noise_sd_hu``, ``spacing_mm``, ``window_hu`` ("-1000,400").
    """
    c = COVID_MODEL
    if size < _MIN_COVID_SIZE:
        raise DataError(f"covid phantom size must be >= {_MIN_COVID_SIZE} pixels, got {size}")
    img, lung_occ = _chest_anatomy(rng, (size, size), c)
    findings = _add_covid_findings if covid else _add_incidental_findings
    img, attrs = findings(rng, img, lung_occ, c)
    noise_sd = _uniform(rng, c.noise_sd_hu)
    img = _ct_finish(rng, img, c.blur_sigma_px, noise_sd, c.noise_corr_sigma_px)
    lo, hi = c.window_hu
    attrs.update(
        noise_sd_hu=round(noise_sd, 2), spacing_mm=round(c.fov_mm / size, 4), window_hu=f"{lo:g},{hi:g}"
    )
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32), attrs


# --------------------------------------------------------------------------------------------
# datasets


_GENERATORS = {"nodule3d": nodule_phantom, "covid2d": covid_phantom}


def _assign_labels(children: list[np.random.SeedSequence], positive_fraction: float) -> np.ndarray:
    """Exactly ``round(n * f)`` positives: the samples whose first child-seed draw ranks lowest."""
    u = np.array([np.random.default_rng(child).random() for child in children])
    labels = np.zeros(len(children), dtype=int)
    labels[np.argsort(u, kind="stable")[: round(len(children) * positive_fraction)]] = 1
    return labels


def generate_synthetic(
    task: str,
    out: Path,
    *,
    n: int,
    seed: int,
    size: int = 224,
    test_fraction: float = 0.2,
    n_folds: int = 5,
    malignant_fraction: float = 0.35,
) -> dict[str, Any]:
    """Write a synthetic dataset of ``n`` phantoms for ``task`` ("nodule3d" or "covid2d") to ``out``.

    nodule3d arrays are ``(32, 32, 32)`` HU cubes (the paper's input; ``size`` is ignored);
    covid2d arrays are ``(size, size)`` slices in ``[0, 1]``. ``malignant_fraction`` is the
    fraction of label 1 (malignant / COVID). Every sample is its own synthetic patient. Same seed,
    same content hash. Returns a JSON-serialisable report (task, n, class counts, content hash,
    split summary, generator parameters).
    """
    spec = task_spec(task)
    if task not in _GENERATORS:
        raise DataError(f"no synthetic phantoms for task {task!r} (synthetic tasks: {', '.join(_GENERATORS)}; "
                        "nodule2d is real LIDC-IDRI data: `ctharden ingest lidc2d`)")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        raise DataError(f"synthetic {task}: n must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"synthetic {task}: seed must be a non-negative integer, got {seed!r}")
    if not 0.0 <= malignant_fraction <= 1.0:
        raise DataError(f"synthetic {task}: malignant_fraction must be in [0, 1], got {malignant_fraction}")
    if task == "covid2d" and size < _MIN_COVID_SIZE:
        raise DataError(f"synthetic covid2d: size must be >= {_MIN_COVID_SIZE} pixels, got {size}")
    n = int(n)
    phantom = _GENERATORS[task]
    sample_size = NODULE_MODEL.cube if task == "nodule3d" else int(size)
    shape = (sample_size,) * spec.ndim
    model = NODULE_MODEL if task == "nodule3d" else COVID_MODEL
    parameters = {
        "generator_version": GENERATOR_VERSION,
        "n": n,
        "size": sample_size,
        "malignant_fraction": malignant_fraction,
        "label_assignment": "exactly round(n*f) positives: the lowest first draws of the child seeds",
        "model": asdict(model),
    }
    provenance = {
        "source": "synthetic",
        "generator": f"ctharden.data.synthetic.{phantom.__name__}",
        "seed": seed,
        "parameters": parameters,
        "note": "synthetic CT-like phantoms, not patient data",
    }
    children = np.random.SeedSequence(seed).spawn(n)
    labels = _assign_labels(children, malignant_fraction)
    writer = DatasetWriter(
        Path(out),
        task,
        shape=shape,
        provenance=provenance,
        test_fraction=test_fraction,
        n_folds=n_folds,
        seed=seed,
    )
    with writer:
        for i in tqdm(range(n), desc=f"synthetic {task}", unit="sample", disable=None, leave=False):
            rng = np.random.default_rng(children[i])
            rng.random()  # the draw used for label assignment
            array, attrs = phantom(rng, bool(labels[i]), sample_size)
            sid = f"synthetic-{task}-{i:05d}"
            row = {
                "sample_id": sid,
                "label": int(labels[i]),
                "patient_id": sid,
                "patient_id_kind": PATIENT_ID_KIND,
                "source": "synthetic",
                **attrs,
            }
            writer.add(row, array)
    info = read_info(out)
    names = spec.label_names
    return {
        "task": task,
        "n_samples": int(info["n_samples"]),
        "out": str(out),
        "seed": seed,
        "shape": list(shape),
        "counts": {names[k]: int((labels == k).sum()) for k in sorted(names)},
        "content_hash": info["content_hash"],
        "split": info["split"],
        "generator": provenance["generator"],
        "parameters": parameters,
    }
