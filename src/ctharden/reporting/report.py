"""Robustness report: figures (PNG), DVC plot data (CSV) and a self-contained HTML page.

Figures are drawn without pyplot (see :mod:`ctharden.reporting.plots`); the HTML embeds them as
base64 so the single file reads the same from disk, from MLflow's artifact view or from a CI
artifact. Inputs are the JSON results of :func:`ctharden.evaluation.robustness.evaluate_robustness`
(one per model, keyed by a display name) — nothing is recomputed here.

DVC plot files per model (``plots/robustness/<name>/``):

- ``san_vs_mas.csv``: ``mas`` and one column per ``<attack>_<split>`` (SAN/N in %);
- ``sar_above_<attack>_<split>.csv``: ``sar_level`` (%) and one column per mAs level
  (``mas10``, ...): % of samples whose SAR exceeds the level (paper Figs 7-8);
- ``robust_accuracy_<norm>.csv``: ``eps``, ``eps_hu`` and ``accuracy`` (100-PGD).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ctharden.core.io import atomic_write_text
from ctharden.evaluation.headline import (
    NO_GRADIENTS,
    blackbox_accuracy_name,
    clean_metric_name,
    ensemble_accuracy_name,
    ensemble_eps,
    pgd_accuracy_name,
    san_rate_name,
)
from ctharden.evaluation.trends import trend_lines
from ctharden.reporting.plots import csv_text, save_png

ATTACKS = (("random_nps", "random"), ("optimized_nps", "optimized"))
_STYLE = {"train": "--", "test": "-"}


def _levels(block: Mapping[str, Any]) -> list[dict[str, Any]]:
    return sorted(block["levels"].values(), key=lambda lv: lv["mas"])


def _iv(result: Mapping[str, Any], metric: str) -> Mapping[str, Any] | None:
    """The interval entry of ``metric`` (:mod:`ctharden.evaluation.evidence`), None if absent."""
    entry: Mapping[str, Any] | None = (result.get("intervals") or {}).get(metric)
    return entry


def ci_text(entry: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``" [lo, hi]"`` of an interval entry (empty when there is none)."""
    if not entry or entry.get("lower") is None:
        return ""
    return f" [{entry['lower']:.{digits}f}, {entry['upper']:.{digits}f}]"


def _yerr(points: Sequence[float], entries: Sequence[Mapping[str, Any] | None]) -> np.ndarray | None:
    """Asymmetric error bars ``(2, n)`` from interval entries (None when any is missing)."""
    if not entries or any(e is None or e.get("lower") is None for e in entries):
        return None
    lo = [p - e["lower"] for p, e in zip(points, entries, strict=True)]  # type: ignore[index]
    hi = [e["upper"] - p for p, e in zip(points, entries, strict=True)]  # type: ignore[index]
    bars: np.ndarray = np.clip(np.asarray([lo, hi], dtype=float), 0.0, None)
    return bars


# ---------------------------------------------------------------------------------------------------
# DVC plots


