"""Adaptive training (shen et al. 2020, section 2.5, Algorithm 2; section 3.5, Tables 4-5).

>>> data = load_arrayset("artifacts/datasets/synthetic_nodule3d", model)
>>> result = adaptive_train(model, data, job_settings(params, "nodule3d"), n_adapt=2, seed=1)
>>> print(result.tables())          # Tables 4 (train) and 5 (test), with the paper's rows

Algorithm 2 as implemented
--------------------------
``S`` starts as the training split of ``data`` (model-input units, ground-truth labels). Step 0
evaluates the baseline model ("w/o adaptive training"). Then for ``i = 1 .. n_adapt``:

1. run the optimised NPS attack (Algorithm 1, :func:`~ctharden.attacks.optimized_nps_attack`) on
   the **original training samples** at every mAs level of ``mas_levels`` with ``restarts``
   chains per sample (the paper: "we performed the optimization-based attack only once for each
   training sample", so ``restarts=1``); δ, ε, N_iter, batch size and autocast come from
   ``settings.optimized`` (δ via :func:`~ctharden.evaluation.robustness.step_hu`);
2. ``P`` = the perturbed inputs ``x + p`` that were *successfully attacked*: the fp32 predicted
   label on ``x + p`` differs from that on the clean ``x`` (the paper's definition, section 2.7,
   the same decision the attack and SAN use). Every successful chain is one element of ``P``;
   one training sample can contribute one element per mAs level (and per restart);
3. if ``P`` is empty, stop (Algorithm 2 sets ``i = N_adapt``); otherwise ``S = S ∪ P`` with
   each perturbed input labelled with its clean sample's **ground-truth** label (eq. 6: every
   ``x_i + p`` is fitted to ``y_i*``) and fine-tune ``epochs_per_step`` epochs on ``S`` with the
   baseline's loss (eq. 1: ``mse`` on the sigmoid for nodule3d; ``ce`` for models trained with it)
   and class-balanced sampling (:func:`~ctharden.training.data.balanced_sampler`), as the baseline;
4. evaluate: AUC and SAN/N per mAs under random and optimised attacks on train and test (the
   rows of Tables 4-5; the paper's tables are the optimised attacks).

``S`` is cumulative: elements added at step 1 stay in ``S`` at step 2. The attack at step ``i``
targets the clean training samples again (Algorithm 2, line 2: ``{p_i*(k) | i = 1 .. N_train}``),
not the perturbed elements of ``S``. Test samples are never attacked for ``P`` and never enter
``S`` (section 2.7: "successfully attacked testing samples were never involved").

Decisions where the paper is silent (all recorded in ``AdaptiveResult.settings``):

- **Misclassified samples.** A training sample whose clean prediction is already wrong is
  "successfully attacked" when the perturbation flips its label, i.e. makes it *right*. The
  default (``only_correct=False``) follows the paper's definition and adds these too: labelled
  with the ground truth they are consistent with eq. 6 and only reinforce the correct answer
  around ``x``. ``only_correct=True`` adds only flips of correctly classified samples (the
  perturbations that *caused* an error). With the default, the number added equals the number
  of successful chains the attack reports (``n_flips``).
- **Optimizer.** One Adam (``lr``, default 1e-4; the baseline's default) is created at the
  start and carried across the steps (fine-tuning continues); the baseline's optimizer state is
  not available.
- **No augmentation** while fine-tuning: a shift/rotation would resample (and smooth) the noise
  patterns that broke the model. The baseline's shift/rotate augmentation is a data-set choice
  of the baseline run, not of Algorithm 2.
- **Evaluation randomness.** The default evaluation uses the same seed at every step (common
  random numbers), so the rows differ by the model, not by the noise draws.
- The fine-tuned model is the last epoch of each step (no validation-based selection: the paper
  gives none for fine-tuning).

Units: ``data.raw`` in HU (nodule3d; display units with ``settings.hu_per_unit`` for
models without an HU window), ``data.x`` and every element of ``S`` in model-input units.

Determinism: with the same ``seed`` and inputs, on CPU, the attacks (seeded generators from
``seed``), the sampler order and dropout (``torch.manual_seed`` per step) repeat exactly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ctharden.attacks.common import attack_mode, autocast_ctx
from ctharden.attacks.losses import infer_adapter
from ctharden.attacks.nps import InputMap, optimized_nps_attack
from ctharden.config.robustness import RobustnessSettings
from ctharden.core.errors import ConfigError, DataError
from ctharden.core.seeding import derive_seed
from ctharden.data.arrays import ArraySet
from ctharden.evaluation.robustness import _nps_inputs, clean_metrics, step_hu
from ctharden.evaluation.units import run_nps_attacks
from ctharden.hardening.objectives import fit_with, resolve_device
from ctharden.models import positive_score
from ctharden.noise.nps import NPSModel
from ctharden.reporting.report import markdown_table
from ctharden.training.data import balanced_sampler
from ctharden.training.losses import LOSSES, check_loss, training_loss

log = logging.getLogger(__name__)

Evaluator = Callable[[nn.Module, int], dict[str, dict[str, Any]]]
"""``evaluate(model, step) -> {split: row}``; a row has ``auc`` (float | None) and ``random`` /
``optimized``: ``{mAs: SAN/N in %}`` (either may be missing); other keys are kept as they are."""

# ---------------------------------------------------------------------------------------------------
# the paper's numbers (mean ± std over the 10 cross-validation models)

PAPER_MAS: tuple[float, ...] = (10.0, 50.0, 100.0, 200.0, 500.0)

PAPER_TABLE4_TRAIN: dict[str, Any] = {
    "caption": "shen 2020 Table 4: AUC and SAN/N_train (%) under optimised attacks, training set "
               "(mean ± std over 10 models)",
    "mas": PAPER_MAS,
    "rows": [
        ("w/o adaptive training", (0.97, 0.004), ((59.2, 6.3), (34.7, 6.3), (23.4, 6.6), (13.6, 6.5), (6.6, 4.2))),
        ("1 step adaptive training", (0.98, 0.003), ((37.0, 6.7), (20.3, 2.2), (15.2, 2.5), (10.4, 2.4), (6.4, 1.4))),
        ("2 steps adaptive training", (0.99, 0.008), ((33.5, 7.6), (17.4, 2.2), (10.8, 1.7), (7.7, 1.8), (4.7, 1.2))),
    ],
}
"""The paper's Table 4 (training set). Row: (label, (AUC, std), ((SAN/N %, std) per mAs))."""

