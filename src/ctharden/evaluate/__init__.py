"""Evaluation: clean metrics (:mod:`.clean`) and plots (:mod:`.plots`).

The clean-metric functions are re-exported here. Plotting lives in
:mod:`ctharden.evaluate.plots` and is not imported by this package, so metric-only callers do not
pay for importing matplotlib.
"""

from ctharden.evaluate.clean import (
    DEFAULT_KEYS,
    aggregate_folds,
    binary_metrics,
    format_table,
    labels_from_scores,
    roc_points,
)

__all__ = [
    "DEFAULT_KEYS",
    "aggregate_folds",
    "binary_metrics",
    "format_table",
    "labels_from_scores",
    "roc_points",
]
