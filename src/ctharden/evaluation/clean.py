"""Clean (unperturbed) classification metrics, as in Shen et al. 2020, §2.7 and Table 1.

For a binary classifier with positive class 1 (malignant / COVID) and a positive-class score
``s`` in ``[0, 1]``:

- **AUC**: area under the ROC curve, :func:`sklearn.metrics.roc_auc_score` (ties count one half).
- **Decision rule**: a sample is predicted positive iff ``s > threshold`` (strict; default 0.5,
  the paper's fixed threshold). A score of exactly 0.5 is predicted *negative*, the same rule as
  ``ctharden.models.predicted_label``.
- ``accuracy = (TP + TN) / N``, ``sensitivity = TP / (TP + FN)``, ``specificity = TN / (TN + FP)``
  (paper eq. 7), ``balanced_accuracy = (sensitivity + specificity) / 2``.

Cross-validation results are reported as mean ± sample standard deviation (``ddof=1``) over the
folds (:func:`aggregate_folds`), and printed Table-1 style by :func:`format_table`.

Every returned structure is JSON-serialisable (Python ``int``/``float``/``None``/``list``), so it
can go straight to ``metrics/*.json`` and MLflow. Undefined metrics are ``None``, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from ctharden.core.errors import DataError

__all__ = [
    "DEFAULT_KEYS",
    "aggregate_folds",
    "binary_metrics",
    "format_table",
    "labels_from_scores",
    "roc_points",
]

DEFAULT_KEYS: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity")

_DISPLAY_NAMES = {
    "auc": "AUC",
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "balanced_accuracy": "Balanced acc.",
}


# --------------------------------------------------------------------------------------------- input
def as_labels(y_true: Any, name: str = "y_true") -> np.ndarray:
    """``y_true`` as a 1-D int64 array in {0, 1}; :class:`DataError` otherwise."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise DataError(f"{name} must be 1-D with shape (N,), got shape {y.shape}")
    if y.size == 0:
        raise DataError(f"{name} is empty: need at least one sample")
    if y.dtype == bool:
        return y.astype(np.int64)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{name} must be numeric labels in {{0, 1}}, got dtype {y.dtype}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{name} must contain only labels 0 and 1: {int(bad.sum())} bad value(s), "
            f"first at index {i}: {y[i]!r}"
        )
    return y.astype(np.int64)


