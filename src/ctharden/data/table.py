"""Ingest a team's own labelled CT images listed in a manifest CSV (dataset ``source`` = ``table``).

Manifest: one row per sample, header on line 1. Columns (names are trimmed and case-insensitive):

- ``path`` (required): relative to ``root``; a NIfTI file (``.nii``/``.nii.gz``), a DICOM series
  folder, a single DICOM file (``.dcm``/``.dicom``, or no suffix with the ``DICM`` magic), a
  PNG/JPEG (or other :data:`ctharden.data.covid.IMAGE_EXTENSIONS`) or a ``.npy`` array.
- ``label`` (required): ``0`` or ``1`` (the task's classes, :data:`ctharden.data.dataset.TASKS`).
- ``patient_id`` (required): the split and fold groups.
- ``spacing`` (optional, mm): 2-D: one number (square pixels) or ``y,x``; 3-D: one number
  (isotropic) or ``z,y,x`` (separated by ``,``, ``;`` or spaces). Overrides the file's header.
- ``split`` (optional): ``train`` or ``test`` on every row; kept as given, folds dealt inside train.
- ``sample_id`` (optional): else derived from the path (extension dropped, ``/`` -> ``_``, other
  characters outside ``A-Za-z0-9._-`` -> ``-``).

Values per format (canonical axes ``(z, y, x)`` for volumes, ``(y, x)`` for images):

- NIfTI: ``get_fdata()`` (the header's ``scl_slope``/``scl_inter`` applied), voxel axes ``(x, y, z)``
  transposed to ``(z, y, x)`` as stored (no reorientation by the affine); spacing from the header
  zooms (``xyzt_units`` metre/micron converted to mm).
- DICOM series: :func:`ctharden.data.dicom_series.load_volume` (HU from RescaleSlope/Intercept,
  slices sorted by ImagePositionPatient z; z spacing = median slice step, PixelSpacing in-plane).
- single DICOM: HU = pixel * RescaleSlope + RescaleIntercept, spacing from PixelSpacing.
- PNG/JPEG: :func:`ctharden.data.covid.decode_grayscale`, display values in ``[0, 1]``; refused for
  HU tasks (an 8-bit display image carries no HU).
- ``.npy``: values as stored (``allow_pickle=False``), spacing only from the manifest.

A 2-D task takes a 2-D image or a 3-D array with one singleton axis (dropped); a 3-D task a 3-D
volume. HU tasks clip values below -1024 HU to -1024 HU (air; scanners store -2000/-3024 outside
the reconstruction circle; counted in ``clipped_px``); any other value outside the task's
``value_range`` (or NaN/Inf) is an error. With ``spacing_mm`` each array is resampled with
``scipy.ndimage.zoom`` (linear, ``grid_mode=True``: the field of view is kept, so the new spacing is
``spacing_mm`` up to the rounding of the shape); with ``size`` it is then centre-cropped or padded
(-1024 HU for HU tasks, 0 for unit-interval tasks) to ``size`` per axis. Without ``size`` all arrays
must already have one shape.

Every bad input is a :class:`DataError` with one line naming the manifest line and the path; nothing
is written at ``out`` then (:class:`ctharden.data.dataset.DatasetWriter` is atomic).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import pydicom
from scipy import ndimage
from tqdm import tqdm

from ctharden.core.errors import ConfigError, DataError
from ctharden.core.io import sha256_file
from ctharden.data.covid import IMAGE_EXTENSIONS, decode_grayscale
from ctharden.data.dataset import DatasetWriter, TaskSpec, is_safe_id, read_info, read_manifest, task_spec
from ctharden.data.dicom_series import AIR_HU, find_series, has_dicm_magic, load_volume

__all__ = ["FORMATS", "OPTIONAL_COLUMNS", "REQUIRED_COLUMNS", "SOURCE", "ingest_table"]

SOURCE = "table"
REQUIRED_COLUMNS: tuple[str, ...] = ("path", "label", "patient_id")
OPTIONAL_COLUMNS: tuple[str, ...] = ("spacing", "split", "sample_id")
#: ``original_format`` values, one per reader.
FORMATS: tuple[str, ...] = ("nifti", "dicom_series", "dicom", "image", "npy")
RESAMPLE = "scipy.ndimage.zoom order=1 (linear), grid_mode=True (field of view kept), mode=nearest"
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_NIFTI_UNITS_MM = {"mm": 1.0, "unknown": 1.0, "meter": 1000.0, "micron": 1e-3}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class _Row:
    """One manifest row, checked (ids, label, split, spacing, file present) before any image is read."""

    line: int
    rel: str
    path: Path
    fmt: str
    label: int
    patient_id: str
    sample_id: str
    split: str | None
    spacing: tuple[float, ...] | None  # from the manifest, task axes order, mm

    @property
    def where(self) -> str:
        return f"line {self.line} ({self.rel!r})"


@dataclass(frozen=True)
class _Loaded:
    """A decoded file: ``array`` in canonical axes, ``spacing`` (mm per axis, NaN = unknown)."""

    array: np.ndarray
    spacing: tuple[float, ...]
    value_source: str


@dataclass(frozen=True)
class _Sample:
    row: _Row
    array: np.ndarray  # float32, task rank, final shape
    facts: dict[str, Any]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _row_error(manifest: Path, where: str, message: str) -> DataError:
    return DataError(_one_line(f"{manifest} {where}: {message}"))


# --------------------------------------------------------------------------------------- manifest


def _format_of(path: Path) -> str | None:
    """The reader for ``path`` (one of :data:`FORMATS`) from its kind and name; None if unsupported."""
    name = path.name.lower()
    if path.is_dir():
        return "dicom_series"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return "image"
    if path.suffix.lower() in _DICOM_SUFFIXES or (not path.suffix and has_dicm_magic(path)):
        return "dicom"
    return None


def _derived_id(rel: str) -> str:
    """``"p1/scan 01.nii.gz"`` -> ``"p1_scan-01"``: a file-name-safe sample id from the relative path."""
    text = rel.strip("/")
    for ext in (".nii.gz", ".nii", ".npy", ".dcm", ".dicom", *IMAGE_EXTENSIONS):
        if text.lower().endswith(ext):
            text = text[: -len(ext)]
            break
    parts = [_UNSAFE.sub("-", p).strip("-") for p in text.split("/")]
    return "_".join(p for p in parts if p).lstrip("._-")


def _parse_spacing(text: str, ndim: int) -> tuple[float, ...]:
    """``"0.7"`` or ``"2.5,0.7,0.7"`` -> one positive finite mm value per axis; ValueError otherwise."""
    try:
        values = [float(v) for v in re.split(r"[,;\s]+", text.strip()) if v]
    except ValueError:
        raise ValueError(f"spacing {text!r} is not a number or a list of numbers (mm)") from None
    if len(values) == 1:
        values *= ndim
    axes = "z,y,x" if ndim == 3 else "y,x"
    if len(values) != ndim:
        raise ValueError(f"spacing {text!r}: give one number or {ndim} ({axes}) in mm")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing {text!r}: values must be positive and finite (mm)")
    return tuple(values)


def _read_rows(manifest: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header names (trimmed, lower case) and ``(line number, cells)`` of the non-blank records."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{manifest}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(_one_line(f"{manifest}: cannot read manifest ({exc})")) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{manifest}: empty manifest (no header line)")
        names = [h.strip().lower() for h in header]
        records: list[tuple[int, list[str]]] = []
        for cells in reader:
            if any(c.strip() for c in cells):
                records.append((reader.line_num, cells))
    except csv.Error as exc:
        raise DataError(f"{manifest} line {reader.line_num}: malformed CSV ({exc})") from None
    return names, records


def _plan(manifest: Path, root: Path, spec: TaskSpec) -> tuple[list[_Row], list[str], bool]:
    """Check every manifest row without decoding images; return rows, ignored columns, splits given."""
    names, records = _read_rows(manifest)
    dup = sorted({n for n in names if names.count(n) > 1 and n})
    if dup:
        raise DataError(f"{manifest} line 1 (header): duplicate column(s) {dup}")
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise DataError(
            f"{manifest} line 1 (header): missing column(s) {missing} (required: {', '.join(REQUIRED_COLUMNS)}; "
            f"optional: {', '.join(OPTIONAL_COLUMNS)})"
        )
    if not records:
        raise DataError(f"{manifest}: no sample rows after the header")
    ignored = [n for n in names if n not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    given_splits = "split" in names
    labels = {str(k): k for k in spec.label_names}
    label_text = ", ".join(f"{k} = {v}" for k, v in sorted(spec.label_names.items()))
    rows: list[_Row] = []
    by_id: dict[str, _Row] = {}
    by_path: dict[Path, _Row] = {}
    patient_split: dict[str, _Row] = {}
    for line, cells in records:
        if len(cells) != len(names):
            raise DataError(f"{manifest} line {line}: {len(cells)} fields but the header has {len(names)}")
        cell = {n: c.strip() for n, c in zip(names, cells, strict=True)}
        rel = cell["path"]
        where = f"line {line} ({rel!r})"

        def fail(message: str, where: str = where) -> DataError:
            return _row_error(manifest, where, message)

        if not rel:
            raise fail("empty path")
        if Path(rel).is_absolute():
            raise fail(f"path must be relative to the root {root}")
        path = root / rel
        if not path.exists():
            raise fail(f"file not found: {path}")
        fmt = _format_of(path)
        if fmt is None:
            raise fail("unsupported file type (expected .nii/.nii.gz, a DICOM series folder, .dcm, "
                       f"{'/'.join(sorted(IMAGE_EXTENSIONS))} or .npy)")
        if fmt == "image" and spec.units == "HU":
            raise fail(f"{path.suffix} images carry no HU (display values only): task {spec.name} needs HU "
                       "values, give NIfTI, DICOM or .npy")
        if cell["label"] not in labels:
            raise fail(f"label {cell['label']!r} is not one of {label_text}")
        patient = cell["patient_id"]
        if not patient:
            raise fail("empty patient_id")
        split: str | None = None
        if given_splits:
            split = cell["split"].lower()
            if split not in _SPLITS:
                raise fail(f"split {cell['split']!r} is not 'train' or 'test'")
        sid = cell.get("sample_id", "")
        if sid:
            if not is_safe_id(sid):
                raise fail(f"sample_id {sid!r}: only letters, digits and ._- allowed, first a letter or digit")
        else:
            sid = _derived_id(rel)
            if not sid:
                raise fail("cannot derive a sample_id from the path; give a sample_id column")
        spacing = None
        if cell.get("spacing"):
            try:
                spacing = _parse_spacing(cell["spacing"], spec.ndim)
            except ValueError as exc:
                raise fail(str(exc)) from None
        row = _Row(line, rel, path, fmt, labels[cell["label"]], patient, sid, split, spacing)
        if sid in by_id:
            raise fail(f"duplicate sample_id {sid!r} (also {by_id[sid].where})")
        resolved = path.resolve()
        if resolved in by_path:
            raise fail(f"same file as {by_path[resolved].where}")
        if split is not None:
            first = patient_split.setdefault(patient, row)
            if first.split != split:
                raise fail(f"patient {patient!r} is in {split} here but in {first.split} at {first.where}")
        by_id[sid] = by_path[resolved] = row
        rows.append(row)
    return rows, ignored, given_splits


# --------------------------------------------------------------------------------------- readers


def _valid_spacing(values: Any) -> tuple[float, ...]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        out.append(f if math.isfinite(f) and f > 0 else math.nan)
    return tuple(out)


def _read_nifti(path: Path) -> _Loaded:
    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image):
            raise ValueError(f"not a NIfTI image ({type(img).__name__})")
        data = np.asarray(img.get_fdata(dtype=np.float32))  # scl_slope / scl_inter applied
        header = cast(Any, img.header)  # nibabel's header methods are untyped
        zooms = header.get_zooms()
        unit = str(header.get_xyzt_units()[0])
    except Exception as exc:  # noqa: BLE001 - nibabel/gzip/zlib raise many types on bad bytes
        raise DataError(f"cannot read NIfTI ({type(exc).__name__}: {exc})") from None
    while data.ndim > 3 and data.shape[-1] == 1:  # (x, y, z, 1): one time point
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise DataError(f"{data.ndim}-D NIfTI of shape {data.shape}: expected a 2-D image or a 3-D volume")
    scale = _NIFTI_UNITS_MM.get(unit, 1.0)
    spacing = _valid_spacing(float(z) * scale for z in zooms[: data.ndim])
    return _Loaded(np.ascontiguousarray(data.T), spacing[::-1], "nifti_scl_slope_inter")


def _read_dicom_series(path: Path) -> _Loaded:
    series = find_series(path)
    if len(series) != 1:
        found = "no DICOM files" if not series else f"{len(series)} DICOM series"
        raise DataError(f"folder holds {found}; expected exactly one series")
    (files,) = series.values()
    vol = load_volume(files)
    dz = vol.slice_spacing if len(vol.z_mm) > 1 else math.nan
    spacing = _valid_spacing((dz, vol.spacing_xy[1], vol.spacing_xy[0]))
    return _Loaded(vol.hu, spacing, "dicom_rescale")


def _read_dicom(path: Path) -> _Loaded:
    try:
        ds = pydicom.dcmread(path)
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad or pixel-less files
        raise DataError(f"cannot read DICOM ({type(exc).__name__}: {exc})") from None
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples != 1:
        raise DataError(f"colour DICOM ({samples} samples per pixel, {ds.get('PhotometricInterpretation')}) "
                        "carries no HU")
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    hu = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    row_col = ds.get("PixelSpacing") or [math.nan, math.nan]
    spacing = [float(row_col[0]), float(row_col[1])]
    if hu.ndim == 3:  # multi-frame: frames are z
        spacing.insert(0, float(ds.get("SpacingBetweenSlices", math.nan)))
    return _Loaded(hu, _valid_spacing(spacing), "dicom_rescale")


def _read_image(path: Path) -> _Loaded:
    decoded = decode_grayscale(path.read_bytes(), str(path))
    return _Loaded(decoded.pixels, (math.nan, math.nan), f"image_grey/{decoded.value_scale:g}")


def _read_npy(path: Path) -> _Loaded:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError/OSError/EOFError/... on bad files
        raise DataError(f"cannot read .npy ({type(exc).__name__}: {exc})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise DataError(f".npy holds {getattr(arr, 'dtype', type(arr).__name__)}, not real numbers")
    return _Loaded(arr, (math.nan,) * arr.ndim, "npy_as_stored")


_READERS = {
    "nifti": _read_nifti,
    "dicom_series": _read_dicom_series,
    "dicom": _read_dicom,
    "image": _read_image,
    "npy": _read_npy,
}


# --------------------------------------------------------------------------------------- processing


def _to_rank(loaded: _Loaded, spec: TaskSpec) -> tuple[np.ndarray, tuple[float, ...]]:
    """The array at the task's rank: a 2-D task may drop one singleton axis of a 3-D array."""
    arr, spacing = loaded.array, loaded.spacing
    if arr.ndim == 3 and spec.ndim == 2 and 1 in arr.shape:
        axis = arr.shape.index(1)
        arr = np.take(arr, 0, axis=axis)
        spacing = spacing[:axis] + spacing[axis + 1:]
    if arr.ndim != spec.ndim:
        need = "3-D volume (z, y, x)"
        if spec.ndim == 2:
            need = "2-D image (y, x) (a 3-D array may have one singleton axis)"
        raise DataError(f"{arr.ndim}-D array of shape {tuple(arr.shape)}: task {spec.name} needs a {need}")
    if arr.size == 0:
        raise DataError(f"empty array of shape {tuple(arr.shape)}")
    return arr, spacing


