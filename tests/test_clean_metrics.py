"""Clean metrics (AUC, accuracy, sensitivity, specificity), fold aggregation, plots and DVC plot files."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_curve

from ctharden.core.errors import DataError
from ctharden.evaluation.clean import (
    aggregate_folds,
    binary_metrics,
    format_table,
    labels_from_scores,
    roc_points,
)
from ctharden.reporting.plots import plot_confusion, plot_roc, write_dvc_plots

# 4 positives, 6 negatives. At the default threshold 0.5 (strict ">"):
#   positives 0.9, 0.7 -> TP; 0.5 (exactly the threshold) and 0.2 -> FN
#   negatives 0.8, 0.6 -> FP; 0.4, 0.3, 0.1, 0.05 -> TN
# AUC by counting positive/negative pairs ranked correctly: (6 + 5 + 4 + 2) / (4 * 6) = 17/24.
Y10 = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
S10 = np.array([0.9, 0.7, 0.5, 0.2, 0.8, 0.6, 0.4, 0.3, 0.1, 0.05])


def _rng_case(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    s = np.clip(0.35 * y + 0.65 * rng.random(n), 0.0, 1.0)
    return y, s


# ------------------------------------------------------------------------------------ binary_metrics
def test_binary_metrics_hand_computed() -> None:
    m = binary_metrics(Y10, S10)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 4, 2)
    assert (m["n"], m["n_pos"], m["n_neg"], m["threshold"]) == (10, 4, 6, 0.5)
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["sensitivity"] == pytest.approx(2 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 4 + 4 / 6) / 2)
    assert m["auc"] == pytest.approx(17 / 24)
    assert set(m) == {"n", "n_pos", "n_neg", "threshold", "auc", "accuracy", "sensitivity", "specificity",
                      "tp", "fp", "tn", "fn", "balanced_accuracy"}
    # JSON-serialisable with plain Python types, no NaN.
    assert json.loads(json.dumps(m, allow_nan=False)) == m
    assert all(type(m[k]) is int for k in ("n", "n_pos", "n_neg", "tp", "fp", "tn", "fn"))


def test_threshold_is_strict() -> None:
    assert binary_metrics(np.array([1]), np.array([0.5]))["fn"] == 1
    assert binary_metrics(np.array([0]), np.array([0.5]))["tn"] == 1
    assert binary_metrics(np.array([1]), np.array([np.nextafter(0.5, 1.0)]))["tp"] == 1
    assert labels_from_scores(np.array([0.5, 0.500001, 0.0, 1.0])).tolist() == [0, 1, 0, 1]
    # Moving the threshold below 0.5 turns the 0.5 positive into a TP (and nothing else changes).
    m = binary_metrics(Y10, S10, threshold=0.45)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["threshold"]) == (3, 2, 4, 1, 0.45)
    assert m["auc"] == binary_metrics(Y10, S10)["auc"], "AUC does not depend on the threshold"


def test_auc_perfect_reversed_and_ties() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    perfect = binary_metrics(y, s)
    assert perfect["auc"] == 1.0 and perfect["accuracy"] == 1.0
    assert perfect["sensitivity"] == 1.0 and perfect["specificity"] == 1.0
    reversed_ = binary_metrics(y, 1.0 - s)
    assert reversed_["auc"] == 0.0 and reversed_["accuracy"] == 0.0
    tied = binary_metrics(y, np.full(6, 0.5))
    assert tied["auc"] == 0.5
    assert tied["sensitivity"] == 0.0 and tied["specificity"] == 1.0, "0.5 is negative"
    # One tied positive/negative pair among four pairs counts one half: (3 + 0.5) / 4.
    assert binary_metrics(np.array([0, 0, 1, 1]), np.array([0.2, 0.6, 0.6, 0.9]))["auc"] == 0.875


def test_accepts_bool_and_float_labels_and_lists() -> None:
    ref = binary_metrics(Y10, S10)
    assert binary_metrics(Y10.astype(bool), S10) == ref
    assert binary_metrics(Y10.astype(np.float32), S10.astype(np.float32).tolist()) == ref
    assert binary_metrics(Y10.tolist(), S10.tolist()) == ref


def test_single_class_gives_none_not_nan() -> None:
    pos = binary_metrics(np.ones(4, dtype=int), np.array([0.9, 0.2, 0.7, 0.6]))
    assert pos["auc"] is None and pos["specificity"] is None and pos["balanced_accuracy"] is None
    assert pos["sensitivity"] == 0.75 and pos["accuracy"] == 0.75 and pos["n_neg"] == 0
    neg = binary_metrics(np.zeros(3, dtype=int), np.array([0.1, 0.9, 0.2]))
    assert neg["auc"] is None and neg["sensitivity"] is None
    assert neg["specificity"] == pytest.approx(2 / 3)
    json.dumps(pos, allow_nan=False)
    json.dumps(neg, allow_nan=False)


@pytest.mark.parametrize(
    ("y", "s", "match"),
    [
        ([0, 1, 1], [0.2, 0.8], "shape mismatch: y_true has 3 samples but score has 2"),
        ([], [], "empty"),
        ([[0, 1]], [[0.2, 0.8]], r"1-D with shape \(N,\)"),
        ([0, 1], [[0.2, 0.8]], r"score must be 1-D"),
        ([0, 1], [0.2, float("nan")], "NaN/Inf value.*index 1"),
        ([0, 1], [float("inf"), 0.3], "NaN/Inf value.*index 0"),
        ([0, 2], [0.2, 0.8], "only labels 0 and 1.*index 1: .*2"),
        ([-1, 1], [0.2, 0.8], "only labels 0 and 1"),
        ([0, 0.5], [0.2, 0.8], "only labels 0 and 1"),
        (["a", "b"], [0.2, 0.8], "numeric labels"),
        ([0, 1], [0.2, 1.3], r"in \[0, 1\].*index 1"),
        ([0, 1], [-0.1, 0.3], r"in \[0, 1\]"),
    ],
)
def test_bad_inputs_raise_data_error(y: list, s: list, match: str) -> None:
    with pytest.raises(DataError, match=match):
        binary_metrics(np.asarray(y), np.asarray(s))


def test_bad_threshold_raises() -> None:
    with pytest.raises(DataError, match="threshold must be finite"):
        binary_metrics(Y10, S10, threshold=float("nan"))


# ----------------------------------------------------------------------------------------- roc_points
def test_roc_points_match_sklearn_and_are_json_safe() -> None:
    y, s = _rng_case()
    pts = roc_points(y, s)
    fpr, tpr, thr = roc_curve(y, s)
    assert pts["fpr"] == fpr.tolist() and pts["tpr"] == tpr.tolist()
    assert len(pts["threshold"]) == len(pts["fpr"])
    assert pts["threshold"][0] > 1.0 and math.isfinite(pts["threshold"][0]) and np.isinf(thr[0])
    assert pts["threshold"][1:] == thr[1:].tolist()
    assert (pts["fpr"][0], pts["tpr"][0], pts["fpr"][-1], pts["tpr"][-1]) == (0.0, 0.0, 1.0, 1.0)
    json.dumps(pts, allow_nan=False)
    # Trapezoid area under the points equals the AUC.
    assert np.trapezoid(pts["tpr"], pts["fpr"]) == pytest.approx(binary_metrics(y, s)["auc"])


def test_roc_points_single_class_raises() -> None:
    with pytest.raises(DataError, match="only class 1"):
        roc_points(np.ones(3, dtype=int), np.array([0.1, 0.5, 0.9]))


# ------------------------------------------------------------------------------------ aggregate_folds
def _folds(k: int = 5) -> list[dict]:
    out = []
    for i in range(k):
        y, s = _rng_case(40, seed=i)
        out.append({"fold": i, **binary_metrics(y, s)})
    return out


def test_aggregate_folds_matches_numpy_sample_std() -> None:
    folds = _folds(5)
    agg = aggregate_folds(folds)
    assert list(agg) == ["auc", "accuracy", "sensitivity", "specificity"]
    for key, a in agg.items():
        vals = np.array([f[key] for f in folds])
        assert a["n"] == 5 and a["values"] == vals.tolist()
        assert a["mean"] == pytest.approx(np.mean(vals))
        assert a["std"] == pytest.approx(np.std(vals, ddof=1))
    json.dumps(agg, allow_nan=False)


def test_aggregate_folds_skips_none_and_single_fold_std_zero() -> None:
    per_fold = [{"auc": 0.9, "x": None}, {"auc": None, "x": None}, {"auc": 0.7, "x": None},
                {"auc": float("nan"), "x": None}]
    agg = aggregate_folds(per_fold, keys=("auc", "x"))
    assert agg["auc"]["n"] == 2 and agg["auc"]["values"] == [0.9, 0.7]
    assert agg["auc"]["mean"] == pytest.approx(0.8)
    assert agg["auc"]["std"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
    assert agg["x"] == {"mean": None, "std": None, "n": 0, "values": []}
    one = aggregate_folds([{"auc": 0.91, "accuracy": 0.85, "sensitivity": 0.9, "specificity": 0.77}])
    assert one["auc"] == {"mean": 0.91, "std": 0.0, "n": 1, "values": [0.91]}


def test_aggregate_folds_errors() -> None:
    with pytest.raises(DataError, match="no folds"):
        aggregate_folds([])
    with pytest.raises(DataError, match="fold 1 has no metric 'auc'"):
        aggregate_folds([{"auc": 0.9}, {"accuracy": 0.8}], keys=("auc",))
    with pytest.raises(DataError, match="must be a number or None"):
        aggregate_folds([{"auc": "0.9"}], keys=("auc",))


def test_format_table_has_fold_rows_and_mean_std_row() -> None:
    folds = _folds(3)
    folds[2]["auc"] = None
    agg = aggregate_folds(folds)
    table = format_table(folds, agg)
    lines = table.strip().splitlines()
    assert lines[0] == "| Fold | AUC | Accuracy | Sensitivity | Specificity |"
    assert len(lines) == 2 + 3 + 1
    assert [ln.split("|")[1].strip() for ln in lines[2:5]] == ["0", "1", "2"]
    assert "n/a" in lines[4], "undefined AUC of fold 2"
    last = lines[-1]
    assert last.startswith("| mean ± std |") and last.count("±") == 1 + 4
    acc = agg["accuracy"]
    assert f"{acc['mean']:.3f} ± {acc['std']:.3f}" in last
    assert "(n=2)" in last, "AUC defined in 2 of 3 folds"


# ---------------------------------------------------------------------------------------------- plots
def _assert_png(path: Path) -> None:
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        im.load()
        assert im.size[0] > 100 and im.size[1] > 100


def test_plot_roc_and_confusion_write_valid_pngs_atomically(tmp_path: Path) -> None:
    y, s = _rng_case()
    out = tmp_path / "plots"
    roc = plot_roc({"fold 0": (y, s), "reversed": (y, 1.0 - s)}, out / "roc.png", title="ROC")
    cm = plot_confusion(y, labels_from_scores(s), out / "confusion.png", title="Confusion")
    assert roc == out / "roc.png" and cm == out / "confusion.png"
    _assert_png(roc)
    _assert_png(cm)
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "roc.png"], "no temp files left"
    first = roc.read_bytes()
    plot_roc({"fold 0": (y, s), "reversed": (y, 1.0 - s)}, roc, title="ROC")  # overwrite in place
    assert roc.read_bytes() == first, "same inputs, same bytes"
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "roc.png"]


def test_plot_errors_name_the_problem(tmp_path: Path) -> None:
    y, s = _rng_case()
    with pytest.raises(DataError, match="ROC curve 'bad'.*only class 0"):
        plot_roc({"ok": (y, s), "bad": (np.zeros(3, dtype=int), np.array([0.1, 0.2, 0.3]))},
                 tmp_path / "r.png")
    with pytest.raises(DataError, match="no curves"):
        plot_roc({}, tmp_path / "r.png")
    with pytest.raises(DataError, match="y_pred must contain only labels 0 and 1"):
        plot_confusion(y, s, tmp_path / "c.png")
    with pytest.raises(DataError, match="exactly 2 classes"):
        plot_confusion(y, y, tmp_path / "c.png", labels=("a", "b", "c"))
    assert not any(tmp_path.iterdir()), "nothing written on error"


def test_write_dvc_plots_csv_columns_and_rows(tmp_path: Path) -> None:
    y, s = _rng_case()
    ids = [f"LIDC-{i:04d}" for i in range(len(y))]
    folds = [i % 5 for i in range(len(y))]
    paths = write_dvc_plots(tmp_path / "dvc", y, s, sample_ids=ids, extra={"fold": folds})
    assert paths == {"roc": tmp_path / "dvc" / "roc.csv", "predictions": tmp_path / "dvc" / "predictions.csv"}
    with paths["roc"].open(newline="") as fh:
        roc_rows = list(csv.DictReader(fh))
    pts = roc_points(y, s)
    assert list(roc_rows[0]) == ["fpr", "tpr", "threshold"]
    assert len(roc_rows) == len(pts["fpr"])
    assert [float(r["tpr"]) for r in roc_rows] == pts["tpr"], "full float precision"
    with paths["predictions"].open(newline="") as fh:
        pred_rows = list(csv.DictReader(fh))
    assert list(pred_rows[0]) == ["sample_id", "actual", "predicted", "score", "fold"]
    assert len(pred_rows) == len(y)
    assert [r["sample_id"] for r in pred_rows] == ids
    assert [int(r["actual"]) for r in pred_rows] == y.tolist()
    assert [int(r["predicted"]) for r in pred_rows] == (s > 0.5).astype(int).tolist()
    assert [float(r["score"]) for r in pred_rows] == s.tolist()
    assert [int(r["fold"]) for r in pred_rows] == folds
    assert sorted(p.name for p in (tmp_path / "dvc").iterdir()) == ["predictions.csv", "roc.csv"]

    default = write_dvc_plots(tmp_path / "d2", Y10, S10)
    with default["predictions"].open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["sample_id"] for r in rows] == [str(i) for i in range(10)]
    assert rows[2]["predicted"] == "0", "score 0.5 is negative"
    with pytest.raises(DataError, match="extra column 'fold' has 3 entries but there are 10"):
        write_dvc_plots(tmp_path / "d3", Y10, S10, extra={"fold": [0, 1, 2]})
    with pytest.raises(DataError, match="clashes"):
        write_dvc_plots(tmp_path / "d3", Y10, S10, extra={"score": list(range(10))})
    with pytest.raises(DataError, match="sample_ids has 2 entries"):
        write_dvc_plots(tmp_path / "d3", Y10, S10, sample_ids=["a", "b"])
    assert not (tmp_path / "d3").exists() or not any((tmp_path / "d3").iterdir())


DVC_YAML = """\
plots:
  - eval/roc.csv:
      template: simple
      x: fpr
      y: tpr
      title: ROC
      x_label: False positive rate
      y_label: True positive rate
  - eval/predictions.csv:
      template: confusion
      x: actual
      y: predicted
      title: Confusion matrix
      x_label: Actual
      y_label: Predicted
  - eval/roc.png