PAPER_TABLE5_TEST: dict[str, Any] = {
    "caption": "shen 2020 Table 5: AUC and SAN/N_test (%) under optimised attacks, testing set "
               "(mean ± std over 10 models)",
    "mas": PAPER_MAS,
    "rows": [
        ("w/o adaptive training", (0.91, 0.008), ((61.8, 5.5), (44.4, 6.3), (34.3, 7.5), (25.4, 6.4), (19.3, 5.1))),
        ("1 step adaptive training", (0.90, 0.011), ((39.9, 11.6), (29.8, 6.3), (27.8, 7.5), (20.7, 6.5), (16.5, 6.7))),
        ("2 steps adaptive training", (0.90, 0.013), ((33.9, 8.5), (25.6, 5.2), (21.1, 2.6), (12.4, 5.8), (16.1, 5.3))),
    ],
}
"""The paper's Table 5 (testing set), same layout as :data:`PAPER_TABLE4_TRAIN`."""

PAPER_TABLES: dict[str, dict[str, Any]] = {"train": PAPER_TABLE4_TRAIN, "test": PAPER_TABLE5_TEST}

# seed-stream tags (ctharden.evaluation.robustness uses 30-50)
_TAG_ATTACK, _TAG_SAMPLER, _TAG_TORCH, _TAG_EVAL = 70, 71, 72, 73


# ---------------------------------------------------------------------------------------------------
# results


