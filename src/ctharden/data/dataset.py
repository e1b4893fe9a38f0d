"""The one on-disk dataset format shared by every source (LIDC-IDRI, COVID-CT, synthetic).

A dataset is a directory::

    manifest.csv    one row per sample: sample_id, label, label_name, patient_id, patient_id_kind,
                    source, split (train|test), fold (0..k-1 for train, -1 for test), array
                    (relative path), sha256 (of the array file), plus task-specific columns
    arrays/<sample_id>.npy   one float32 array per sample, memory-mappable
    dataset.json    task, array shape, dtype, units, label names, counts, content hash, provenance

Tasks and units:

- ``nodule3d``: ``(32, 32, 32)`` float32 cubes in Hounsfield units (HU), axes ``(z, y, x)``,
  1 mm isotropic, air-padded (-1024 HU) at the scan edge.
- ``nodule2d``: ``(S, S)`` float32 axial nodule patches in HU, axes ``(y, x)``, resampled to one
  pixel spacing (``spacing_mm`` column; default 0.7 mm) around the nodule (``ctharden.data.lidc2d``).
- ``covid2d``: ``(H, W)`` float32 single-channel slices in display units scaled to ``[0, 1]``.

The ``table`` source (``ctharden.data.table``, a team's own manifest of images) keeps the task's
rank and units but not its fixed size or spacing: its shape and any resampling spacing are in
``dataset.json`` (``shape``, provenance ``spacing_mm``).

The content hash is the SHA-256 of ``manifest.csv``, which itself records every array's SHA-256,
so it changes whenever any label, id or voxel changes. Later stages log it to MLflow as the data
version. Writing is atomic: the directory is built aside and swapped in only when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctharden import __version__
from ctharden.core.errors import DataError
from ctharden.core.io import atomic_directory, atomic_write_json
from ctharden.data.splits import assign_folds_to_given_splits, assign_splits

MANIFEST = "manifest.csv"
INFO = "dataset.json"
ARRAYS = "arrays"
REQUIRED_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "label",
    "label_name",
    "patient_id",
    "patient_id_kind",
    "source",
    "split",
    "fold",
    "array",
    "sha256",
)
SOURCES: tuple[str, ...] = ("lidc", "soares", "ucsd", "synthetic", "table")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class TaskSpec:
    """What a task's arrays look like: rank, units, allowed value range and class names."""

    name: str
    ndim: int
    units: str
    value_range: tuple[float, float]
    label_names: Mapping[int, str]


TASKS: dict[str, TaskSpec] = {
    "nodule3d": TaskSpec("nodule3d", 3, "HU", (-1024.0, 3071.0), {0: "benign", 1: "malignant"}),
    "nodule2d": TaskSpec("nodule2d", 2, "HU", (-1024.0, 3071.0), {0: "benign", 1: "malignant"}),
    "covid2d": TaskSpec("covid2d", 2, "unit interval [0,1]", (0.0, 1.0), {0: "non-COVID", 1: "COVID"}),
}


def task_spec(task: str) -> TaskSpec:
    """Return the :class:`TaskSpec` for ``task`` or raise a :class:`DataError` naming the choices."""
    try:
        return TASKS[task]
    except KeyError:
        raise DataError(f"unknown task {task!r} (expected one of: {', '.join(TASKS)})") from None


def is_safe_id(text: str) -> bool:
    """True if ``text`` can be a sample_id (it names its array file): letters, digits, ``._-``; first alphanumeric."""
    return bool(_SAFE_ID.match(text))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


