"""In-memory datasets: a dataset's arrays loaded once, in a model's input units.

Arrays are loaded once into memory (nodule cubes: 128 KiB each; COVID slices 196 KiB) and
converted with the model's own :meth:`~ctharden.models.CTClassifier.to_input` (HU -> [0, 1] for
nodule cubes), so every tensor a model sees is in its input units.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ctharden.core.errors import DataError
from ctharden.data.dataset import load_arrays, read_manifest


@dataclass
class ArraySet:
    """Samples in model-input units. ``x``: ``(N, *spatial)`` float32; ``y``: ``(N,)`` int64 labels;
    ``target``: ``(N,)`` float32 regression target (the 1-5 rating for rating models, else ``y``)."""

    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor
    sample_ids: list[str]
    manifest: pd.DataFrame

    def __len__(self) -> int:
        return len(self.sample_ids)

    def subset(self, mask: np.ndarray) -> ArraySet:
        idx = torch.from_numpy(np.nonzero(mask)[0])
        return ArraySet(
            self.x[idx], self.y[idx], self.target[idx],
            [self.sample_ids[i] for i in idx.tolist()], self.manifest.iloc[idx.numpy()].reset_index(drop=True),
        )


def load_arrayset(dataset_dir: str | Path, model: torch.nn.Module, rating_column: str = "malignancy_mean") -> ArraySet:
    """Load every sample of a dataset, converted to ``model``'s input units."""
    manifest = read_manifest(dataset_dir)
    raw = torch.from_numpy(load_arrays(dataset_dir, manifest["array"].tolist()))
    with torch.no_grad():
        x = model.to_input(raw).float().contiguous()
    y = torch.as_tensor(manifest["label"].to_numpy().copy(), dtype=torch.int64)
    if getattr(model, "output", None) == "rating":
        if rating_column not in manifest.columns:
            raise DataError(f"{dataset_dir}: a rating model needs the manifest column {rating_column!r}")
        target = torch.as_tensor(manifest[rating_column].to_numpy(dtype=np.float32))
    else:
        target = y.float()
    return ArraySet(x, y, target, manifest["sample_id"].tolist(), manifest)