@dataclass
class AddedSamples:
    """The elements of ``S`` added by the adaptive steps (``M`` of them, in the order added).

    ``x``: ``(M, *spatial)`` float32 model-input units (CPU) — exactly the inputs the attack
    decided on; ``y``: ``(M,)`` int64 ground-truth labels of the source samples; ``target``:
    ``(M,)`` float32 regression targets (= ``y`` except for rating models); ``source``: ``(M,)``
    indices into ``data`` (always training-split samples); ``step``, ``mas``, ``restart``: where
    each element came from; ``clean_pred`` / ``perturbed_pred``: ``(M,)`` fp32 predicted labels of
    the model being attacked on the clean and on the perturbed input (they differ for every element).
    """

    x: Tensor
    y: Tensor
    target: Tensor
    source: np.ndarray
    step: np.ndarray
    mas: np.ndarray
    restart: np.ndarray
    clean_pred: np.ndarray
    perturbed_pred: np.ndarray

    @classmethod
    def empty(cls, spatial: tuple[int, ...]) -> AddedSamples:
        i64 = np.zeros(0, dtype=np.int64)
        return cls(torch.zeros((0, *spatial)), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                   i64, i64.copy(), np.zeros(0), i64.copy(), i64.copy(), i64.copy())

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def extend(self, other: AddedSamples) -> AddedSamples:
        return AddedSamples(
            torch.cat([self.x, other.x]), torch.cat([self.y, other.y]), torch.cat([self.target, other.target]),
            *(np.concatenate([getattr(self, k), getattr(other, k)])
              for k in ("source", "step", "mas", "restart", "clean_pred", "perturbed_pred")),
        )