@dataclass
class DatasetWriter:
    """Stream samples into a new dataset directory; :meth:`commit` splits, hashes and swaps it in.

    Use as a context manager: if the block raises, nothing is written at ``out_dir``.
    ``fixed_splits``: every row carries its own ``split`` (train|test), which is kept; only the
    train rows are dealt to folds (``test_fraction`` is then unused).

    >>> with DatasetWriter(out, "nodule3d", shape=(32, 32, 32), provenance={...}) as w:
    ...     w.add({"sample_id": "a", "label": 1, "patient_id": "p1", "source": "lidc"}, cube)
    """

    out_dir: Path
    task: str
    shape: tuple[int, ...]
    provenance: dict[str, Any] = field(default_factory=dict)
    test_fraction: float = 0.2
    n_folds: int = 5
    seed: int = 0
    fixed_splits: bool = False
    _rows: list[dict[str, Any]] = field(default_factory=list, init=False)
    _tmp: Path | None = field(default=None, init=False)
    _ctx: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.spec = task_spec(self.task)
        if len(self.shape) != self.spec.ndim:
            raise DataError(f"task {self.task} needs {self.spec.ndim}-D arrays, got shape {self.shape}")

    def __enter__(self) -> DatasetWriter:
        self._ctx = atomic_directory(self.out_dir)
        self._tmp = self._ctx.__enter__()
        (self._tmp / ARRAYS).mkdir()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None:
            try:
                self._finish()
            except BaseException as err:
                self._ctx.__exit__(type(err), err, err.__traceback__)
                raise
        return bool(self._ctx.__exit__(exc_type, exc, tb))

    def add(self, row: Mapping[str, Any], array: np.ndarray) -> None:
        """Add one sample. ``row`` needs sample_id, label, patient_id, source; ``array`` the task shape."""
        assert self._tmp is not None, "use DatasetWriter as a context manager"
        for key in ("sample_id", "label", "patient_id", "source"):
            if key not in row:
                raise DataError(f"sample row is missing {key!r}: {dict(row)}")
        sid = str(row["sample_id"])
        if not is_safe_id(sid):
            raise DataError(f"sample_id {sid!r} has characters not allowed in a file name")
        if tuple(array.shape) != tuple(self.shape):
            raise DataError(f"sample {sid}: array shape {array.shape} != dataset shape {self.shape}")
        label = int(row["label"])
        if label not in self.spec.label_names:
            raise DataError(f"sample {sid}: label {label} not in {sorted(self.spec.label_names)}")
        data = _npy_bytes(array)
        rel = f"{ARRAYS}/{sid}.npy"
        target = self._tmp / rel
        if target.exists():
            raise DataError(f"duplicate sample_id {sid!r}")
        target.write_bytes(data)
        full = {
            "label_name": self.spec.label_names[label],
            "patient_id_kind": "patient",
            **row,
            "sample_id": sid,
            "label": label,
            "array": rel,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        self._rows.append(full)

    def __len__(self) -> int:
        return len(self._rows)

    def _finish(self) -> None:
        assert self._tmp is not None
        if not self._rows:
            raise DataError(f"{self.out_dir}: no samples to write (empty dataset)")
        manifest = pd.DataFrame(self._rows)
        if self.fixed_splits:
            manifest, split_info = assign_folds_to_given_splits(manifest, n_folds=self.n_folds, seed=self.seed)
        else:
            manifest, split_info = assign_splits(
                manifest, test_fraction=self.test_fraction, n_folds=self.n_folds, seed=self.seed
            )
        first = [c for c in REQUIRED_COLUMNS if c in manifest.columns]
        manifest = manifest[first + [c for c in manifest.columns if c not in first]]
        text = manifest.to_csv(index=False, lineterminator="\n")
        (self._tmp / MANIFEST).write_text(text)
        counts = manifest.groupby(["split", "label_name"]).size()
        info = {
            "task": self.task,
            "shape": list(self.shape),
            "dtype": "float32",
            "units": self.spec.units,
            "value_range": list(self.spec.value_range),
            "label_names": {str(k): v for k, v in self.spec.label_names.items()},
            "n_samples": int(len(manifest)),
            "counts": {f"{s}/{lab}": int(n) for (s, lab), n in counts.items()},
            "sources": sorted(manifest["source"].unique().tolist()),
            "split": split_info,
            "content_hash": hashlib.sha256(text.encode()).hexdigest(),
            "ctharden_version": __version__,
            "provenance": self.provenance,
        }
        atomic_write_json(self._tmp / INFO, info)


def read_info(dataset_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``dataset.json``; raise :class:`DataError` naming the file if missing or corrupt."""
    path = Path(dataset_dir) / INFO
    try:
        info: dict[str, Any] = json.loads(path.read_text())
        return info
    except FileNotFoundError:
        raise DataError(f"{path}: not found (is {dataset_dir} a ctharden dataset?)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupt JSON ({exc})") from None


def read_manifest(dataset_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``manifest.csv`` with ids as strings; raise :class:`DataError` if missing or malformed."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: not found (is {dataset_dir} a ctharden dataset?)")
    try:
        df = pd.read_csv(path, dtype={"sample_id": str, "patient_id": str, "array": str, "ratings": str})
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty manifest") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")
    return df


def load_array(dataset_dir: str | os.PathLike[str], rel_path: str, mmap: bool = True) -> np.ndarray:
    """Load one sample array (memory-mapped by default); :class:`DataError` names a bad file."""
    path = Path(dataset_dir) / rel_path
    try:
        array: np.ndarray = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        return array
    except FileNotFoundError:
        raise DataError(f"{path}: array file missing") from None
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: unreadable array ({exc})") from None


def load_arrays(dataset_dir: str | os.PathLike[str], rel_paths: Sequence[str]) -> np.ndarray:
    """Stack the given sample arrays into one float32 array of shape ``(N, *shape)``."""
    return np.stack([np.asarray(load_array(dataset_dir, p), dtype=np.float32) for p in rel_paths])
