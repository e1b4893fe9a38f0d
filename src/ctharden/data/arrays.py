"""The one in-memory dataset type: a dataset's arrays loaded once, in stored and model-input units.

Arrays are loaded once into memory (nodule cubes: 128 KiB each; COVID slices 49-196 KiB) and
kept twice: ``raw`` in the units the dataset stores (HU for nodule cubes, display units [0, 1] for
COVID slices; what the NPS noise attacks perturb, since CT noise is physical noise in HU) and ``x``
converted by the model's own :meth:`~ctharden.models.CTClassifier.to_input` (HU -> [0, 1] for
nodule cubes), so every tensor a model sees is in its input units. Every stage loads a dataset
once (:func:`load_arrayset`) and takes subsets of it (:meth:`ArraySet.subset`, :meth:`ArraySet.fold_split`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ctharden.core.errors import DataError
from ctharden.data.dataset import load_arrays, read_info, read_manifest

RATING_COLUMN = "malignancy_mean"


class _WindowedModel(Protocol):
    """A model that converts stored units ``(N, *spatial)`` to its input units ``(N, *spatial)``."""

    def to_input(self, raw: Tensor) -> Tensor: ...


@dataclass
class ArraySet:
    """Samples of one dataset (or a subset), row ``i`` of every field describing sample ``i``.

    ``raw``: ``(N, *spatial)`` float32 in the dataset's stored units (HU or display units);
    ``x``: ``(N, *spatial)`` float32 in model-input units; ``y``: ``(N,)`` int64 labels;
    ``target``: ``(N,)`` float32 regression target (the 1-5 rating for rating models, else ``y``);
    ``split``: ``(N,)`` ``"train"``/``"test"``; ``fold``: ``(N,)`` int, the training fold (-1 for test);
    ``manifest``: the manifest rows of the samples (None for arrays built in memory); ``info``:
    the dataset's ``dataset.json`` (shape, units, content hash, ...).
    """

    raw: Tensor
    x: Tensor
    y: Tensor
    target: Tensor
    sample_ids: list[str]
    split: np.ndarray
    fold: np.ndarray
    manifest: pd.DataFrame | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.sample_ids)
        lengths = {"raw": self.raw.shape[0], "x": self.x.shape[0], "y": self.y.shape[0],
                   "target": self.target.shape[0], "split": len(self.split), "fold": len(self.fold)}
        if self.manifest is not None:
            lengths["manifest"] = len(self.manifest)
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise DataError(f"dataset arrays disagree in length: {n} sample ids but {bad}")
        if self.raw.shape[1:] != self.x.shape[1:]:
            raise DataError(f"raw {tuple(self.raw.shape)} and model input {tuple(self.x.shape)} differ in shape")

    @classmethod
    def from_tensors(cls, raw: Tensor, x: Tensor, y: Tensor, split: Sequence[str], *,
                     sample_ids: Sequence[str] | None = None, target: Tensor | None = None,
                     fold: Sequence[int] | None = None, info: dict[str, Any] | None = None) -> ArraySet:
        """An in-memory set (no manifest): ids default to ``s0..s{N-1}``, ``target`` to ``y``,
        ``fold`` to 0 for training samples and -1 for test samples."""
        split_a = np.asarray(split).astype(str)
        fold_a = np.asarray(fold, dtype=np.int64) if fold is not None else np.where(split_a == "test", -1, 0)
        ids = list(sample_ids) if sample_ids is not None else [f"s{i}" for i in range(len(split_a))]
        return cls(raw, x, y, y.float() if target is None else target, ids, split_a, fold_a, None, dict(info or {}))

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def content_hash(self) -> str:
        """The dataset's content hash (``dataset.json``)."""
        return str(self.info["content_hash"])

    def indices(self, split: str) -> np.ndarray:
        """Positions ``(k,)`` of the samples of ``split`` (``"train"`` or ``"test"``)."""
        return np.nonzero(self.split == split)[0]

    def subset(self, mask: np.ndarray) -> ArraySet:
        """The samples where the boolean ``mask`` ``(N,)`` is true, in order."""
        pos = np.nonzero(mask)[0]
        idx = torch.from_numpy(pos)
        manifest = None if self.manifest is None else self.manifest.iloc[pos].reset_index(drop=True)
        ids = [self.sample_ids[i] for i in pos.tolist()]
        return ArraySet(self.raw[idx], self.x[idx], self.y[idx], self.target[idx],
                        ids, self.split[pos], self.fold[pos], manifest, self.info)

    def fold_split(self, fold: int) -> tuple[ArraySet, ArraySet | None, ArraySet]:
        """``(train, val, test)`` of the model selected on ``fold``: the other training folds, that
        fold (None when the dataset has a single fold) and the held-out test split."""
        train = self.split == "train"
        if int(self.info.get("split", {}).get("n_folds", 1)) > 1:
            return self.subset(train & (self.fold != fold)), self.subset(train & (self.fold == fold)), self.test()
        return self.subset(train), None, self.test()

    def test(self) -> ArraySet:
        """The held-out test split."""
        return self.subset(self.split == "test")


def load_arrayset(dataset_dir: str | Path, model: nn.Module, rating_column: str = RATING_COLUMN) -> ArraySet:
    """Load every sample of a dataset once, in stored units and in ``model``'s input units.

    Raises :class:`DataError` when the model's spatial dimensions do not fit the arrays, or when a
    rating model meets a dataset without the rating column."""
    manifest = read_manifest(dataset_dir)
    info = read_info(dataset_dir)
    raw = torch.from_numpy(load_arrays(dataset_dir, manifest["array"].tolist())).float()
    ndim = len(info["shape"])
    if getattr(model, "spatial_dims", ndim) != ndim:
        raise DataError(f"model ({getattr(model, 'arch', '?')}, {getattr(model, 'spatial_dims', '?')}-D) does not fit "
                        f"dataset {dataset_dir} ({ndim}-D arrays)")
    with torch.no_grad():
        x = cast(_WindowedModel, model).to_input(raw).float().contiguous() if hasattr(model, "to_input") else raw
    y = torch.as_tensor(manifest["label"].to_numpy().copy(), dtype=torch.int64)
    if getattr(model, "output", None) == "rating":
        if rating_column not in manifest.columns:
            raise DataError(f"{dataset_dir}: a rating model needs the manifest column {rating_column!r}")
        target = torch.as_tensor(manifest[rating_column].to_numpy(dtype=np.float32))
    else:
        target = y.float()
    return ArraySet(raw, x, y, target, manifest["sample_id"].tolist(), manifest["split"].to_numpy().astype(str),
                    manifest["fold"].to_numpy().astype(np.int64), manifest, info)
