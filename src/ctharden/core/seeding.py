"""Seeds: every random stream of the pipeline is derived from ``params.yaml``'s ``seed`` and a tuple
of non-negative integers naming the stream (see docs/ARCHITECTURE.md, "Determinism")."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A reproducible 32-bit seed from non-negative integers (distinct parts, distinct streams)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    """The seed of one training epoch: sampler order, augmentation and dropout."""
    return derive_seed(seed, 0, fold, epoch)


def init_seed(seed: int, fold: int) -> int:
    """The seed of a fold's weight initialisation."""
    return derive_seed(seed, 1, fold)
