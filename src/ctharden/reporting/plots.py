"""Evaluation plots: ROC and confusion-matrix PNGs, and the CSV files ``dvc plots`` renders.

Figures are drawn on a :class:`matplotlib.figure.Figure` with an explicit Agg canvas, never through
``pyplot``: no global backend switch, no figure registry, nothing to close, safe in worker threads.
Every file is written atomically (rendered in memory, then :func:`ctharden.core.io.atomic_write_bytes`)
and PNGs carry no software/date metadata, so the same inputs give byte-identical files.

DVC data-series files (see :func:`write_dvc_plots`) and the ``dvc.yaml`` that renders them::

    plots:
      - <out_dir>/roc.csv:
          template: simple          # or linear
          x: fpr
          y: tpr
          title: ROC
          x_label: False positive rate
          y_label: True positive rate
      - <out_dir>/predictions.csv:
          template: confusion       # or confusion_normalized
          x: actual
          y: predicted
          title: Confusion matrix
          x_label: Actual
          y_label: Predicted
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ctharden.core.errors import DataError
from ctharden.core.io import atomic_write_bytes, atomic_write_text
from ctharden.evaluation.clean import as_labels, binary_metrics, checked_scores, labels_from_scores, roc_arrays

__all__ = ["plot_confusion", "plot_roc", "write_dvc_plots"]

_PNG_METADATA = {"Software": None}  # no matplotlib version stamp: reproducible bytes
_DPI = 120


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (Agg, no version stamp: reproducible)."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf, metadata=_PNG_METADATA)  # type: ignore[no-untyped-call]  # unannotated
    return buf.getvalue()


def save_png(fig: Figure, path: Path) -> Path:
    return atomic_write_bytes(path, png_bytes(fig))


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = ""
) -> Path:
    """Draw one ROC curve per entry of ``curves`` (label -> ``(y_true, score)``) and save a PNG.

    Each legend entry shows the curve's AUC; the chance diagonal is dashed. Inputs are checked
    as in :func:`ctharden.evaluation.clean.binary_metrics`; each curve needs both classes.

    Returns:
        ``path``, written atomically.

    Raises:
        DataError: ``curves`` is empty, or a curve's data is invalid (the message names the curve).
    """
    if not curves:
        raise DataError("plot_roc: no curves given")
    fig = Figure(figsize=(5.0, 5.0), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="0.6", linewidth=1.0, label="chance")
    for label, (y_true, score) in curves.items():
        try:
            fpr, tpr, _ = roc_arrays(y_true, score)
            auc = binary_metrics(y_true, score)["auc"]
        except DataError as exc:
            raise DataError(f"ROC curve {label!r}: {exc}") from exc
        ax.plot(fpr, tpr, linewidth=1.8, label=f"{label} (AUC = {auc:.3f})")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    if title:
        ax.set_title(title)
    return save_png(fig, Path(path))


def plot_confusion(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    path: Path,
    labels: Sequence[str] = ("benign", "malignant"),
    title: str = "",
) -> Path:
    """Save a 2×2 confusion matrix PNG: rows are actual classes, columns predicted classes.

    Each cell shows its count and its row-normalised percentage (share of that actual class);
    the colour is the row-normalised fraction. A class absent from ``y_true`` shows ``n/a``.

    Raises:
        DataError: labels not in {0, 1}, empty or mismatched inputs, or ``labels`` not of length 2.
    """
    y = as_labels(y_true, "y_true")
    p = as_labels(y_pred, "y_pred")
    if p.shape != y.shape:
        raise DataError(f"shape mismatch: y_true has {y.shape[0]} samples but y_pred has {p.shape[0]}")
    names = [str(n) for n in labels]
    if len(names) != 2:
        raise DataError(f"labels must name exactly 2 classes (negative, positive), got {names}")
    counts = np.zeros((2, 2), dtype=np.int64)
    np.add.at(counts, (y, p), 1)
    totals = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, totals, out=np.zeros((2, 2)), where=totals > 0)

    fig = Figure(figsize=(4.6, 4.2), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(2):
        for j in range(2):
            pct = f"{100.0 * frac[i, j]:.1f}%" if totals[i, 0] > 0 else "n/a"
            ax.text(
                j, i, f"{counts[i, j]}\n({pct})", ha="center", va="center",
                color="white" if frac[i, j] > 0.5 else "black", fontsize=11,
            )
    ax.set_xticks([0, 1], labels=names)
    ax.set_yticks([0, 1], labels=names)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("Actual")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of actual class")
    if title:
        ax.set_title(title)
    return save_png(fig, Path(path))


def _cell(value: Any) -> str:
    """A CSV cell: floats at full round-trip precision, numpy scalars unwrapped."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"non-finite value {value!r} cannot be written to a plots CSV")
        return repr(value)
    return str(value)


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[_cell(v) for v in row] for row in rows])
    return buf.getvalue()