@dataclass
class AdaptiveStep:
    """One row of the process. Step 0 is the baseline (nothing attacked or added).

    ``n_attacked``: training samples attacked (N_train); ``n_attempts``: attack chains run
    (N_train × mAs levels × restarts); ``n_flips``: successful chains as the attacks reported
    them; ``n_added``: elements added to ``S`` (= ``n_flips`` unless ``only_correct``);
    ``n_total``: ``|S|`` after the step (what the fine-tuning ran on); ``added_per_mas`` and
    ``attack_san_rate`` (SAN/N in % of this step's attack, per mAs); ``history``: fine-tuning
    epochs (:func:`~ctharden.hardening.objectives.fit_with` records); ``evaluation``: ``{split: row}``
    from the evaluator (None when the step stopped early); ``stopped``: ``P`` was empty, so the
    model was not tuned; ``seconds``: attack / train / evaluate / total.
    """

    step: int
    n_attacked: int
    n_attempts: int
    n_flips: int
    n_added: int
    n_total: int
    added_per_mas: dict[float, int] = field(default_factory=dict)
    attack_san_rate: dict[float, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    evaluation: dict[str, dict[str, Any]] | None = None
    stopped: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The paper's row label: "w/o adaptive training", "1 step ...", "2 steps ..."."""
        if self.step == 0:
            return "w/o adaptive training"
        return f"{self.step} step{'s' if self.step > 1 else ''} adaptive training"

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "label": self.label, "n_attacked": self.n_attacked, "n_attempts": self.n_attempts,
            "n_flips": self.n_flips, "n_added": self.n_added, "n_total": self.n_total,
            "added_per_mas": {f"{m:g}": v for m, v in self.added_per_mas.items()},
            "attack_san_rate": {f"{m:g}": v for m, v in self.attack_san_rate.items()},
            "history": list(self.history), "evaluation": _jsonable(self.evaluation), "stopped": self.stopped,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


@dataclass
class AdaptiveResult:
    """Outcome of :func:`adaptive_train`: the tuned ``model`` (the one passed in, tuned in place),
    ``steps`` (step 0 = baseline, then one per adaptive step run), ``added`` (the elements of ``S``
    beyond the training split), ``train_indices`` (the training split's indices into ``data``)
    and the ``settings`` used."""

    model: nn.Module
    steps: list[AdaptiveStep]
    added: AddedSamples
    train_indices: np.ndarray
    settings: dict[str, Any]

    def rows(self, split: str) -> list[dict[str, Any]]:
        """Table 4 (``"train"``) / Table 5 (``"test"``) rows: label, AUC, SAN/N per mAs (random,
        optimised) for every evaluated step."""
        out = []
        for s in self.steps:
            if s.evaluation is None or split not in s.evaluation:
                continue
            row = s.evaluation[split]
            out.append({"step": s.step, "label": s.label, "auc": row.get("auc"),
                        "random": dict(row.get("random") or {}), "optimized": dict(row.get("optimized") or {})})
        return out

    def tables(self, digits: int = 1) -> str:
        """Markdown: Tables 4 and 5 (optimised attacks, as in the paper) with the paper's rows
        below each, the random-attack counterparts, and the growth of ``S`` per step."""
        parts: list[str] = []
        for split, title in (("train", "Table 4 — training set"), ("test", "Table 5 — testing set")):
            rows = self.rows(split)
            if not rows:
                continue
            first = next(s.evaluation[split] for s in self.steps if s.evaluation is not None and split in s.evaluation)
            n = first.get("n")
            parts.append(f"### {title}" + (f" (N = {n})" if n is not None else ""))
            for attack, name, kkey in (("optimized", "optimised", "restarts"), ("random", "random", "k_random")):
                levels = sorted({m for r in rows for m in r[attack]})
                if not levels:
                    continue
                k = first.get(kkey)
                parts.append(f"\nThis run, {name} NPS attacks" + (f" (K = {k})" if k is not None else "")
                             + " — AUC and SAN/N (%):\n")
                body = [[r["label"], _fmt(r["auc"], 3), *(_fmt(r[attack].get(m), digits) for m in levels)]
                        for r in rows]
                parts.append(markdown_table(["", "AUC", *(f"{m:g} mAs" for m in levels)], body))
            ref = PAPER_TABLES[split]
            parts.append(f"\nReference — {ref['caption']}:\n")
            parts.append(markdown_table(
                ["", "AUC", *(f"{m:g} mAs" for m in ref["mas"])],
                [[label, f"{auc[0]:.2f} ± {auc[1]:.3f}", *(f"{v:.1f} ± {s:.1f}" for v, s in rates)]
                 for label, auc, rates in ref["rows"]],
            ))
            parts.append("")
        parts.append("### Training set S during adaptive training\n")
        parts.append(markdown_table(
            ["step", "attacked", "attack chains", "successful", "added", "size of S", "seconds"],
            [[s.label + (" (P empty: stopped)" if s.stopped else ""), str(s.n_attacked), str(s.n_attempts),
              str(s.n_flips), str(s.n_added), str(s.n_total), f"{s.seconds.get('total', 0.0):.1f}"]
             for s in self.steps],
        ))
        return "\n".join(parts) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no tensors; ``added`` as its provenance columns)."""
        return {
            "settings": _jsonable(self.settings),
            "steps": [s.to_dict() for s in self.steps],
            "train_indices": self.train_indices.tolist(),
            "added": {"n": len(self.added), "source": self.added.source.tolist(), "step": self.added.step.tolist(),
                      "mas": self.added.mas.tolist(), "restart": self.added.restart.tolist()},
        }


def _fmt(value: Any, digits: int) -> str:
    return "–" if value is None else f"{float(value):.{digits}f}"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {(f"{k:g}" if isinstance(k, float) else str(k)): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ---------------------------------------------------------------------------------------------------
# the loss (eq. 1) as a BatchLoss of robust_loop.fit_with


class BaselineLoss:
    """The baseline job's loss as a :class:`~ctharden.hardening.objectives.BatchLoss`: shen eq. 1
    (``mse`` between the sigmoid output and the 0/1 label) or ``ce``, via
    :func:`~ctharden.training.losses.training_loss`.

    ``target``: ``(|S|,)`` float32 regression targets indexed by the dataset index ``idx`` (the
    1-5 rating for rating models, else the label); ``output``: the model's output kind.
    """

    def __init__(self, output: str, loss: str, target: Tensor) -> None:
        check_loss(loss, output)
        self.output, self.loss, self.name = output, loss, f"adaptive_{loss}"
        self.target = target.float()

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, float]]:
        if self.target.device != x.device:
            self.target = self.target.to(x.device)
        out = model(x)
        loss = training_loss(out, y, self.target[idx], self.output, self.loss)
        with torch.no_grad():
            acc = ((positive_score(out.detach(), self.output) > 0.5).long() == y).float().mean().item()
        return loss, {"accuracy": acc}


class _IndexedTensors(Dataset[Any]):
    """``i -> (x[i], y[i], i)``."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.x[i], self.y[i], i


# ---------------------------------------------------------------------------------------------------
# evaluation


