"""Synthetic phantoms: dataset format, physical plausibility, learnability, determinism, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from ctharden.core.errors import DataError
from ctharden.data.dataset import load_arrays, read_info, read_manifest
from ctharden.data.synthetic import covid_phantom, generate_synthetic, nodule_phantom

NODULE_COLUMNS = {
    "malignancy_mean", "malignancy_class", "n_readers", "ratings", "diameter_mm", "spacing_mm",
    "calcified", "spiculated", "lobulated", "part_solid",
}  # fmt: skip


def _corner_median(cube: np.ndarray, k: int = 3) -> float:
    """Median HU of the eight ``k``-voxel corner blocks of a cube."""
    s = cube.shape[0]
    ends = (0, s - k)
    blocks = [cube[z : z + k, y : y + k, x : x + k] for z in ends for y in ends for x in ends]
    return float(np.median(np.stack(blocks)))


@pytest.fixture(scope="module")
def nodule_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic") / "nodule3d"
    return out, generate_synthetic("nodule3d", out, n=60, seed=7)


@pytest.fixture(scope="module")
def nodule_sample() -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """300 cubes from the single-sample generator, one third malignant, one child seed each."""
    labels = np.arange(300) % 3 == 0
    cubes, attrs = [], []
    for child, label in zip(np.random.SeedSequence(11).spawn(len(labels)), labels, strict=True):
        cube, a = nodule_phantom(np.random.default_rng(child), bool(label))
        cubes.append(cube)
        attrs.append(a)
    return np.stack(cubes), labels, attrs


def test_nodule3d_dataset_is_labelled_synthetic_and_well_formed(nodule_dataset: tuple[Path, dict]) -> None:
    out, report = nodule_dataset
    info, manifest = read_info(out), read_manifest(out)
    assert info["task"] == "nodule3d" and info["shape"] == [32, 32, 32] and info["dtype"] == "float32"
    assert info["sources"] == ["synthetic"] and info["provenance"]["source"] == "synthetic"
    assert info["provenance"]["seed"] == 7 and "model" in info["provenance"]["parameters"]
    assert report["content_hash"] == info["content_hash"] and report["n_samples"] == 60
    assert json.loads(json.dumps(report))["parameters"]["model"]["cube"] == 32
    assert report["counts"] == {"benign": 39, "malignant": 21}  # round(60 * 0.35) = 21
    assert (manifest["source"] == "synthetic").all()
    assert (manifest["patient_id_kind"] == "synthetic-phantom").all()
    assert manifest["patient_id"].is_unique
    assert manifest["patient_id"].str.startswith("synthetic-nodule3d-").all()
    assert NODULE_COLUMNS <= set(manifest.columns)
    assert int(manifest["label"].sum()) == 21 and set(manifest["split"]) == {"train", "test"}

    cubes = load_arrays(out, manifest["array"].tolist())
    assert cubes.shape == (60, 32, 32, 32) and cubes.dtype == np.float32
    assert np.isfinite(cubes).all() and cubes.min() >= -1024 and cubes.max() <= 3071

    # LIDC-like ratings consistent with the label: mean > 3 iff malignant, never exactly 3
    malignant = manifest["label"].to_numpy() == 1
    means = manifest["malignancy_mean"].to_numpy()
    assert np.all(means[malignant] > 3) and np.all(means[~malignant] < 3)
    for ratings, n_readers, mean in zip(manifest["ratings"], manifest["n_readers"], means, strict=True):
        values = [int(v) for v in str(ratings).split(";")]
        assert len(values) == n_readers and 1 <= n_readers <= 4 and all(1 <= v <= 5 for v in values)
        assert np.mean(values) == pytest.approx(mean, abs=1e-3)
    assert manifest["malignancy_class"].between(1, 5).all() and (manifest["spacing_mm"] == 1.0).all()

    # physical plausibility: lung background, solid nodule centre, size separates the classes
    no_wall = ~manifest["pleura"].to_numpy()
    corners = np.array([_corner_median(c) for c in cubes[no_wall]])
    assert abs(np.median(corners) + 850) < 30 and np.all(np.abs(corners + 850) < 80)
    solid = ~manifest["part_solid"].to_numpy()
    centres = manifest[["center_z", "center_y", "center_x"]].to_numpy().round().astype(int)
    centre_hu = cubes[np.arange(60), centres[:, 0], centres[:, 1], centres[:, 2]]
    assert np.all(centre_hu[solid] > -100)
    diameter = manifest["diameter_mm"].to_numpy()
    assert diameter[malignant].mean() > diameter[~malignant].mean() + 4
    assert manifest.loc[~malignant, ["spiculated", "part_solid"]].to_numpy().sum() == 0
    assert not manifest.loc[malignant, "calcified"].any()


def test_mean_hu_alone_does_not_separate_the_classes_but_diameter_does(
    nodule_sample: tuple[np.ndarray, np.ndarray, list[dict]],
) -> None:
    cubes, labels, attrs = nodule_sample
    mean_hu = cubes.mean(axis=(1, 2, 3)).astype(np.float64)
    feature = ((mean_hu - mean_hu.mean()) / mean_hu.std())[:, None]
    train_acc = LogisticRegression().fit(feature, labels).score(feature, labels)
    best_threshold_acc = max(((mean_hu > t) == labels).mean() for t in np.unique(mean_hu))
    assert train_acc < 0.9 and best_threshold_acc < 0.9, (train_acc, best_threshold_acc)
    diameter = np.array([a["diameter_mm"] for a in attrs])
    assert np.corrcoef(diameter, labels)[0, 1] > 0.6
    assert diameter[labels].min() < diameter[~labels].max()  # sizes overlap, as in LIDC


def test_nodule_phantom_morphology_flags_show_in_the_voxels(
    nodule_sample: tuple[np.ndarray, np.ndarray, list[dict]],
) -> None:
    cubes, labels, attrs = nodule_sample
    peak = cubes.reshape(len(cubes), -1).max(axis=1)
    calcified = np.array([a["calcified"] for a in attrs])
    assert calcified.any() and np.all(peak[calcified] > 120) and np.median(peak[~calcified]) < 120
    frac = calcified[~labels].mean()
    assert 0.15 < frac < 0.45  # ~30 % of benign nodules are calcified
    for flag in ("spiculated", "lobulated", "part_solid"):
        assert any(a[flag] for a, lab in zip(attrs, labels, strict=True) if lab)


def test_same_seed_same_hash_and_samples_do_not_depend_on_n(tmp_path: Path) -> None:
    first = generate_synthetic("nodule3d", tmp_path / "a", n=10, seed=3)
    again = generate_synthetic("nodule3d", tmp_path / "b", n=10, seed=3)
    other = generate_synthetic("nodule3d", tmp_path / "c", n=10, seed=4)
    longer = generate_synthetic("nodule3d", tmp_path / "d", n=20, seed=3)
    assert first["content_hash"] == again["content_hash"] != other["content_hash"]
    assert longer["counts"]["malignant"] == 7  # exactly round(20 * 0.35)

    short_m, long_m = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "d").iloc[:10]
    assert (short_m["sample_id"].to_numpy() == long_m["sample_id"].to_numpy()).all()
    same_label = short_m["label"].to_numpy() == long_m["label"].to_numpy()
    assert same_label.sum() >= 7  # label ranks are stable across n except near the threshold
    short_x = load_arrays(tmp_path / "a", short_m["array"].tolist())
    long_x = load_arrays(tmp_path / "d", long_m["array"].tolist())
    for i in np.flatnonzero(same_label):
        np.testing.assert_array_equal(short_x[i], long_x[i])
        assert short_m["sha256"].iloc[i] == long_m["sha256"].iloc[i]


def test_covid2d_slices(tmp_path: Path) -> None:
    report = generate_synthetic("covid2d", tmp_path / "covid", n=12, seed=1, size=64, malignant_fraction=0.5)
    info, manifest = read_info(tmp_path / "covid"), read_manifest(tmp_path / "covid")
    assert info["shape"] == [64, 64] and info["provenance"]["source"] == "synthetic"
    assert report["counts"] == {"non-COVID": 6, "COVID": 6}
    assert (manifest["source"] == "synthetic").all()
    assert (manifest["patient_id_kind"] == "synthetic-phantom").all()
    assert {"n_opacities", "spacing_mm", "window_hu"} <= set(manifest.columns)
    assert (manifest["window_hu"] == "-1000,400").all()
    assert ((manifest["n_opacities"] > 0) == (manifest["label"] == 1)).all()
    slices = load_arrays(tmp_path / "covid", manifest["array"].tolist())
    assert slices.shape == (12, 64, 64) and slices.dtype == np.float32
    assert np.isfinite(slices).all() and slices.min() >= 0.0 and slices.max() <= 1.0

    # ground glass (-700..-200 HU = 0.21..0.57 in the lung window) covers more of a COVID slice
    def mid_gray(covid: bool, seed: int) -> float:
        img, _ = covid_phantom(np.random.default_rng(seed), covid, size=64)
        return float(((img > 0.21) & (img < 0.57)).mean())

    covid = np.mean([mid_gray(True, s) for s in range(20)])
    clean = np.mean([mid_gray(False, s) for s in range(20)])
    assert covid > clean + 0.005, (covid, clean)
    assert covid_phantom(np.random.default_rng(0), False)[0].shape == (224, 224)


@pytest.mark.parametrize(
    ("task", "kwargs", "match"),
    [
        ("nodule4d", {"n": 5}, "unknown task"),
        ("nodule2d", {"n": 5}, "no synthetic phantoms for task 'nodule2d'"),
        ("nodule3d", {"n": 0}, "positive integer"),
        ("covid2d", {"n": -3}, "positive integer"),
        ("nodule3d", {"n": 5, "malignant_fraction": 1.5}, "malignant_fraction"),
        ("covid2d", {"n": 5, "size": 8}, "size"),
        ("covid2d", {"n": 5, "seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_data_error(tmp_path: Path, task: str, kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        generate_synthetic(task, tmp_path / "out", **{"seed": 0, **kwargs})
    assert not (tmp_path / "out").exists()
