"""LIDC-IDRI nodule crops (the ``lidc_maxslice`` release) -> a ``nodule2d`` dataset in HU.

Input (``root``): ``crops.npz`` (``images`` ``(N, 71, 71)`` int16 stored DICOM values, ``nodule_id``
``(N,)``) and ``annotations.csv`` (one row per crop, same order): one crop per radiologist
annotation, on the axial slice where that annotation's area is largest, centred on it.

Per crop, counted in the report:

- **HU**: ``value × slope + intercept`` from the slice's DICOM header where it is known
  (``hu_source = "header"``); otherwise the intercept is recovered from the image
  (:func:`intercept_from_image`, ``hu_source = "image_rule"``): every crop holds lung, so its
  10th percentile is below -700 when the values are already HU and about 0-300 with the +1024
  offset. The rule agrees with the header on 91 % of the crops that have one; every disagreement is
  -1000 vs -1024 (24 HU).
- **Label** from the mean of *all* readers' ratings of the physical nodule (``Malignancy_1..4``,
  0/empty = no reader): mean == 3 dropped, > 3 malignant, < 3 benign (shen 2020, section 2.6);
  the mean, the rounded 1-5 class and this reader's own rating are kept. This reader's rating is
  ``Malignancy_<RadiologistID>`` (RadiologistID k is the k-th reading session of the nodule's XML,
  checked against the DICOM + XML of LIDC-IDRI-0001..0003); the release's own ``malignancy`` column
  is not it (it matches on 74 % of rows; the rounded-up median of the readers on 97 %) and is kept
  as ``release_malignancy`` only.
- **Spacing**: resampled to ``spacing_mm`` (default 0.7 mm) on a ``size`` × ``size`` grid
  (default 45: 31.5 mm, inside every release crop) around the crop centre
  (:mod:`ctharden.data.patch2d`), so nodule size means the same in every sample.
- **Range**: clipped to [-1024, 3071] HU (:func:`clip_hu`; ``clipped_px`` counts it).
- **Acquisition** columns where the header is known (:mod:`ctharden.data.acquisition`: ``mas`` is
  mA × rotation time; the vendor ``Exposure`` field is not).
- **Splits** grouped by patient and stratified by label (:mod:`ctharden.data.splits`): the up to
  four crops of one nodule, and all nodules of one patient, share a split.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctharden.core.errors import DataError
from ctharden.data.acquisition import acquisition_from_row
from ctharden.data.dataset import DatasetWriter, read_info
from ctharden.data.lidc_xml import malignancy_class, malignancy_label
from ctharden.data.patch2d import DEFAULT_SIZE, DEFAULT_SPACING_MM, resample_patch

CROPS = "crops.npz"
ANNOTATIONS = "annotations.csv"
RATING_COLUMNS = ("Malignancy_1", "Malignancy_2", "Malignancy_3", "Malignancy_4")
REQUIRED = ("noduleID", "RadiologistID", "malignancy", *RATING_COLUMNS, "PixelSpacing", "patient_id",
            "SeriesInstanceUid")
HU_RANGE = (-1024.0, 3071.0)
P10_OFFSET_THRESHOLD = -300.0  # stored-value 10th percentile above this: values carry the +1024 offset
ATTRIBUTION = ("LIDC-IDRI (TCIA, CC BY 3.0; Armato et al. 2011, Med Phys 38:915, doi:10.7937/K9/TCIA.2015.LO9QL9SX); "
               "crops and ratings from github.com/mtzig/LIDC_GDRO (MIT)")


def intercept_from_image(stored: np.ndarray) -> float:
    """The rescale intercept of a lung crop without a header: -1024 if its 10th percentile > -300, else 0."""
    return -1024.0 if float(np.percentile(stored, 10)) > P10_OFFSET_THRESHOLD else 0.0


def clip_hu(image: np.ndarray) -> tuple[np.ndarray, int]:
    """``image`` clipped to the CT range [-1024, 3071] HU and the number of pixels clipped.

    Below -1024 HU are noise in air of scans stored without offset and the -3024 HU padding
    outside a scanner's reconstruction circle (10 of the 1616 labelled release crops)."""
    lo, hi = HU_RANGE
    clipped = int(((image < lo) | (image > hi)).sum())
    return np.clip(image, lo, hi).astype(np.float32), clipped