def write_plot_data(result: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write the CSV series of one model's result (see the module docstring); returns the paths."""
    paths: list[Path] = []
    cols: list[str] = []
    series: dict[str, dict[float, float]] = {}
    for key, short in ATTACKS:
        for split, block in result[key].items():
            name = f"{short}_{split}"
            cols.append(name)
            series[name] = {lv["mas"]: lv["san_rate"] for lv in _levels(block)}
            lv0 = _levels(block)
            rows = []
            levels = lv0[0]["sar_above"]["levels"]
            for i, level in enumerate(levels):
                rows.append([round(100 * level, 6),
                             *[lv["sar_above"]["percent_of_samples_with_sar_above_level"][i] for lv in lv0]])
            header = ["sar_level", *[f"mas{lv['mas']:g}" for lv in lv0]]
            paths.append(atomic_write_text(out_dir / f"sar_above_{short}_{split}.csv", csv_text(header, rows)))
    mas = sorted({m for s in series.values() for m in s})
    rows = [[m, *[series[c].get(m, "") for c in cols]] for m in mas]
    paths.append(atomic_write_text(out_dir / "san_vs_mas.csv", csv_text(["mas", *cols], rows)))
    for norm, curve in result["pgd"].items():
        hu = curve.get("eps_hu") or [""] * len(curve["eps"])
        at = _ensemble_index(curve)
        ens_acc = (curve.get("ensemble") or {}).get("accuracy") or []
        worst = [ens_acc[at[float(e)]] if float(e) in at else "" for e in curve["eps"]]
        rows = [[e, h, a, w] for e, h, a, w in zip(curve["eps"], hu, curve["accuracy"], worst, strict=True)]
        header = ["eps", "eps_hu", "accuracy", "ensemble_accuracy"]
        paths.append(atomic_write_text(out_dir / f"robust_accuracy_{norm}.csv", csv_text(header, rows)))
    return paths


# ---------------------------------------------------------------------------------------------------
# figures


def plot_san_vs_mas(results: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """SAN/N (%) against mAs (log axis), random and optimised, train and test; error bars = std
    over fold models when there are several, else the rate's confidence interval."""
    fig = Figure(figsize=(6.4 * len(results), 4.2), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (name, res) in zip(axes, results.items(), strict=True):
        for key, short in ATTACKS:
            for split, block in res[key].items():
                lv = _levels(block)
                m = [v["mas"] for v in lv]
                if block.get("n_models", 1) > 1:
                    ax.errorbar(m, [v["san_rate_mean"] for v in lv], yerr=[v["san_rate_std"] for v in lv],
                                ls=_STYLE.get(split, "-"), marker="o" if short == "random" else "s", capsize=3,
                                label=f"{short} {split} (mean ± std, {block['n_models']} models)")
                else:
                    pts = [v["san_rate"] for v in lv]
                    ax.errorbar(m, pts, yerr=_yerr(pts, [_iv(res, san_rate_name(short, split, v["mas"])) for v in lv]),
                                ls=_STYLE.get(split, "-"), marker="o" if short == "random" else "s", capsize=3,
                                label=f"{short} {split} (N={block['n']}, 95 % CI)")
        ax.set_xscale("log")
        ax.set_xlabel("tube current-time product (mAs)")
        ax.set_ylabel("SAN / N (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{name}: samples flipped by NPS noise")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_png(fig, path)


def plot_sar_curves(result: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """% of samples with SAR above a level, one line per mAs; a panel per attack and split."""
    panels = [(short, split, block) for key, short in ATTACKS for split, block in result[key].items()]
    fig = Figure(figsize=(3.4 * len(panels), 3.2), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (short, split, block) in zip(axes, panels, strict=True):
        for lv in _levels(block):
            c = lv["sar_above"]
            ax.plot(100 * np.asarray(c["levels"]), c["percent_of_samples_with_sar_above_level"],
                    label=f"{lv['mas']:g} mAs")
        ax.set_title(f"{short}, {split} (K={block['k']})", fontsize=9)
        ax.set_xlabel("SAR level (%)")
        ax.set_ylabel("% samples with SAR above")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def plot_robust_accuracy(results: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Robust accuracy against ε, one panel per norm: per model the worst case over the attack
    ensemble (solid) and 100-PGD alone (dashed), with the confidence interval of each point as
    error bars."""
    norms = sorted({n for r in results.values() for n in r["pgd"]}, key=lambda n: n != "linf")
    fig = Figure(figsize=(5.2 * max(len(norms), 1), 3.8), dpi=110, layout="constrained")
    axes = fig.subplots(1, max(len(norms), 1), squeeze=False)[0]
    for ax, norm in zip(axes, norms, strict=False):
        for name, res in results.items():
            c = res["pgd"].get(norm)
            if c is None:
                continue
            ens = c.get("ensemble")
            if ens:
                at = ensemble_eps(c)
                scope = f"area {ens['auc']:.3f}" if ens.get("auc") is not None else "at the gated ε"
                line = ax.errorbar(at, ens["accuracy"], capsize=3, marker="o",
                                   linestyle="-" if ens.get("auc") is not None else "none",
                                   yerr=_yerr(ens["accuracy"], [_iv(res, ensemble_accuracy_name(norm, e)) for e in at]),
                                   label=f"{name}: worst case over the attacks ({scope}, N={c['n']}, 95 % CI)")
                color = line.lines[0].get_color()
            else:
                color = None
            ax.errorbar(c["eps"], c["accuracy"], capsize=2, marker=".", linestyle="--", color=color,
                        alpha=0.7 if ens is not None else 1.0,
                        yerr=_yerr(c["accuracy"], [_iv(res, pgd_accuracy_name(norm, e)) for e in c["eps"]]),
                        label=f"{name}: 100-PGD alone (area {c['auc']:.3f})")
        ax.set_xlabel(f"ε ({'L∞' if norm == 'linf' else 'L2'}, model-input units)")
        ax.set_ylabel("robust accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"robust accuracy ({norm}): attack ensemble and PGD")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_png(fig, path)


def plot_examples(visuals: Mapping[str, Any], path: Path, *, spatial_dims: int, title: str = "") -> Path | None:
    """Rows = example test samples; columns: clean, random NPS noisy image and its noise (HU),
    optimised NPS image and its perturbation (HU), PGD example and its difference (the columns the
    examples hold). 3D: central axial slice."""
    ex = visuals.get("examples") or []
    if not ex:
        return None

    def central(a: Any) -> np.ndarray:
        """``(H, W)`` of a 2D image or the central axial slice of a 3D volume (leading 1-dims dropped)."""
        a = np.asarray(a.detach().float().cpu() if hasattr(a, "detach") else a)
        while a.ndim > 2 and a.shape[0] == 1:
            a = a[0]
        image: np.ndarray = a[a.shape[0] // 2] if a.ndim == 3 else a
        return image

    cols = [c for c in ("clean", "random", "random_noise_hu", "optimized", "optimized_noise_hu", "pgd", "pgd_diff")
            if c.removesuffix("_diff") in ex[0]]  # a black-box evaluation's examples: clean and random only
    fig = Figure(figsize=(2.0 * len(cols), 2.2 * len(ex) + 0.5), dpi=110, layout="constrained")
    axes = fig.subplots(len(ex), len(cols), squeeze=False)
    for r, e in enumerate(ex):
        clean = central(e["clean"])
        lo, hi = float(clean.min()), float(clean.max())
        for c, col in enumerate(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if col == "pgd_diff":
                img = central(e["pgd"]) - clean
                lim = max(float(np.abs(img).max()), 1e-12)
                ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
                ax.set_title(f"PGD δ (±{lim:.2g})", fontsize=7)
            elif col.endswith("_noise_hu"):
                img = central(e[col])
                lim = max(float(np.abs(img).max()), 1e-12)
                ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
                ax.set_title(f"{col.split('_')[0]} noise (±{lim:.0f} HU)", fontsize=7)
            else:
                ax.imshow(central(e[col]), cmap="gray", vmin=lo, vmax=hi)
                s = e["scores"][col]
                extra = (f" {e['mas']:g} mAs" if col in ("random", "optimized") else
                         f" ε={e['pgd_eps']:g}" if col == "pgd" else f" y={e['label']}")
                ax.set_title(f"{col}{extra}\np={s:.3f}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_png(fig, path)


# ---------------------------------------------------------------------------------------------------
# HTML


def _img(path: Path | None) -> str:
    if path is None or not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def _pct(lv: Mapping[str, Any], n_models: int, entry: Mapping[str, Any] | None = None) -> str:
    """A Table-2 cell: the selected model's SAN/N with its interval, and over several fold models
    also their mean ± std."""
    cell = f"{lv['san_rate']:.1f}{ci_text(entry, 1)}"
    if n_models > 1:
        cell += f" (folds {lv['san_rate_mean']:.1f} ± {lv['san_rate_std']:.1f})"
    return cell


def table2_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Table 2 of shen 2020: SAN/N (%) per attack, split and mAs, with ``[lo, hi]`` (the selected
    model's interval; over fold models also their mean ± std)."""
    mas = [lv["mas"] for lv in _levels(next(iter(result["random_nps"].values())))]
    header = ["attack", "split", "N", "K", *[f"{m:g} mAs" for m in mas]]
    rows = []
    for key, short in ATTACKS:
        for split, block in result[key].items():
            lv = _levels(block)
            rows.append([short, split, str(block["n"]), str(block["k"]),
                         *[_pct(v, block["n_models"], _iv(result, san_rate_name(short, split, v["mas"]))) for v in lv]])
    if not result["optimized_nps"] and _black_box(result):
        rows.append(["optimized", "all", "", "", *[NO_GRADIENTS] * len(mas)])
    return header, rows


def _black_box(result: Mapping[str, Any]) -> bool:
    """Whether the result is a black-box evaluation (a model without input gradients)."""
    return (result.get("white_box") or {}).get("applicable", True) is False


def clean_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Clean AUC (DeLong interval), accuracy, sensitivity, specificity (exact intervals) per split."""
    header = ["split", "AUC", "accuracy", "sensitivity", "specificity", "N"]
    rows = []
    for split, m in result["clean"].items():
        cells = [f"{m['auc']:.3f}{ci_text(m.get('auc_delong'))}" if m.get("auc") is not None else "n/a"]
        for k in ("accuracy", "sensitivity", "specificity"):
            iv = _iv(result, clean_metric_name(split, k))
            cells.append("n/a" if m.get(k) is None else f"{m[k]:.3f}{ci_text(iv)}")
        rows.append([split, *cells, str(m.get("n", ""))])
    return header, rows


def _ensemble_index(curve: Mapping[str, Any]) -> dict[float, int]:
    """ε -> position in the curve's ensemble lists (ε = 0 at 0), for the ε where the ensemble ran."""
    return {e: i for i, e in enumerate(ensemble_eps(curve))}


def pgd_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Robust accuracy at each ε (model-input units and HU), per norm: the worst case over the
    attack ensemble (what the gate reads) with its interval, and 100-PGD alone beside it."""
    header = ["norm", "ε", "ε (HU)", "robust accuracy, worst case [95 % CI]", "survived / N",
              "100-PGD alone [95 % CI]", "broken only by Square"]
    rows = []
    for norm, c in (result.get("blackbox") or {}).items():  # a model without gradients: Square alone
        hu = c.get("eps_hu") or [None] * len(c["eps"])
        for i, (e, h, a) in enumerate(zip(c["eps"], hu, c["accuracy"], strict=True)):
            cell = f"{a:.3f}{ci_text(_iv(result, blackbox_accuracy_name(norm, e)))}"
            rows.append([norm, f"{e:g}", "" if h is None else f"{h:.3g}",
                         cell if i == 0 else f"≤ {cell} (Square alone: an upper bound)", f"{c['survived'][i]}/{c['n']}",
                         NO_GRADIENTS, ""])
    for norm, c in result["pgd"].items():
        hu = c.get("eps_hu") or [None] * len(c["eps"])
        survived = c.get("survived") or [None] * len(c["eps"])
        ens = c.get("ensemble")
        at = _ensemble_index(c)
        masked = [0, *ens["masked"]] if ens else []
        for e, h, a, k in zip(c["eps"], hu, c["accuracy"], survived, strict=True):
            pgd_cell = f"{a:.3f}{ci_text(_iv(result, pgd_accuracy_name(norm, e)))}"
            j = at.get(float(e))
            if ens and j is not None:
                worst = f"{ens['accuracy'][j]:.3f}{ci_text(_iv(result, ensemble_accuracy_name(norm, e)))}"
                count = f"{ens['survived'][j]}/{c['n']}"
            else:
                worst = "PGD only (ensemble at the gated ε)" if ens else "not run"
                count = f"{k}/{c['n']}" if k is not None else str(c["n"])
            rows.append([norm, f"{e:g}", "" if h is None else f"{h:.3g}", worst, count, pgd_cell,
                         "" if j is None or j == 0 else str(masked[j])])
        area = f"{ens['auc']:.3f}" if ens and ens.get("auc") is not None else ""
        rows.append([norm, "area", "", area, "", f"{c['auc']:.3f}", ""])
    return header, rows


def attack_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The per-attack breakdown of the ensemble (AutoAttack's rule): per norm and ε, how many
    samples each member attacked (the survivors of the members before it) and broke."""
    members = [a for c in result["pgd"].values() for a in (c.get("ensemble") or {}).get("attacks", [])]
    names = list(dict.fromkeys(members))
    header = ["norm", "ε", *[f"{a}: broke / attacked" for a in names], "survived / N", "seconds"]
    rows = []
    for norm, c in result["pgd"].items():
        ens = c.get("ensemble")
        if not ens:
            continue
        for i, e in enumerate(ensemble_eps(c)[1:]):
            cells = [f"{ens['per_attack'][a]['broken'][i]} / {ens['per_attack'][a]['attacked'][i]}"
                     if a in ens["per_attack"] else "" for a in names]
            rows.append([norm, f"{e:g}", *cells, f"{ens['survived'][i + 1]}/{c['n']}",
                         f"{ens['seconds']:.0f}" if i == 0 else ""])
    return header, rows


def sanity_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["norm", "check", "verdict", "value", "detail"]
    rows = []
    if _black_box(result):
        rows.append(["all", "every white-box check (budget, convergence, gradient masking)", NO_GRADIENTS, "",
                     "Square's outputs were checked for budget and clip range"])
    for norm, s in result["sanity"].items():
        for c in s["checks"]:
            rows.append([norm, c["name"], "pass" if c["passed"] else "FAIL", f"{c['value']:.3g}",
                         c["detail"].get("message", "")])
    return header, rows


def comparison_tables(baseline: Mapping[str, Any], hardened: Mapping[str, Any], label: str
                      ) -> list[tuple[str, list[str], list[list[str]]]]:
    """Baseline vs hardened side by side: per split, AUC and SAN/N (%) per mAs for the random and
    optimised NPS attacks (shen 2020, Tables 4-5; selected models), then 100-PGD accuracy per ε."""
    out = []
    rows_of = (("baseline", baseline), (label, hardened))
    for split in hardened["random_nps"]:
        if split not in baseline["random_nps"]:
            continue
        mas = [lv["mas"] for lv in _levels(hardened["random_nps"][split])]
        header = ["model", "AUC", *[f"random {m:g}" for m in mas], *[f"optimised {m:g}" for m in mas]]
        rows = []
        for name, res in rows_of:
            m = res["clean"].get(split, {})
            auc = m.get("auc")
            cells = [
                f"{lv['san_rate']:.1f}{ci_text(_iv(res, san_rate_name(short, split, lv['mas'])), 1)}"
                for key, short in ATTACKS for lv in _levels(res[key][split])
            ]
            rows.append([name, "n/a" if auc is None else f"{auc:.3f}{ci_text(m.get('auc_delong'))}", *cells])
        out.append((f"{split}: AUC and SAN/N (%) per mAs (Tables 4-5 style)", header, rows))
    for norm, c in hardened["pgd"].items():
        b = baseline["pgd"].get(norm)
        if b is None or b["eps"] != c["eps"]:
            continue
        header = ["model", *[f"ε {e:g}" for e in c["eps"]], "area"]
        rows = []
        for name, res in rows_of:
            r = res["pgd"][norm]
            ens, at = r.get("ensemble"), _ensemble_index(r)
            cells = []
            for e, a in zip(r["eps"], r["accuracy"], strict=True):
                j = at.get(float(e))
                if ens and j is not None:
                    cells.append(f"{ens['accuracy'][j]:.3f}{ci_text(_iv(res, ensemble_accuracy_name(norm, e)))}")
                else:
                    cells.append(f"{a:.3f}{ci_text(_iv(res, pgd_accuracy_name(norm, e)))} (PGD)")
            area = ens["auc"] if ens and ens.get("auc") is not None else r["auc"]
            rows.append([name, *cells, f"{area:.3f}"])
        out.append((f"Robust accuracy, worst case over the attacks where they ran, else 100-PGD (marked), {norm} "
                    f"(N = {c['n']})", header, rows))
    return out


VERDICT_TEXT = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE"}


def bound_text(r: Mapping[str, Any]) -> str:
    """The one-sided bound(s) a gate decision rests on (a gate row): a pass of ``>=`` rests on the
    lower bound (``≥ lo``), its fail on the upper one (``≤ hi``), ``<=`` mirrors; an inconclusive
    row shows both (``lo – hi``)."""
    if r.get("lower") is None:
        return ""
    decision = r.get("decision") or ("pass" if r.get("passed") else "fail")
    if decision == "inconclusive":
        return f"{r['lower']:.4g} – {r['upper']:.4g}"
    low_side = (r["op"] == ">=") == (decision == "pass")
    return f"≥ {r['lower']:.4g}" if low_side else f"≤ {r['upper']:.4g}"


def verdict_rows(rec: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """A gate record (:func:`ctharden.gate.criteria.check`) as a table: per criterion the point
    value, the one-sided bound the decision rests on, k/n, the threshold, the decision and, for an
    inconclusive one, the samples that would decide it (or why no sample count can: a white-box
    criterion of a model without gradients)."""
    conf = rec.get("confidence")
    header = ["criterion", "value", f"{int(100 * conf)} % bound" if conf else "bound", "k / n", "threshold",
              "decision", "to decide"]
    rows = []
    for name, r in rec["criteria"].items():
        note = r.get("note")
        value = ("n/a" if note == NO_GRADIENTS else "not measured") if r["value"] is None else f"{r['value']:.4g}"
        kn = "" if r.get("n") is None else (f"{r['k']}/{r['n']}" if r.get("k") is not None else f"n={r['n']}")
        decision = r.get("decision") or ("pass" if r["passed"] else "fail")
        todo = f"~{r['samples_to_decide']} samples" if r.get("samples_to_decide") else (
            note if note and note != "not measured" else "")
        rows.append([f"{r['description']} ({name})", value, bound_text(r), kn, f"{r['op']} {r['threshold']:g}",
                     VERDICT_TEXT[decision], todo])
    return header, rows


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="{_CELL_CLASS.get(str(v), "")}">{html.escape(str(v))}</td>' for v in r
        ) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub/Prefect markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


_VERDICT_CLASS = {"pass": "pass", "fail": "failv", "inconclusive": "openv"}
_CELL_CLASS = {"FAIL": "fail", "INCONCLUSIVE": "open", "PASS": "ok"}
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f0f0f0}td.fail{background:#fdd;font-weight:bold}td.open{background:#ffefc2;font-weight:bold}
td.ok{background:#dfd}img{max-width:100%;margin:0.5em 0}.verdict{font-size:1.3em}
.pass{color:#070;font-weight:bold}.failv{color:#b00;font-weight:bold}.openv{color:#a60;font-weight:bold}
code{background:#f5f5f5;padding:1px 3px}
"""


def render_html(
    results: Mapping[str, Mapping[str, Any]],
    figures: Mapping[str, Mapping[str, Path | None]],
    *,
    title: str = "ctharden robustness report",
    notes: Sequence[str] = (),
    comparisons: Mapping[str, Sequence[tuple[str, list[str], list[list[str]]]]] | None = None,
    verdicts: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The report page. First screen: per model its gate verdict (``verdicts[name]``, a gate record)
    with every criterion's point, bound and threshold. Then per model the clean metrics, Table 2
    (SAN/N %), the PGD table, the sanity verdicts and the figures, every rate with its interval;
    ``figures[name]`` maps a figure key to its PNG; ``figures['']`` holds figures shared by all
    models. ``comparisons[name]``: titled tables shown first for that model (baseline vs hardened)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for name, rec in (verdicts or {}).items():
        verdict = str(rec.get("verdict") or ("pass" if rec["passed"] else "fail"))
        parts.append(f"<h2>{html.escape(name)}: <span class='verdict {_VERDICT_CLASS[verdict]}'>"
                     f"{VERDICT_TEXT[verdict]}</span></h2>" + _html_table(*verdict_rows(rec)))
    if verdicts:
        parts.append("<p>Each criterion is decided on a one-sided confidence bound (exact binomial for "
                     "rates, DeLong for the AUC): pass when the bound clears the threshold, fail when "
                     "the opposite bound misses it, inconclusive otherwise; only a pass registers.</p>")
    for note in notes:
        parts.append(f"<p>{html.escape(note)}</p>")
    shared = figures.get("", {})
    if shared:
        parts.append("<h2>All models</h2>" + "".join(_img(p) for p in shared.values()))
    for name, res in results.items():
        verdict = NO_GRADIENTS if res["sanity_passed"] is None else "pass" if res["sanity_passed"] else "FAIL"
        cls = "pass" if res["sanity_passed"] is not False else "failv"
        meta = res.get("model", {})
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(f"<p>model <code>{html.escape(str(meta.get('file', '')))}</code> "
                     f"({html.escape(str(meta.get('arch', '')))}), dataset "
                     f"<code>{html.escape(str(res.get('dataset', '')))}</code> "
                     f"(hash {html.escape(str(res.get('dataset_hash', ''))[:12])}); "
                     f"sanity checks: <span class='{cls}'>{verdict}</span>; "
                     f"{res['seconds']['total']:.0f} s.</p>")
        for caption, header, rows in (comparisons or {}).get(name, []):
            parts.append(f"<h3>{html.escape(caption)}</h3>" + _html_table(header, rows))
        parts.append("<h3>Clean metrics [95 % CI]</h3>" + _html_table(*clean_rows(res)))
        parts.append("<h3>NPS attacks: SAN/N (%) (shen 2020, Table 2)</h3>" + _html_table(*table2_rows(res)))
        steps = (f"(mean {res['optimized_nps'][next(iter(res['optimized_nps']))].get('mean_steps', 0):.1f} "
                 "steps per chain)" if res["optimized_nps"] else f"({NO_GRADIENTS})")
        parts.append(
            "<p>A sample counts as attacked when any of the K perturbations changes its fp32 predicted "
            "label. Random: K NPS noise realisations per mAs. Optimised: Algorithm 1, projected "
            f"gradient ascent on ‖D(x+p)−D(x)‖² with the NPS projection after each step {steps}.</p>")
        if res.get("trends"):
            parts.append("<h3>The papers' trends on this model</h3><ul>" + "".join(
                f"<li>{html.escape(line[2:])}</li>" for line in trend_lines(res["trends"])) + "</ul>")
        parts.append("<h3>Robust accuracy: worst case over the attack ensemble, and 100-PGD alone</h3>"
                     + _html_table(*pgd_rows(res)))
        if attack_rows(res)[1]:
            parts.append("<h3>Per-attack breakdown (each attack runs on the survivors of those before it)"
                         "</h3>" + _html_table(*attack_rows(res)))
        parts.append("<h3>Sanity checks of the white-box evaluation</h3>" + _html_table(*sanity_rows(res)))
        for key, p in figures.get(name, {}).items():
            if p is not None:
                parts.append(f"<h3>{html.escape(key)}</h3>{_img(p)}")
        parts.append("<details><summary>settings</summary><pre>"
                     + html.escape(_pretty(res.get("settings", {}))) + "</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _pretty(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, default=str)


def summary_markdown(results: Mapping[str, Mapping[str, Any]], report_path: str | Path,
                     comparisons: Mapping[str, Sequence[tuple[str, list[str], list[list[str]]]]] | None = None,
                     title: str = "Robustness evaluation",
                     verdicts: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """Markdown summary (Prefect artifact, CI summary): the gate verdicts first (when given), then
    per model the clean metrics, Table 2 and PGD with intervals, sanity verdicts, and the
    baseline-vs-hardened tables when given."""
    out = [f"# {title}", "", f"Full report: `{report_path}`", ""]
    for name, rec in (verdicts or {}).items():
        verdict = str(rec.get("verdict") or ("pass" if rec["passed"] else "fail"))
        out += [f"## {name}: {VERDICT_TEXT[verdict]}", "", markdown_table(*verdict_rows(rec)), ""]
    for name, res in results.items():
        test = res["clean"].get("test", {})
        auc = test.get("auc")
        failed = ", ".join(f"{n}: {', '.join(s['flags'])}" for n, s in res["sanity"].items() if not s["passed"])
        passed = res["sanity_passed"]
        verdict = NO_GRADIENTS if passed is None else "pass" if passed else f"FAIL ({failed})"
        auc_txt = f"{auc:.3f}" if auc is not None else "n/a"
        auc_txt += ci_text(test.get("auc_delong"))
        out += [f"## {name}", "", f"clean test AUC {auc_txt}; sanity checks {verdict}", "",
                markdown_table(*clean_rows(res)), ""]
        for caption, header, rows in (comparisons or {}).get(name, []):
            out += [f"**{caption}**", "", markdown_table(header, rows), ""]
        out += [markdown_table(*table2_rows(res)), ""]
        if res.get("trends"):
            out += [*trend_lines(res["trends"]), ""]
        out += [markdown_table(*pgd_rows(res)), ""]
        if attack_rows(res)[1]:
            out += [markdown_table(*attack_rows(res)), ""]
    return "\n".join(out)


__all__ = [
    "attack_rows",
    "comparison_tables",
    "markdown_table",
    "pgd_rows",
    "plot_examples",
    "plot_robust_accuracy",
    "plot_san_vs_mas",
    "plot_sar_curves",
    "render_html",
    "verdict_rows",
    "bound_text",
    "sanity_rows",
    "clean_rows",
    "ci_text",
    "summary_markdown",
    "table2_rows",
    "write_plot_data",
]