def _check_values(arr: np.ndarray, spec: TaskSpec) -> tuple[np.ndarray, int]:
    """float32 values in the task's range; HU below -1024 clipped to -1024 (count returned)."""
    values = np.asarray(arr, dtype=np.float32)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise DataError(f"{bad} NaN/Inf values")
    lo, hi = spec.value_range
    clipped = 0
    if spec.units == "HU":
        clipped = int(np.count_nonzero(values < lo))
        values = np.maximum(values, np.float32(lo))
    vmin, vmax = float(values.min()), float(values.max())
    if vmin < lo or vmax > hi:
        raise DataError(f"values in [{vmin:g}, {vmax:g}] outside the {spec.name} range [{lo:g}, {hi:g}] "
                        f"({spec.units})")
    return values, clipped


def _fit(arr: np.ndarray, size: int, pad_value: float) -> tuple[np.ndarray, bool, bool]:
    """Centre-crop or pad every axis to ``size``; returns the array and whether it was cropped/padded."""
    crop = tuple(slice((n - size) // 2, (n - size) // 2 + size) if n > size else slice(None) for n in arr.shape)
    out = arr[crop]
    widths = [((size - n) // 2, size - n - (size - n) // 2) if n < size else (0, 0) for n in out.shape]
    padded = any(w != (0, 0) for w in widths)
    if padded:
        out = np.pad(out, widths, mode="constant", constant_values=pad_value)
    return np.ascontiguousarray(out, dtype=np.float32), any(n > size for n in arr.shape), padded


def _spacing_text(spacing: tuple[float, ...]) -> str | None:
    return None if any(math.isnan(s) for s in spacing) else ",".join(f"{s:g}" for s in spacing)


def _sha256(path: Path, fmt: str) -> str:
    """SHA-256 of a file, or of a series folder's ``name<TAB>sha256`` lines (sorted)."""
    if fmt != "dicom_series":
        return sha256_file(path)
    lines = [f"{p.relative_to(path).as_posix()}\t{sha256_file(p)}\n" for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _prepare(row: _Row, spec: TaskSpec, spacing_mm: float | None, size: int | None, pad_value: float) -> _Sample:
    """Read, check, resample and crop/pad one row's image; every error names the row (no prefix)."""
    loaded = _READERS[row.fmt](row.path)
    arr, header_spacing = _to_rank(loaded, spec)
    spacing = row.spacing if row.spacing is not None else header_spacing
    known = _spacing_text(spacing)
    values, clipped = _check_values(arr, spec)
    resampled = False
    if spacing_mm is not None:
        if known is None:
            raise DataError(f"spacing unknown (no 'spacing' in the manifest, none in the {row.fmt} file): "
                            f"cannot resample to {spacing_mm:g} mm")
        factors = tuple(s / spacing_mm for s in spacing)
        if any(abs(f - 1.0) > 1e-9 for f in factors):
            values = ndimage.zoom(values, factors, order=1, mode="nearest", grid_mode=True)
            resampled = True
            if values.size == 0 or min(values.shape) < 1:
                raise DataError(f"shape {tuple(arr.shape)} at {known} mm resamples to nothing at {spacing_mm:g} mm")
    cropped = padded = False
    if size is not None:
        values, cropped, padded = _fit(values, size, pad_value)
    facts: dict[str, Any] = {
        "original_shape": "x".join(str(n) for n in loaded.array.shape),
        "original_spacing_mm": known,
        "spacing_source": "manifest" if row.spacing is not None else ("header" if known else None),
        "value_source": loaded.value_source,
        "file_sha256": _sha256(row.path, row.fmt),
        "clipped_px": clipped,
        "resampled": resampled,
        "cropped": cropped,
        "padded": padded,
    }
    if spacing_mm is not None:
        facts["spacing_mm"] = float(spacing_mm)
    return _Sample(row, np.ascontiguousarray(values, dtype=np.float32), facts)


def _samples(
    manifest: Path, rows: list[_Row], spec: TaskSpec, spacing_mm: float | None, size: int | None, pad: float
) -> Iterator[_Sample]:
    for row in tqdm(rows, desc="table rows", unit="row", disable=None):
        try:
            yield _prepare(row, spec, spacing_mm, size, pad)
        except DataError as exc:
            raise _row_error(manifest, row.where, str(exc)) from None


def ingest_table(
    manifest: Path,
    root: Path,
    out: Path,
    *,
    task: str,
    spacing_mm: float | None = None,
    size: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    n_folds: int = 5,
) -> dict[str, Any]:
    """Ingest the images listed in ``manifest`` (paths relative to ``root``) as a ``task`` dataset at ``out``.

    Arrays: float32 ``(z, y, x)`` volumes (``nodule3d``) or ``(y, x)`` images (``nodule2d``,
    ``covid2d``), in HU for HU tasks and in ``[0, 1]`` for ``covid2d``; resampled to ``spacing_mm``
    (mm per pixel/voxel, all axes) when given and centre-cropped/padded to ``size`` per axis when
    given (see the module docstring for formats, axes and units). Splits: the manifest's ``split``
    column when present (folds patient-grouped inside train, ``test_fraction`` unused), else
    patient-grouped, label-stratified splits from ``seed``. Manifest rows add ``manifest_line``,
    ``original_path``, ``original_format``, ``original_shape``, ``original_spacing_mm`` (``z,y,x`` or
    ``y,x``; empty if unknown), ``spacing_source``, ``value_source``, ``file_sha256``,
    ``clipped_px``, ``resampled``, ``cropped``, ``padded`` and, when resampled, ``spacing_mm``.

    Returns a JSON-serialisable report (counts, formats, shape, split summary, content hash).
    Raises :class:`DataError` with one line naming the manifest line and path on any bad row
    (missing file, undecodable image, wrong rank, values out of range, bad label, duplicate
    sample_id, a patient in both given splits, unknown spacing when resampling, shapes that differ
    without ``size``), or a missing column; :class:`ConfigError` on a bad ``spacing_mm``/``size``.
    Nothing is written at ``out`` on error.
    """
    manifest, root, out = Path(manifest), Path(root), Path(out)
    spec = task_spec(task)
    if spacing_mm is not None and not (math.isfinite(spacing_mm) and spacing_mm > 0):
        raise ConfigError(f"spacing_mm must be positive and finite, got {spacing_mm}")
    if size is not None and size < 1:
        raise ConfigError(f"size must be >= 1, got {size}")
    if not root.is_dir():
        raise DataError(f"{root}: root is not a directory")
    rows, ignored, given_splits = _plan(manifest, root, spec)
    pad = AIR_HU if spec.units == "HU" else 0.0
    provenance = {
        "dataset": SOURCE,
        "manifest": str(manifest),
        "manifest_sha256": sha256_file(manifest),
        "root": str(root),
        "spacing_mm": spacing_mm,
        "size": size,
        "resample": RESAMPLE if spacing_mm is not None else None,
        "pad_value": pad if size is not None else None,
        "hu_clip": "values below -1024 HU clipped to -1024 HU" if spec.units == "HU" else None,
        "splits": "given (manifest split column)" if given_splits else "assigned (patient-grouped)",
    }
    samples = _samples(manifest, rows, spec, spacing_mm, size, pad)
    first = next(samples)
    shape = tuple(first.array.shape)
    formats: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    with DatasetWriter(
        out, task, shape=shape, provenance=provenance, test_fraction=test_fraction,
        n_folds=n_folds, seed=seed, fixed_splits=given_splits,
    ) as writer:
        for sample in itertools.chain([first], samples):
            row = sample.row
            if tuple(sample.array.shape) != shape:
                hint = "" if size is not None else "; pass size to crop/pad to one shape"
                raise _row_error(manifest, row.where, f"array shape {tuple(sample.array.shape)} differs from "
                                 f"{shape} of {first.row.where}{hint}")
            fields: dict[str, Any] = {
                "sample_id": row.sample_id,
                "label": row.label,
                "patient_id": row.patient_id,
                "source": SOURCE,
                **({"split": row.split} if given_splits else {}),
                "manifest_line": row.line,
                "original_path": row.rel,
                "original_format": row.fmt,
                **sample.facts,
            }
            writer.add(fields, sample.array)
            formats[row.fmt] += 1
            counts[spec.label_names[row.label]] += 1
            totals["clipped_px"] += sample.facts["clipped_px"]
            totals["clipped"] += sample.facts["clipped_px"] > 0
            for key in ("resampled", "cropped", "padded"):
                totals[key] += bool(sample.facts[key])
    info = read_info(out)
    manifest_df = read_manifest(out)
    return {
        "source": SOURCE,
        "task": task,
        "manifest": str(manifest),
        "root": str(root),
        "out": str(out),
        "n_samples": int(info["n_samples"]),
        "counts": dict(sorted(counts.items())),
        "formats": dict(sorted(formats.items())),
        "n_patients": int(manifest_df["patient_id"].nunique()),
        "shape": list(shape),
        "units": spec.units,
        "spacing_mm": spacing_mm,
        "size": size,
        "resample": provenance["resample"],
        "n_resampled": totals["resampled"],
        "n_cropped": totals["cropped"],
        "n_padded": totals["padded"],
        "n_clipped_to_air": totals["clipped"],
        "clipped_px": totals["clipped_px"],
        "splits": "given" if given_splits else "assigned",
        "ignored_columns": ignored,
        "split": info["split"],
        "content_hash": info["content_hash"],
    }