def write_dvc_plots(
    out_dir: Path,
    y_true: np.ndarray,
    score: np.ndarray,
    threshold: float = 0.5,
    sample_ids: Sequence[str] | None = None,
    extra: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, Path]:
    """Write the data-series files ``dvc plots show`` renders, atomically, into ``out_dir``.

    - ``roc.csv``: columns ``fpr,tpr,threshold`` (one row per ROC point, from
      :func:`ctharden.evaluation.clean.roc_points`); render with template ``simple`` (or ``linear``),
      ``x: fpr``, ``y: tpr``.
    - ``predictions.csv``: columns ``sample_id,actual,predicted,score`` then the ``extra`` columns
      in the given order (e.g. ``fold``), one row per sample; ``actual``/``predicted`` are 0/1 and
      ``predicted = score > threshold`` (strict). Render with template ``confusion`` (or
      ``confusion_normalized``), ``x: actual``, ``y: predicted``.

    ``sample_ids`` default to the sample positions ``"0" .. "N-1"``.

    Returns:
        ``{"roc": out_dir / "roc.csv", "predictions": out_dir / "predictions.csv"}``.

    Raises:
        DataError: invalid labels/scores (as :func:`binary_metrics`), only one class present
            (no ROC), or ``sample_ids``/``extra`` of the wrong length or with a clashing name.
    """
    out_dir = Path(out_dir)
    y, s = checked_scores(y_true, score)
    n = y.shape[0]
    pred = labels_from_scores(s, threshold)
    fpr, tpr, thr = roc_arrays(y, s)

    ids = [str(i) for i in range(n)] if sample_ids is None else [str(v) for v in sample_ids]
    if len(ids) != n:
        raise DataError(f"sample_ids has {len(ids)} entries but there are {n} samples")
    columns: dict[str, list[Any]] = {
        "sample_id": ids,
        "actual": y.tolist(),
        "predicted": pred.tolist(),
        "score": s.tolist(),
    }
    for name, values in (extra or {}).items():
        name = str(name)
        if name in columns:
            raise DataError(f"extra column {name!r} clashes with a predictions.csv column")
        vals = list(np.asarray(values).tolist()) if isinstance(values, np.ndarray) else list(values)
        if len(vals) != n:
            raise DataError(f"extra column {name!r} has {len(vals)} entries but there are {n} samples")
        columns[name] = vals

    roc_path = atomic_write_text(
        out_dir / "roc.csv",
        csv_text(["fpr", "tpr", "threshold"], list(zip(fpr.tolist(), tpr.tolist(), thr.tolist(), strict=True))),
    )
    pred_path = atomic_write_text(
        out_dir / "predictions.csv", csv_text(list(columns), list(zip(*columns.values(), strict=True)))
    )
    return {"roc": roc_path, "predictions": pred_path}


def plot_method_curves(curves: dict[str, dict[str, Any]], path: Path, title: str, baseline: str = "") -> Path:
    """Robust accuracy vs ε of every hardening method on one plot (ma 2020, Figs. 6-9); the
    curve named ``baseline`` dashed."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, c in curves.items():
        style = "k--" if name == baseline else "-"
        ax.plot(c["eps"], c["accuracy"], style, marker="o", ms=3, label=name, lw=2.2 if c.get("hardened") else 1.2)
    ax.set_xlabel("ε (model-input units)")
    ax.set_ylabel("100-PGD robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_margins(history: list[np.ndarray], eps_max: float, path: Path, title: str = "") -> Path:
    """Histogram of IMA's margin estimates after each epoch (ma 2020, Fig. 9 middle)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    bins = np.linspace(0, eps_max, 31)
    cmap = matplotlib.colormaps["viridis"]
    for i, m in enumerate(history):
        ax.hist(
            m,
            bins=bins,  # type: ignore[arg-type]  # matplotlib's stubs say Sequence[float]; arrays are accepted
            histtype="step",
            color=cmap(i / max(len(history) - 1, 1)),
            label=f"epoch {i + 1}",
        )
    ax.set_xlabel("estimated margin (model-input units)")
    ax.set_ylabel("samples")
    ax.set_title(title or "IMA margins per epoch")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_png(fig, path)
