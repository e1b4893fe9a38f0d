"""The training ε of the hardening method, picked by Optuna (the ``tune`` stage).

Per job:

1. **IMA seeds the search** (ma 2020, section 3.3: "the sample margin distribution estimated by
   IMA indicates a good ε"): IMA fine-tunes a copy of the baseline (``harden.ima``) and its margin
   distribution gives ε_IMA = a quantile (``tune.ima_quantile``) of the margins below ε_max. The
   margin histogram per epoch is plotted and the margins are saved.
2. **The study** (SQLite storage next to the outputs, seeded TPE): the anchors
   (``tune.anchors``) and ε_IMA are enqueued first, TPE proposes the rest of ``tune.n_trials`` in
   ``[eps_low, eps_high]`` (log scale). A trial fine-tunes the baseline with ``harden.method`` at ε
   (exactly as the harden stage will) and scores it on the baseline's **validation fold** (never the
   test split): the objective is 100-PGD robust accuracy at the gate's ε (``tune.eval_eps``,
   ``tune.eval_norm``), subject to ``trial.set_constraint("clean_auc", min_clean_auc - AUC)``
   (feasible when ≤ 0). The chosen ε is the best feasible trial's (ties: higher AUC, then smaller
   ε); with no feasible trial, the one with the highest AUC, flagged ``feasible: false``.
3. Every trial is a nested MLflow run under ``tune-<job>``; the chosen ε, the trials table, the
   margins and the study database are artifacts.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from ctharden.attacks.sanity import pgd_accuracy
from ctharden.config.hardening import EPS_METHODS, harden_settings, tune_settings
from ctharden.config.params import section
from ctharden.config.paths import tune_paths
from ctharden.core.errors import ConfigError
from ctharden.core.io import atomic_write_json, atomic_write_text
from ctharden.core.progress import progress
from ctharden.core.seeding import derive_seed
from ctharden.hardening.ima import suggest_eps
from ctharden.hardening.methods import clean_scores, harden_model, hardening_data, noise_context, subset
from ctharden.reporting.plots import plot_margins
from ctharden.reporting.report import markdown_table
from ctharden.stages.inputs import load_baseline
from ctharden.stages.result import TuneResult
from ctharden.tracking.runs import configure, tracking_from_params

log = logging.getLogger(__name__)
STAGE = "tune"


def score_trial(model: Any, val: Any, ts: Any, seed: int) -> dict[str, float]:
    """Validation AUC and 100-PGD robust accuracy at the gate's ε of a candidate model."""

    clean = clean_scores(model, val)
    sub = subset(val, ts.max_samples, derive_seed(seed, 60))
    _, robust = pgd_accuracy(model, sub.x, sub.y, [0.0, ts.eval_eps], norm=ts.eval_norm, steps=ts.steps)
    return {"clean_auc": clean["auc"], "clean_accuracy": clean["accuracy"], "robust_accuracy": robust}