def default_evaluator(
    data: ArraySet,
    settings: RobustnessSettings,
    *,
    seed: int,
    nps: NPSModel | None = None,
    device: torch.device | None = None,
) -> Evaluator:
    """The Tables 4-5 evaluation: :func:`~ctharden.evaluation.robustness.clean_metrics` (AUC etc.)
    and :func:`~ctharden.evaluation.robustness.run_nps_attacks` (random and optimised attacks on
    ``settings.splits``, with ``settings``' K, restarts and sample caps), the same ``seed`` at every
    step. Returns ``evaluate(model, step) -> {split: row}``; a row has ``n``, ``auc``, ``accuracy``,
    ``sensitivity``, ``specificity``, ``random`` / ``optimized`` (``{mAs: SAN/N %}``), ``n_random``,
    ``n_optimized`` (samples attacked), ``k_random``, ``restarts`` and ``optimized_sar_above``
    (``{mAs: SAR curve}``, the paper's Fig. 11)."""

    def evaluate(model: nn.Module, step: int) -> dict[str, dict[str, Any]]:
        clean = clean_metrics(model, data, device)
        rnd, opt = run_nps_attacks([model], data, settings, seed=seed, nps=nps, device=device)
        rows: dict[str, dict[str, Any]] = {}
        for split in settings.splits:
            if split not in rnd:
                continue
            c = clean.get(split, {})
            rows[split] = {
                "n": c.get("n"), "auc": c.get("auc"), "accuracy": c.get("accuracy"),
                "sensitivity": c.get("sensitivity"), "specificity": c.get("specificity"),
                "random": {lv["mas"]: lv["san_rate"] for lv in rnd[split]["levels"].values()},
                "optimized": {lv["mas"]: lv["san_rate"] for lv in opt[split]["levels"].values()},
                "n_random": rnd[split]["n"], "n_optimized": opt[split]["n"],
                "k_random": rnd[split]["k"], "restarts": opt[split]["k"],
                "optimized_sar_above": {lv["mas"]: lv["sar_above"] for lv in opt[split]["levels"].values()},
            }
        return rows

    return evaluate


# ---------------------------------------------------------------------------------------------------
# argument checks