def reader_ratings(row: pd.Series, where: str) -> list[int]:
    """The 1-5 ratings of every reader of the row's nodule (0 or empty = fewer readers)."""
    ratings = []
    for col in RATING_COLUMNS:
        v = row[col]
        if v is None or (isinstance(v, float) and math.isnan(v)) or v == 0:
            continue
        if not float(v).is_integer() or not 1 <= int(v) <= 5:
            raise DataError(f"{where}: {col} = {v!r} is not a rating in 1..5 (0 or empty = no reader)")
        ratings.append(int(v))
    if not ratings:
        raise DataError(f"{where}: no reader rating in {', '.join(RATING_COLUMNS)}")
    return ratings


def own_rating(row: pd.Series, where: str) -> int:
    """This reader's 1-5 rating: ``Malignancy_<RadiologistID>``."""
    reader = row["RadiologistID"]
    if not (isinstance(reader, (int, np.integer)) or float(reader).is_integer()) or not 1 <= int(reader) <= 4:
        raise DataError(f"{where}: RadiologistID = {reader!r} is not a reader 1..4")
    v = row[f"Malignancy_{int(reader)}"]
    if v is None or (isinstance(v, float) and math.isnan(v)) or not 1 <= int(v) <= 5:
        raise DataError(f"{where}: Malignancy_{int(reader)} (this crop's reader) = {v!r} is not a rating in 1..5")
    return int(v)


def _load(root: Path) -> tuple[np.ndarray, pd.DataFrame]:
    crops, ann = root / CROPS, root / ANNOTATIONS
    for path in (crops, ann):
        if not path.is_file():
            raise DataError(f"{path}: missing (an LIDC crop release needs {CROPS} and {ANNOTATIONS})")
    try:
        with np.load(crops, allow_pickle=False) as z:
            images, ids = np.asarray(z["images"]), np.asarray(z["nodule_id"])
    except (KeyError, ValueError, OSError) as exc:
        raise DataError(f"{crops}: not a crop archive with 'images' and 'nodule_id' ({exc})") from None
    try:
        table = pd.read_csv(ann)
    except (ValueError, OSError) as exc:
        raise DataError(f"{ann}: unreadable CSV ({exc})") from None
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise DataError(f"{ann}: missing column(s) {missing}")
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise DataError(f"{crops}: images must be (N, S, S), got shape {images.shape}")
    if ids.shape != (images.shape[0],):
        raise DataError(f"{crops}: nodule_id has shape {ids.shape} for {images.shape[0]} images")
    if len(table) != len(images):
        first = min(len(table), len(images))
        what = (f"row {first + 2} (noduleID {table.noduleID.iloc[first]}) has no image" if len(table) > len(images)
                else f"crop {first} has no row")
        raise DataError(f"{ann}: {len(table)} rows but {len(images)} crops in {crops}; {what}")
    bad = np.flatnonzero(table["noduleID"].to_numpy() != ids)
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{ann}: row {i + 2} has noduleID {table.noduleID.iloc[i]} but crop {i} of {crops} is "
                        f"nodule_id {ids[i]}")
    return images, table


