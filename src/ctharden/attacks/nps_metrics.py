"""Robustness metrics of the NPS attacks (Shen et al. 2020, section 2.6, eq. 8; Figs 7-8, Table 2).

- A sample is **successfully attacked** by a perturbation when the model's predicted label on
  ``x + p`` differs from its predicted label on the clean ``x`` (not from the ground truth).
- **SAN**: the number of samples successfully attacked by at least one of the K attempts.
  ``san_rate = 100 · SAN / N`` is what Table 2 reports (``SAN/N_train`` in %).
- **SAR** of sample i (eq. 8): ``n_succ_i / K``, the share of its K attempts that succeeded. Stored
  as a fraction in ``[0, 1]`` (the paper prints it in %).
- The curve of Figs 7-8: the percentage of samples whose SAR *exceeds* each level
  (:func:`sar_above_curve`, strict ``>``); at level 0 it is ``san_rate``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctharden.attacks.losses import AttackError


def san(sar: np.ndarray) -> int:
    """SAN: the number of samples with at least one successful attack (``SAR > 0``)."""
    return int(np.count_nonzero(np.asarray(sar) > 0))


def san_rate(sar: np.ndarray) -> float:
    """``100 · SAN / N`` in %."""
    s = np.asarray(sar)
    if s.size == 0:
        raise AttackError("SAR is empty: no samples")
    return 100.0 * san(s) / s.size


def sar_from_counts(n_success: np.ndarray, k: int) -> np.ndarray:
    """Eq. 8: ``SAR_i = n_succ_i / K`` as a float64 fraction in ``[0, 1]``."""
    if k < 1:
        raise AttackError(f"K must be >= 1, got {k}")
    return np.asarray(n_success, dtype=np.float64) / float(k)


def sar_above_curve(sar: Any, levels: Any = None) -> dict[str, list[float]]:
    """Percentage of samples whose SAR exceeds each level (the curves of Figs 7, 8 and 11).

    Args:
        sar: ``(N,)`` SAR per sample as fractions in ``[0, 1]``.
        levels: SAR levels (fractions); default ``np.linspace(0, 1, 21)`` (every 5 %).

    Returns:
        ``{"levels": [...], "percent_of_samples_with_sar_above_level": [...]}`` (sorted levels,
        strict ``SAR > level``): non-increasing, the first value at level 0 is ``100·SAN/N``.
    """
    s = np.asarray(sar, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise AttackError("SAR is empty: no samples")
    if not np.all(np.isfinite(s)) or s.min() < 0 or s.max() > 1:
        raise AttackError("SAR values must be fractions in [0, 1]")
    lv = np.linspace(0.0, 1.0, 21) if levels is None else np.sort(np.asarray(levels, dtype=np.float64).reshape(-1))
    pct = 100.0 * (s[None, :] > lv[:, None]).mean(axis=1)
    return {"levels": lv.tolist(), "percent_of_samples_with_sar_above_level": pct.tolist()}