def _int_arg(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"adaptive training: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _levels(mas_levels: Sequence[float] | None, settings: RobustnessSettings) -> list[float]:
    raw = settings.mas_levels if mas_levels is None else mas_levels
    if isinstance(raw, (str, bytes)) or not isinstance(raw, (list, tuple)) or len(raw) == 0:
        raise ConfigError(f"adaptive training: mas_levels must be a non-empty list of mAs, got {raw!r}")
    out = []
    for m in raw:
        ok = isinstance(m, (int, float, np.number)) and not isinstance(m, bool) and math.isfinite(float(m)) and m > 0
        if not ok:
            raise ConfigError(f"adaptive training: mAs levels must be positive numbers, got {m!r}")
        out.append(float(m))
    if len(set(out)) != len(out):
        raise ConfigError(f"adaptive training: mas_levels has duplicates: {list(raw)}")
    return out


def _check_data(data: Any, target: Tensor | None) -> Tensor:
    if not isinstance(data, ArraySet):
        raise ConfigError(f"adaptive training: data must be an ArraySet, got {type(data).__name__}")
    n = len(data)  # ArraySet checks its own lengths and shapes
    if len(data.indices("train")) == 0:
        raise DataError("adaptive training needs training samples: the data's train split is empty")
    if target is None:
        return data.y.float()
    t = torch.as_tensor(target).float()
    if t.shape != (n,):
        raise ConfigError(f"adaptive training: target must have shape ({n},), got {tuple(t.shape)}")
    return t


# ---------------------------------------------------------------------------------------------------
# one adaptive step's attack


def _attack_training_set(
    model: nn.Module,
    x_hu: Tensor,
    train_idx: np.ndarray,
    y: Tensor,
    target: Tensor,
    levels: list[float],
    settings: RobustnessSettings,
    *,
    step: int,
    restarts: int,
    only_correct: bool,
    seed: int,
    nps: NPSModel | None,
) -> tuple[AddedSamples, dict[float, int], dict[float, int], dict[float, float]]:
    """Algorithm 2, lines 2-3: attack the training samples ``x_hu`` ``(N_train, *spatial)`` at
    every mAs and collect the successfully attacked perturbed inputs (model-input units).

    Returns ``(P, flips per mAs as reported by the attack, added per mAs, SAN/N % per mAs)``.
    Each candidate's label is decided again here by an fp32 forward of the stored input (the
    input that will be trained on); it agrees with the attack's own decision up to exact ties.
    """
    o = settings.optimized
    inputs = _nps_inputs(model, settings)
    imap = InputMap(model, inputs["hu_per_unit"])
    dev = x_hu.device
    spatial = tuple(x_hu.shape[1:])
    n = x_hu.shape[0]
    found = AddedSamples.empty(spatial)
    flips: dict[float, int] = {}
    added: dict[float, int] = {}
    rates: dict[float, float] = {}
    y_train = y[torch.from_numpy(train_idx)]
    for li, mas in enumerate(levels):
        g = torch.Generator(device=dev).manual_seed(derive_seed(seed, _TAG_ATTACK, step, li))
        res = optimized_nps_attack(
            model, x_hu, mas, restarts=restarts, step_hu=step_hu(settings, mas, nps), tol=o.tol, n_iter=o.n_iter,
            nps=nps, generator=g, batch_size=o.batch_size, autocast=o.autocast, return_perturbations=True, **inputs,
        )
        lv = res[mas]
        flips[mas] = int(np.rint(lv.sar * restarts).sum())
        rates[mas] = lv.san_rate
        assert res.perturbations is not None
        pert = res.perturbations[float(mas)]  # (N, K, *spatial) HU, CPU
        clean_pred = torch.as_tensor(res.clean_pred, dtype=torch.int64)
        xs, preds, rows, ks = [], [], [], []
        with attack_mode(model), torch.no_grad():
            adapter = None
            bs = o.batch_size
            for start in range(0, n * restarts, bs):
                flat = torch.arange(start, min(start + bs, n * restarts))
                i, k = flat // restarts, flat % restarts
                xin = imap(x_hu[i.to(dev)], pert[i, k].to(device=dev, dtype=x_hu.dtype))
                with autocast_ctx(dev, False):  # the decision is an fp32 forward, as in the attack
                    raw = model(xin)
                adapter = adapter or infer_adapter(model, raw)
                pred = adapter.predict(adapter.canonical(raw).float()).cpu()
                keep = pred != clean_pred[i]
                if only_correct:
                    keep &= clean_pred[i] == y_train[i]
                if keep.any():
                    xs.append(xin[keep.to(dev)].float().cpu())
                    preds.append(pred[keep])
                    rows.append(i[keep])
                    ks.append(k[keep])
        if not rows:
            added[mas] = 0
            continue
        rows_t, ks_t = torch.cat(rows), torch.cat(ks)
        src = train_idx[rows_t.numpy()]
        src_t = torch.from_numpy(src)
        m = len(src)
        added[mas] = m
        found = found.extend(AddedSamples(
            x=torch.cat(xs), y=y[src_t].clone(), target=target[src_t].clone(), source=src.astype(np.int64),
            step=np.full(m, step, dtype=np.int64), mas=np.full(m, mas), restart=ks_t.numpy().astype(np.int64),
            clean_pred=clean_pred[rows_t].numpy().astype(np.int64),
            perturbed_pred=torch.cat(preds).numpy().astype(np.int64),
        ))
        if not only_correct and m != flips[mas]:
            log.warning("step %d, %g mAs: the attack reported %d successful chains, the fp32 re-check %d "
                        "(ties at the decision boundary)", step, mas, flips[mas], m)
    return found, flips, added, rates


# ---------------------------------------------------------------------------------------------------
# Algorithm 2


def adaptive_train(
    model: nn.Module,
    data: ArraySet,
    settings: RobustnessSettings,
    *,
    n_adapt: int = 2,
    epochs_per_step: int = 10,
    mas_levels: Sequence[float] | None = None,
    restarts: int = 1,
    loss: str = "mse",
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    only_correct: bool = False,
    target: Tensor | None = None,
    nps: NPSModel | None = None,
    device: torch.device | str | None = None,
    evaluate: Evaluator | None = None,
    on_step: Callable[[AdaptiveStep], None] | None = None,
) -> AdaptiveResult:
    """Shen 2020 Algorithm 2: attack the training set, add the successful perturbed samples to
    ``S``, fine-tune, repeat (see the module docstring for every decision).

    Args:
        model: the baseline classifier (trained with eq. 1); tuned **in place** and returned.
        data: an :class:`~ctharden.evaluation.robustness.ArraySet` (``raw`` in HU for HU-window
            models, ``x`` in model-input units, ``y`` ``(N,)`` labels, ``split`` "train"/"test").
            Only ``split == "train"`` samples are attacked for and enter ``S``.
        settings: robustness settings: the attack's δ (``optimized.step_sigma``), ε, N_iter, batch
            size and autocast, ``spacing_mm``, ``hu_per_unit``, and for the default evaluation
            also ``mas_levels``, ``random.k``, ``optimized.restarts`` and the sample caps.
        n_adapt: N_adapt, adaptive steps (>= 1; the paper's tables show 2).
        epochs_per_step: fine-tuning epochs per step (paper: 10).
        mas_levels: mAs levels attacked for ``P`` (default ``settings.mas_levels``).
        restarts: attack chains per training sample and mAs per step (paper: 1).
        loss: the baseline's loss, ``"mse"`` (eq. 1, nodule3d) or ``"ce"``.
        lr: Adam learning rate of the fine-tuning.
        batch_size: fine-tuning batch size (class-balanced sampling over ``S``).
        seed: seeds the attacks, the sampler and dropout; same seed -> same run (CPU).
        only_correct: add only flips of training samples whose clean prediction is correct.
        target: ``(N,)`` float regression targets aligned with ``data`` (needed for rating
            models: the 1-5 rating); default ``data.y``.
        nps: NPS model (default :func:`ctharden.noise.default_nps`).
        device: where to attack and train (default: where the model is).
        evaluate: ``evaluate(model, step) -> {split: row}`` (:data:`Evaluator`), called before the
            first step (step 0) and after every fine-tuning; default :func:`default_evaluator`
            with a seed derived from ``seed``. Pass ``lambda model, step: {}`` to skip evaluation.
        on_step: called with each :class:`AdaptiveStep` as soon as it is complete (step 0 too).

    Returns:
        :class:`AdaptiveResult` (``tables()`` renders Tables 4-5).

    Raises:
        ConfigError: bad arguments (``n_adapt`` / ``epochs_per_step`` / ``restarts`` /
            ``batch_size`` < 1, ``lr`` <= 0, unknown loss or one the model's output cannot train
            with, bad mAs levels, wrong ``target`` shape, ``data`` not an ArraySet).
        DataError: the data have no training samples or inconsistent arrays.
    """
    n_adapt = _int_arg("n_adapt", n_adapt, 1)
    epochs_per_step = _int_arg("epochs_per_step", epochs_per_step, 1)
    restarts = _int_arg("restarts", restarts, 1)
    batch_size = _int_arg("batch_size", batch_size, 1)
    seed = _int_arg("seed", seed, 0)
    if loss not in LOSSES:
        raise ConfigError(f"adaptive training: loss must be one of {LOSSES}, got {loss!r}")
    output = getattr(model, "output", "logit")
    check_loss(loss, output)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"adaptive training: lr must be a positive number, got {lr!r}")
    if not isinstance(only_correct, bool):
        raise ConfigError(f"adaptive training: only_correct must be true or false, got {only_correct!r}")
    if not isinstance(settings, RobustnessSettings):
        raise ConfigError(f"adaptive training: settings must be RobustnessSettings, got {type(settings).__name__}")
    levels = _levels(mas_levels, settings)
    all_target = _check_data(data, target)
    if output == "rating" and target is None:
        raise ConfigError("adaptive training of a rating model needs target= (the 1-5 ratings aligned with data)")
    if evaluate is not None and not callable(evaluate):
        raise ConfigError("adaptive training: evaluate must be callable or None")

    dev = resolve_device(model, device)
    model.to(dev)
    if evaluate is None:
        evaluate = default_evaluator(data, settings, seed=derive_seed(seed, _TAG_EVAL), nps=nps, device=dev)
    train_idx = data.indices("train").astype(np.int64)
    x_hu = data.raw[torch.from_numpy(train_idx)].to(dev)
    base_x = data.x[torch.from_numpy(train_idx)].float().cpu()
    base_y = data.y[torch.from_numpy(train_idx)].long().cpu()
    base_t = all_target[torch.from_numpy(train_idx)].cpu()
    added = AddedSamples.empty(tuple(base_x.shape[1:]))
    optimizer = torch.optim.Adam(model.parameters(), lr=float(lr))
    run_settings = {
        "n_adapt": n_adapt, "epochs_per_step": epochs_per_step, "mas_levels": levels, "restarts": restarts,
        "loss": loss, "lr": float(lr), "batch_size": batch_size, "seed": seed, "only_correct": only_correct,
        "optimizer": "Adam, carried across steps", "sampling": "class-balanced (balanced_sampler)",
        "augmentation": None,
        "attack": {"step_sigma": settings.optimized.step_sigma, "tol": settings.optimized.tol,
                   "n_iter": settings.optimized.n_iter, "autocast": settings.optimized.autocast,
                   "batch_size": settings.optimized.batch_size, "spacing_mm": settings.spacing_mm},
        "labels_of_added": "ground truth of the source sample",
        "success": "fp32 label(x+p) != label(x) (the clean prediction)",
        "n_train": len(train_idx), "n_test": len(data.indices("test")),
    }

    steps: list[AdaptiveStep] = []
    t0 = time.perf_counter()
    rec = AdaptiveStep(step=0, n_attacked=0, n_attempts=0, n_flips=0, n_added=0, n_total=len(train_idx))
    rec.evaluation = evaluate(model, 0)
    rec.seconds = {"evaluate": time.perf_counter() - t0, "total": time.perf_counter() - t0}
    steps.append(rec)
    if on_step is not None:
        on_step(rec)

    for step in range(1, n_adapt + 1):
        t_step = time.perf_counter()
        found, flips, per_mas, rates = _attack_training_set(
            model, x_hu, train_idx, data.y.long().cpu(), all_target.cpu(), levels, settings, step=step,
            restarts=restarts, only_correct=only_correct, seed=seed, nps=nps,
        )
        t_attack = time.perf_counter() - t_step
        rec = AdaptiveStep(
            step=step, n_attacked=len(train_idx), n_attempts=len(train_idx) * len(levels) * restarts,
            n_flips=sum(flips.values()), n_added=len(found), n_total=len(train_idx) + len(added),
            added_per_mas=per_mas, attack_san_rate=rates,
        )
        if len(found) == 0:  # P = ∅: Algorithm 2 ends the loop
            rec.stopped = True
            rec.seconds = {"attack": t_attack, "total": time.perf_counter() - t_step}
            steps.append(rec)
            log.info("adaptive step %d: no successful attack on the training set, stopping", step)
            if on_step is not None:
                on_step(rec)
            break
        added = added.extend(found)
        rec.n_total = len(train_idx) + len(added)
        s_x = torch.cat([base_x, added.x])
        s_y = torch.cat([base_y, added.y])
        s_t = torch.cat([base_t, added.target])
        loader = DataLoader(_IndexedTensors(s_x, s_y), batch_size=batch_size,
                            sampler=balanced_sampler(s_y, derive_seed(seed, _TAG_SAMPLER, step)), num_workers=0)
        torch.manual_seed(derive_seed(seed, _TAG_TORCH, step))
        t_train = time.perf_counter()
        rec.history = fit_with(model, loader, BaselineLoss(output, loss, s_t), epochs=epochs_per_step,
                               optimizer=optimizer, device=dev)
        t_eval = time.perf_counter()
        rec.evaluation = evaluate(model, step)
        t_end = time.perf_counter()
        rec.seconds = {"attack": t_attack, "train": t_eval - t_train, "evaluate": t_end - t_eval,
                       "total": t_end - t_step}
        steps.append(rec)
        log.info("adaptive step %d: %d/%d chains successful, %d added, |S| = %d", step, rec.n_flips,
                 rec.n_attempts, rec.n_added, rec.n_total)
        if on_step is not None:
            on_step(rec)

    model.eval()
    return AdaptiveResult(model=model, steps=steps, added=added, train_indices=train_idx, settings=run_settings)