"""


def test_dvc_plots_show_renders_the_files(tmp_path: Path) -> None:
    """`dvc plots show --json` in a fresh git+dvc repo renders both CSVs and the PNG without errors."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}

    def run(*cmd: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stdout}{proc.stderr}"
        return proc

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    y, s = _rng_case()
    paths = write_dvc_plots(tmp_path / "eval", y, s, sample_ids=[f"s{i}" for i in range(len(y))],
                            extra={"fold": [i % 3 for i in range(len(y))]})
    plot_roc({"test": (y, s)}, tmp_path / "eval" / "roc.png")
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)

    out = json.loads(run("dvc", "plots", "show", "--json").stdout)
    assert "errors" not in out, out.get("errors")
    data = out["data"]
    assert set(data) == {"eval/roc.csv", "eval/predictions.csv", "eval/roc.png"}

    (roc,) = data["eval/roc.csv"]
    assert roc["type"] == "vega"
    spec = roc["content"]
    assert spec["encoding"]["x"]["field"] == "fpr" and spec["encoding"]["y"]["field"] == "tpr"
    assert len(spec["data"]["values"]) == len(roc_points(y, s)["fpr"])

    (cm,) = data["eval/predictions.csv"]
    assert cm["type"] == "vega"
    cm_spec = cm["content"]
    assert cm_spec["spec"]["encoding"]["x"]["field"] == "actual"
    assert cm_spec["spec"]["encoding"]["y"]["field"] == "predicted"
    assert len(cm_spec["data"]["values"]) == len(y)

    (img,) = data["eval/roc.png"]
    assert img["type"] == "image"
    assert paths["roc"].is_file() and paths["predictions"].is_file()
