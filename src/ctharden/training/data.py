"""Training data: augmentation and class-balanced sampling over an in-memory
:class:`~ctharden.data.arrays.ArraySet` (already in model-input units).

Augmentation (shen 2020, section 2.6): random shifts of up to ``shift_vox`` voxels and rotations
of up to ``rotate_deg`` degrees about each axis, by MONAI's ``RandAffine`` (bilinear, zero = air
padding). Randomness is reseeded from (seed, fold, epoch) at every epoch, so an epoch is
reproducible on its own and a resumed run matches an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from ctharden.data.arrays import ArraySet


class AugmentedSet(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]):
    """Index -> ``(x_aug, y, target, index)``; augmentation is a MONAI ``RandAffine`` (or none)."""

    def __init__(self, data: ArraySet, spatial_dims: int, shift_vox: float = 0.0, rotate_deg: float = 0.0):
        self.data = data
        self.transform = None
        if shift_vox > 0 or rotate_deg > 0:
            from monai.transforms.spatial.array import RandAffine  # monai.transforms does not re-export it

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
    # torch types weights as Sequence[float]; it takes any tensor-like (torch.as_tensor)
    return WeightedRandomSampler(
        weights.double(), num_samples=len(labels), replacement=True, generator=g  # type: ignore[arg-type]
    )
