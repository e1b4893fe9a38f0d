"""Training data: a dataset's arrays in model-input units, augmentation and class-balanced sampling.

Arrays are loaded once into memory (nodule cubes: 128 KiB each; COVID slices 196 KiB) and
converted with the model's own :meth:`~ctharden.models.CTClassifier.to_input` (HU -> [0, 1] for
nodule cubes), so every tensor a model sees is in its input units.

Augmentation (shen 2020, section 2.6): random shifts of up to ``shift_vox`` voxels and rotations
of up to ``rotate_deg`` degrees about each axis, by MONAI's ``RandAffine`` (bilinear, zero = air
padding). Randomness is reseeded from (seed, fold, epoch) at every epoch, so an epoch is
reproducible on its own and a resumed run matches an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from ctharden.data.dataset import load_arrays, read_manifest
from ctharden.errors import DataError


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


def derive_seed(*parts: int) -> int:
    """A reproducible 32-bit seed from non-negative integers (distinct parts, distinct streams)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    """The seed of one training epoch: sampler order, augmentation and dropout."""
    return derive_seed(seed, 0, fold, epoch)


def init_seed(seed: int, fold: int) -> int:
    """The seed of a fold's weight initialisation."""
    return derive_seed(seed, 1, fold)


class AugmentedSet(Dataset):
    """Index -> ``(x_aug, y, target, index)``; augmentation is a MONAI ``RandAffine`` (or none)."""

    def __init__(self, data: ArraySet, spatial_dims: int, shift_vox: float = 0.0, rotate_deg: float = 0.0):
        self.data = data
        self.transform = None
        if shift_vox > 0 or rotate_deg > 0:
            from monai.transforms import RandAffine

            rot = math.radians(rotate_deg)
            self.transform = RandAffine(
                prob=1.0,
                rotate_range=(rot,) * (3 if spatial_dims == 3 else 1),
                translate_range=(shift_vox,) * spatial_dims,
                padding_mode="zeros",
                mode="bilinear",
                cache_grid=False,
            )

    def reseed(self, seed: int) -> None:
        if self.transform is not None:
            self.transform.set_random_state(seed=seed % (2**32))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        x = self.data.x[i]
        if self.transform is not None:
            x = torch.as_tensor(self.transform(x.unsqueeze(0))).squeeze(0).float()
        return x, self.data.y[i], self.data.target[i], i


def balanced_sampler(labels: torch.Tensor, seed: int, balanced: bool = True) -> torch.utils.data.Sampler[int]:
    """Sampler drawing ``len(labels)`` indices per epoch; with ``balanced`` each class has equal weight."""
    g = torch.Generator().manual_seed(seed % (2**63))
    if not balanced:
        return torch.utils.data.RandomSampler(range(len(labels)), generator=g)
    counts = torch.bincount(labels, minlength=2).clamp(min=1).float()
    weights = (1.0 / counts)[labels]
    return WeightedRandomSampler(weights.double(), num_samples=len(labels), replacement=True, generator=g)