def finite_scores(score: Any, n: int, name: str = "score") -> np.ndarray:
    """``score`` as a 1-D float64 array of length ``n`` with finite values (any real: logits are fine)."""
    s = np.asarray(score)
    if s.ndim != 1:
        raise DataError(f"{name} must be 1-D with shape (N,), got shape {s.shape}")
    if s.shape[0] != n:
        raise DataError(f"shape mismatch: y_true has {n} samples but {name} has {s.shape[0]}")
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer) or s.dtype == bool):
        raise DataError(f"{name} must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64)
    nonfinite = ~np.isfinite(s)
    if nonfinite.any():
        i = int(np.flatnonzero(nonfinite)[0])
        raise DataError(f"{name} has {int(nonfinite.sum())} NaN/Inf value(s), first at index {i}: {float(s[i])!r}")
    return s


def _as_scores(score: Any, n: int) -> np.ndarray:
    """``score`` as a 1-D float64 array of length ``n`` with finite values in [0, 1]."""
    s = finite_scores(score, n)
    out = (s < 0.0) | (s > 1.0)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise DataError(
            f"score must be a positive-class probability in [0, 1]: {int(out.sum())} value(s) outside, "
            f"first at index {i}: {s[i]!r}"
        )
    return s


def checked_scores(y_true: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    y = as_labels(y_true)
    return y, _as_scores(score, y.shape[0])


def _check_threshold(threshold: float) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError) as exc:
        raise DataError(f"threshold must be a number, got {threshold!r}") from exc
    if not math.isfinite(t):
        raise DataError(f"threshold must be finite, got {threshold!r}")
    return t


# ------------------------------------------------------------------------------------------- metrics
def labels_from_scores(score: Any, threshold: float = 0.5) -> np.ndarray:
    """Predicted labels (int64, shape ``(N,)``): 1 iff ``score > threshold`` (strict)."""
    s = np.asarray(score, dtype=np.float64)
    return (s > _check_threshold(threshold)).astype(np.int64)


def _ratio(num: int, den: int) -> float | None:
    return float(num) / float(den) if den > 0 else None


def binary_metrics(y_true: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Classification metrics of positive-class scores against binary labels.

    Args:
        y_true: ``(N,)`` labels in {0, 1} (int, bool or integral float); 1 is the positive class.
        score: ``(N,)`` positive-class scores (probabilities) in ``[0, 1]``.
        threshold: a sample is predicted positive iff ``score > threshold`` (strict: a score equal
            to the threshold is negative), as ``ctharden.models.predicted_label`` does with 0.5.

    Returns:
        A JSON-serialisable dict with ``n``, ``n_pos``, ``n_neg``, ``threshold``, ``auc``,
        ``accuracy``, ``sensitivity``, ``specificity``, ``balanced_accuracy`` (floats) and the
        confusion counts ``tp``, ``fp``, ``tn``, ``fn`` (ints).

        When only one class is present, the AUC is undefined and is ``None`` (no crash, no NaN);
        ``sensitivity`` is ``None`` when there are no positives, ``specificity`` is ``None`` when
        there are no negatives, and ``balanced_accuracy`` is ``None`` when either is. ``accuracy``
        is always defined.

    Raises:
        DataError: empty input, arrays not 1-D, length mismatch, labels outside {0, 1},
            NaN/Inf scores, scores outside [0, 1], or a non-finite threshold.
    """
    y, s = checked_scores(y_true, score)
    t = _check_threshold(threshold)
    pred = labels_from_scores(s, t)

    tp = int(np.sum((pred == 1) & (y == 1)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    n_pos, n_neg = tp + fn, tn + fp
    n = n_pos + n_neg

    auc = float(roc_auc_score(y, s)) if n_pos > 0 and n_neg > 0 else None
    sensitivity = _ratio(tp, n_pos)
    specificity = _ratio(tn, n_neg)
    balanced = (
        (sensitivity + specificity) / 2.0 if sensitivity is not None and specificity is not None else None
    )
    return {
        "n": n,
        "n_pos": n_pos,
        "n_neg": n_neg,
        "threshold": t,
        "auc": auc,
        "accuracy": float(tp + tn) / float(n),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": balanced,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def roc_arrays(y_true: Any, score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, s = checked_scores(y_true, score)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.shape[0]:
        only = 1 if n_pos else 0
        raise DataError(
            f"ROC curve is undefined: y_true has only class {only} ({y.shape[0]} samples); need both classes"
        )
    fpr, tpr, thr = roc_curve(y, s)
    # sklearn's first threshold is +inf ("predict nothing positive"). Scores are <= 1, so the
    # smallest float above 1.0 has the same meaning and is valid JSON/CSV.
    thr = np.where(np.isfinite(thr), thr, np.nextafter(1.0, 2.0))
    return fpr.astype(np.float64), tpr.astype(np.float64), thr.astype(np.float64)


def roc_points(y_true: np.ndarray, score: np.ndarray) -> dict[str, list[float]]:
    """ROC curve points from :func:`sklearn.metrics.roc_curve` as JSON-ready lists.

    Returns ``{"fpr": [...], "tpr": [...], "threshold": [...]}`` of equal length, ``fpr``/``tpr``
    non-decreasing from (0, 0) to (1, 1). ``threshold[i]`` is the cut at which the point is reached
    with the rule ``score >= threshold`` (sklearn's convention); the first one, ``+inf`` in sklearn,
    is replaced by the smallest float above 1.0 (``1.0000000000000002``), which means the same for
    scores in [0, 1].

    Raises:
        DataError: as :func:`binary_metrics`, and when ``y_true`` holds only one class.
    """
    fpr, tpr, thr = roc_arrays(y_true, score)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "threshold": thr.tolist()}


# ------------------------------------------------------------------------------------------- folds
def _defined(value: Any, fold: int, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DataError(f"fold {fold}: metric {key!r} must be a number or None, got {value!r}")
    v = float(value)
    return None if math.isnan(v) else v


def aggregate_folds(
    per_fold: list[dict[str, Any]], keys: Sequence[str] = DEFAULT_KEYS
) -> dict[str, dict[str, Any]]:
    """Mean ± sample standard deviation of each metric over the folds (paper Table 1).

    Returns ``{key: {"mean": m, "std": s, "n": k, "values": [...]}}`` where ``values`` are the
    defined per-fold values in fold order and ``n = len(values)``. ``std`` is the sample standard
    deviation (``ddof=1``), as the papers report; it is ``0.0`` when only one fold is defined.
    Undefined values (``None``, or NaN from other tools) are skipped; when no fold defines a
    metric, ``mean`` and ``std`` are ``None`` and ``n`` is 0.

    Raises:
        DataError: ``per_fold`` is empty, a fold lacks one of ``keys``, or a value is not a number.
    """
    if not per_fold:
        raise DataError("no folds to aggregate: per_fold is empty")
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        values: list[float] = []
        for i, fold in enumerate(per_fold):
            if key not in fold:
                raise DataError(f"fold {i} has no metric {key!r} (has: {', '.join(sorted(fold))})")
            v = _defined(fold[key], i, key)
            if v is not None:
                values.append(v)
        if values:
            arr = np.asarray(values, dtype=np.float64)
            mean = float(arr.mean())
            std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
        else:
            mean, std = None, None
        out[key] = {"mean": mean, "std": std, "n": len(values), "values": values}
    return out


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def format_table(per_fold: list[dict[str, Any]], aggregate: dict[str, Any], digits: int = 3) -> str:
    """A Markdown table in the style of the paper's Table 1: one row per fold, then ``mean ± std``.

    Columns are the metrics of ``aggregate`` (in its order). A fold's row is labelled by its
    ``"fold"`` entry when present, else by its position. Undefined values print as ``n/a``; when a
    metric is defined in fewer folds than there are rows, the summary cell says ``(n=k)``.
    """
    keys = list(aggregate)
    header = ["Fold", *(_DISPLAY_NAMES.get(k, k) for k in keys)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(keys)) + "|",
    ]
    for i, fold in enumerate(per_fold):
        label = str(fold.get("fold", i))
        lines.append("| " + " | ".join([label, *(_fmt(fold.get(k), digits) for k in keys)]) + " |")
    cells = []
    for k in keys:
        agg = aggregate[k]
        if agg.get("mean") is None:
            cells.append("n/a")
            continue
        cell = f"{_fmt(agg['mean'], digits)} ± {_fmt(agg['std'], digits)}"
        if per_fold and agg.get("n", len(per_fold)) < len(per_fold):
            cell += f" (n={agg['n']})"
        cells.append(cell)
    lines.append("| " + " | ".join(["mean ± std", *cells]) + " |")
    return "\n".join(lines) + "\n"