def ingest_lidc2d(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    spacing_mm: float = DEFAULT_SPACING_MM,
    size: int = DEFAULT_SIZE,
    limit: int | None = None,
    test_fraction: float = 0.2,
    n_folds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Ingest an LIDC crop release at ``root`` into a ``nodule2d`` dataset at ``out``; return the report.

    ``limit`` keeps the first ``limit`` patients (in file order) for small test datasets.
    """
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise DataError(f"{root}: LIDC crop release root is not a directory")
    images, table = _load(root)
    if limit is not None:
        keep = set(pd.unique(table["patient_id"])[:limit])
        mask = table["patient_id"].isin(keep).to_numpy()
        images, table = images[mask], table[mask]
    counts: Counter[str] = Counter()
    provenance = {"source": ATTRIBUTION, "root": str(root), "release": "lidc_maxslice", "spacing_mm": spacing_mm,
                  "size": size, "interpolation": "bilinear",
                  "label": "mean of all readers' ratings: > 3 malignant, < 3 benign, == 3 dropped",
                  "hu": "header slope/intercept where known, else intercept from the image's 10th percentile"}
    with DatasetWriter(out, "nodule2d", shape=(size, size), provenance=provenance,
                       test_fraction=test_fraction, n_folds=n_folds, seed=seed) as writer:
        for i, (stored, (_, row)) in enumerate(zip(images, table.iterrows(), strict=True)):
            where = f"{root / ANNOTATIONS} row {i + 2} (noduleID {row['noduleID']})"
            ratings = reader_ratings(row, where)
            reader_rating = own_rating(row, where)
            mean = float(np.mean(ratings))
            label = malignancy_label(mean)
            counts["crops"] += 1
            if label is None:
                counts["dropped_mean_eq_3"] += 1
                continue
            spacing = float(row["PixelSpacing"])
            if not (math.isfinite(spacing) and 0.2 <= spacing <= 2.0):
                raise DataError(f"{where}: PixelSpacing {row['PixelSpacing']!r} mm is not a CT pixel size")
            slope, intercept = float(row.get("Rescale Slope", math.nan)), float(row.get("Rescale Intercept", math.nan))
            if math.isfinite(slope) and math.isfinite(intercept):
                hu_source = "header"
            else:
                slope, intercept, hu_source = 1.0, intercept_from_image(stored), "image_rule"
            counts[f"hu_{hu_source}"] += 1
            hu = stored.astype(np.float64) * slope + intercept
            c = (stored.shape[0] - 1) / 2.0
            patch = resample_patch(hu, spacing, (c, c), out_spacing_mm=spacing_mm, size=size)
            image, clipped = clip_hu(patch.image)
            counts["crops_clipped"] += clipped > 0
            acq = acquisition_from_row(row)
            counts["mas_known" if acq["mas_source"] != "unknown" else "mas_unknown"] += 1
            pid = str(row["patient_id"])
            writer.add({
                "sample_id": f"{pid}-n{int(row['noduleID']):04d}-r{int(row['RadiologistID'])}",
                "label": label, "patient_id": pid, "source": "lidc",
                "series_uid": str(row["SeriesInstanceUid"]), "nodule_id": int(row["noduleID"]),
                "reader_id": int(row["RadiologistID"]), "reader_rating": reader_rating,
                "release_malignancy": row["malignancy"],
                "ratings": ";".join(map(str, ratings)), "n_readers": len(ratings),
                "malignancy_mean": round(mean, 4), "malignancy_class": malignancy_class(mean),
                "z_mm": float(row.get("imageZposition", math.nan)),
                "equiv_diameter_mm": round(float(row.get("EquivDiameter", math.nan)) * spacing, 3),
                "spacing_mm": spacing_mm, "source_spacing_mm": spacing, "padded_px": patch.padded_px,
                "clipped_px": clipped,
                "hu_source": hu_source, "rescale_slope": slope, "rescale_intercept": intercept,
                **acq,
            }, image)
            counts["malignant" if label == 1 else "benign"] += 1
        if len(writer) == 0:
            raise DataError(f"{root}: no crop has a mean rating other than 3")
    info = read_info(out)
    return {"root": str(root), "out": str(out), "counts": dict(sorted(counts.items())),
            "n_samples": info["n_samples"], "n_patients": int(table["patient_id"].nunique()),
            "spacing_mm": spacing_mm, "size": size, "content_hash": info["content_hash"]}