def _choose(trials: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    feasible = [t for t in trials if t["feasible"]]
    if feasible:
        return max(feasible, key=lambda t: (t["robust_accuracy"], t["clean_auc"], -t["eps"])), True
    return max(trials, key=lambda t: (-math.inf if math.isnan(t["clean_auc"]) else t["clean_auc"], -t["eps"])), False


def tune_job(params: dict[str, Any], job: str, *, log_mlflow: bool = True) -> dict[str, Any]:
    """Run the ε search for ``job``; writes ``metrics/tune/<job>.json`` and returns it."""
    import mlflow
    import optuna

    t0 = time.perf_counter()
    hs, ts = harden_settings(params, job), tune_settings(params, job)
    seed = int(section(params, "seed"))
    paths = tune_paths(params, job)
    baseline, summary, full = load_baseline(params, job)
    data = hardening_data(full, int(summary["selected_fold"]))
    if data.val is None or len(data.val) == 0:
        raise ConfigError(f"job {job!r} has a single fold: the ε search needs the selected model's validation "
                          "fold (set split.n_folds >= 2)")
    if hs.method not in EPS_METHODS:
        result: dict[str, Any] = {"job": job, "method": hs.method, "eps": None,
                                  "skipped": f"method {hs.method!r} has no training ε"}
        atomic_write_json(paths["metrics"], result)
        return result
    noise = noise_context(params, job, baseline, int(data.train.x.shape[-1])) if hs.method == "nps" else None
    paths["dir"].mkdir(parents=True, exist_ok=True)
    db = paths["dir"] / "study.db"
    db.unlink(missing_ok=True)  # a fresh, reproducible study every run
    if log_mlflow:
        configure(tracking_from_params(params))
    parent = mlflow.start_run(run_name=f"tune-{job}") if log_mlflow else None
    try:
        if parent is not None:
            mlflow.log_params({"job": job, "method": hs.method, **{f"tune.{k}": v for k, v in ts.to_dict().items()}})
            mlflow.set_tags({"ctharden.job": job, "ctharden.stage": "tune",
                             "ctharden.baseline_run_id": summary["mlflow"]["run_id"]})
        ima_info: dict[str, Any] | None = None
        anchors = list(ts.anchors)
        if ts.ima_seed:
            model, info = harden_model(baseline, "ima", hs.ima_eps_max, data, hs, seed=derive_seed(seed, 61))
            margins = np.asarray(info["margins"], dtype=np.float32)
            eps_ima = suggest_eps(margins, hs.ima_eps_max, ts.ima_quantile)
            ima_info = {"eps_max": hs.ima_eps_max, "delta": info["delta"], "suggested_eps": eps_ima,
                        "quantile": ts.ima_quantile, "margin_mean": float(margins.mean()),
                        "margin_quantiles": {q: float(np.quantile(margins, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
                        "share_at_eps_max": float((margins >= hs.ima_eps_max * (1 - 1e-6)).mean()),
                        "seconds": info["seconds"], **score_trial(model, data.val, ts, seed)}
            np.savetxt(paths["dir"] / "ima_margins.csv", margins, fmt="%.6g", header="margin", comments="")
            plot_margins([np.asarray(h) for h in info["margin_history"]], hs.ima_eps_max,
                         paths["reports"] / "ima_margins.png", title=f"{job}: IMA margins per epoch")
            anchors.insert(0, min(max(eps_ima, ts.eps_low), ts.eps_high))
        sampler = optuna.samplers.TPESampler(seed=derive_seed(seed, 62))  # reads trial.set_constraint (Optuna 5)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name=f"ctharden-{job}", storage=f"sqlite:///{db}", direction="maximize",
                                    sampler=sampler)
        for a in dict.fromkeys(anchors):  # unique, in order
            study.enqueue_trial({"eps": float(a)})
        trials: list[dict[str, Any]] = []
        base_score = score_trial(baseline, data.val, ts, seed)
        floor = auc_floor(ts, base_score["clean_auc"])
        acc_floor = floor_of(ts.min_clean_accuracy, ts.max_accuracy_drop, base_score["clean_accuracy"])

        def objective(trial: optuna.Trial) -> float:
            eps = trial.suggest_float("eps", ts.eps_low, ts.eps_high, log=True)
            model, info = harden_model(baseline, hs.method, eps, data, hs, seed=seed, noise=noise)
            s = score_trial(model, data.val, ts, seed)
            auc = s["clean_auc"] if not math.isnan(s["clean_auc"]) else 0.0
            trial.set_constraint("clean_auc", floor - auc)
            trial.set_constraint("clean_accuracy", acc_floor - s["clean_accuracy"])
            rec = {"number": trial.number, "eps": eps, **s,
                   "feasible": auc >= floor and s["clean_accuracy"] >= acc_floor,
                   "seconds": info["seconds"]}
            trials.append(rec)
            if parent is not None:
                with mlflow.start_run(run_name=f"{job}-trial{trial.number}", nested=True):
                    mlflow.log_params({"eps": eps, "method": hs.method, "trial": trial.number})
                    mlflow.log_metrics({k: v for k, v in s.items() if not math.isnan(v)})
                    mlflow.log_metric("feasible", float(rec["feasible"]))
            log.info("tune %s trial %d: eps=%.4g robust=%.3f auc=%.3f", job, trial.number, eps,
                     s["robust_accuracy"], s["clean_auc"])
            return s["robust_accuracy"]

        with progress(ts.n_trials, f"tuning {job}'s ε") as advance:
            study.optimize(objective, n_trials=ts.n_trials,
                           callbacks=[lambda _study, trial: advance(note=f"trial {trial.number} done")])
        best, feasible = _choose(trials)
        result = {
            "job": job, "method": hs.method, "norm": hs.norm, "eps": best["eps"], "feasible": feasible,
            "objective": {"eval_eps": ts.eval_eps, "eval_norm": ts.eval_norm, "steps": ts.steps,
                          "min_clean_auc": ts.min_clean_auc, "max_auc_drop": ts.max_auc_drop, "auc_floor": floor,
                          "accuracy_floor": acc_floor,
                          "split": "validation fold of the selected model",
                          "n_val": len(data.val)},
            "best_trial": best, "trials": trials, "ima": ima_info,
            "study": {"name": study.study_name, "storage": str(db)},
            "baseline": {"model_file": summary["model_file"], "mlflow_run_id": summary["mlflow"]["run_id"],
                         **base_score},
            "settings": {"tune": ts.to_dict(), "harden": hs.to_dict()},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        table = trials_markdown(result)
        atomic_write_text(paths["reports"] / "trials.md", table)
        if parent is not None:
            mlflow.log_metrics({"chosen_eps": best["eps"], "chosen_robust_accuracy": best["robust_accuracy"],
                                "chosen_clean_auc": best["clean_auc"], "feasible": float(feasible)})
            mlflow.log_dict(result, "tune/result.json")
            mlflow.log_artifact(str(db), "tune")
            mlflow.log_artifact(str(paths["reports"] / "trials.md"), "tune")
            if ima_info is not None:
                mlflow.log_artifact(str(paths["reports"] / "ima_margins.png"), "tune")
                mlflow.log_artifact(str(paths["dir"] / "ima_margins.csv"), "tune")
            result["mlflow_run_id"] = parent.info.run_id
    finally:
        if parent is not None:
            mlflow.end_run()
    atomic_write_json(paths["metrics"], result)
    return result


def floor_of(absolute: float | None, drop: float | None, baseline: float) -> float:
    """max(absolute, baseline - drop) over those set (0 if neither)."""
    floors = []
    if absolute is not None:
        floors.append(float(absolute))
    if drop is not None and not math.isnan(baseline):
        floors.append(baseline - float(drop))
    return max(floors) if floors else 0.0


def auc_floor(ts: Any, baseline_auc: float) -> float:
    """The clean-AUC constraint: max(min_clean_auc, baseline AUC - max_auc_drop) over those set."""
    return floor_of(ts.min_clean_auc, ts.max_auc_drop, baseline_auc)


def trials_markdown(result: dict[str, Any]) -> str:
    """The study's trials as a markdown table, the chosen one marked."""

    rows = []
    for t in result["trials"]:
        mark = "**chosen**" if t["number"] == result["best_trial"]["number"] else ""
        rows.append([str(t["number"]), f"{t['eps']:.4g}", f"{t['robust_accuracy']:.3f}", f"{t['clean_accuracy']:.3f}",
                     f"{t['clean_auc']:.3f}", "yes" if t["feasible"] else "no", mark])
    obj = result["objective"]
    head = (f"# {result['job']}: training ε for `{result['method']}` ({result['norm']})\n\n"
            f"Objective: 100-PGD robust accuracy at {obj['eval_norm']} ε = {obj['eval_eps']:g} on the "
            f"{obj['n_val']} samples of the {obj['split']}; constraints clean AUC ≥ {obj['auc_floor']:.3f} and "
            f"clean accuracy ≥ {obj['accuracy_floor']:.3f} (whole validation fold).\n\n")
    b = result["baseline"]
    head += (f"Baseline on the same samples: robust accuracy {b['robust_accuracy']:.3f}, "
             f"clean AUC {b['clean_auc']:.3f}.\n\n")
    if result.get("ima"):
        i = result["ima"]
        head += (f"IMA (ε_max {i['eps_max']:g}) margins: median {i['margin_quantiles'][0.5]:.4g}, "
                 f"{100 * i['share_at_eps_max']:.0f} % at ε_max; suggested ε = {i['suggested_eps']:.4g} "
                 f"(enqueued first). IMA model itself: robust accuracy {i['robust_accuracy']:.3f}, "
                 f"AUC {i['clean_auc']:.3f}.\n\n")
    return head + markdown_table(["trial", "ε", "robust acc", "clean acc", "clean AUC", "feasible", ""], rows) + "\n"


def run(params: dict[str, Any], name: str) -> TuneResult:
    """The tune stage for job ``name`` (bad settings fail before any work)."""
    harden_settings(params, name)
    tune_settings(params, name)
    return TuneResult(STAGE, name, tune_job(params, name), tune_paths(params, name)["metrics"])
