"""AutoAttack-style ensemble: per sample, the worst case over PGD, APGD-CE, APGD-margin and Square.

The reporting rule of AutoAttack (Croce & Hein 2020): the attacks run one after the other, each on
the samples that are still correctly classified (the clean errors and every sample an earlier
attack broke are left out), and a sample counts as broken when any attack breaks it. Units: ε in
*model-input units* (a float or one value per sample ``(N,)``); ``x`` is ``(N, ...)`` (2D
``(N, 1, H, W)``, 3D ``(N, 1, D, H, W)``), ``y`` ``(N,)``.

Members, always run in this order (``attacks`` picks a subset; its order does not matter):

=================  ==========================================================================
``pgd``            :func:`ctharden.attacks.pgd.pgd` with ``pgd_loss`` (default ``"margin"``; ``"both"``
                   adds a CE run from the same start)
``apgd-ce``        :func:`ctharden.attacks.apgd.apgd`, ``loss="ce"``
``apgd-margin``    :func:`ctharden.attacks.apgd.apgd`, ``loss="margin"`` (stands in for
                   AutoAttack's APGD-DLR, which needs three or more classes)
``square``         :func:`ctharden.attacks.square.square_attack_result` (black-box, margin)
=================  ==========================================================================

``steps`` and ``restarts`` apply to the gradient members, ``square_queries`` to Square; all
draw from the one ``generator``. Every member uses early stopping.

Gradient-masking check: Square runs last, on the survivors of the gradient attacks, so every
sample it breaks is one that no gradient attack broke: ``masking = broken_by["square"]``.
A model whose gradients are masked (quantised, binarised or saturated inputs) looks robust to
PGD/APGD but not to Square, and :attr:`EnsembleResult.masking_suspect` flags it. (Without a
gradient member or without Square, ``masking`` is all False.)

Verification: every returned ``x_adv`` must lie in the ε-ball (+ ``BUDGET_TOL·max(1, ε)``, as the
sanity checks) and the clip range — a violation is a bug and raises :class:`AttackError` — and
``broken`` is re-decided by a plain fp32 forward pass on exactly ``x_adv``. For a sample no attack
broke, ``x_adv`` is the candidate (clean input or a member's output) with the highest margin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ctharden.attacks.apgd import apgd
from ctharden.attacks.common import (
    NORMS,
    attack_mode,
    batch_mask,
    batch_slices,
    check_choice,
    check_clip,
    check_int,
    check_labels,
    check_x,
    per_sample,
    prepare_batch,
    repeat_over_eps,
)
from ctharden.attacks.losses import AttackError, margin_loss
from ctharden.attacks.pgd import pgd
from ctharden.attacks.sanity import BUDGET_TOL, make_check
from ctharden.attacks.square import square_attack_result
from ctharden.config.choices import ENSEMBLE_ATTACKS as ENSEMBLE_ATTACKS

DEFAULT_ATTACKS: tuple[str, ...] = ENSEMBLE_ATTACKS
GRADIENT_ATTACKS: tuple[str, ...] = ("pgd", "apgd-ce", "apgd-margin")
#: The sanity check this module adds to :data:`ctharden.attacks.sanity.CHECKS`.
MASKING_CHECK = "gradient_masking"


@dataclass
class EnsembleResult:
    """The outcome of :func:`attack_ensemble` on ``N`` samples.

    ``x_adv``: the per-sample worst case (shape and dtype of ``x``); ``broken`` bool ``(N,)``: the
    fp32 prediction on ``x_adv`` differs from ``y`` (clean errors included); ``clean_correct``
    bool ``(N,)``; per member (in run order) ``attacked[name]``: the samples it attacked (bool
    ``(N,)``) and ``broken_by[name]``: those it broke; ``masking`` bool ``(N,)``: samples Square
    broke after every gradient member had failed; ``queries``: Square's passes per sample (zeros
    without Square).
    """

    x_adv: Tensor
    broken: Tensor
    clean_correct: Tensor
    attacked: dict[str, Tensor]
    broken_by: dict[str, Tensor]
    masking: Tensor
    queries: Tensor
    norm: str
    eps: Tensor

    @property
    def n(self) -> int:
        return int(self.broken.shape[0])

    @property
    def robust_accuracy(self) -> float:
        return 1.0 - float(self.broken.float().mean())

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean_correct.float().mean())

    @property
    def masking_suspect(self) -> bool:
        """True when Square broke a sample that every gradient attack failed on."""
        return bool(self.masking.any())

    def select(self, sl: slice) -> EnsembleResult:
        """The result of the samples ``sl`` (e.g. one ε of :func:`ensemble_sweep`)."""
        return EnsembleResult(
            x_adv=self.x_adv[sl], broken=self.broken[sl], clean_correct=self.clean_correct[sl],
            attacked={k: v[sl] for k, v in self.attacked.items()},
            broken_by={k: v[sl] for k, v in self.broken_by.items()},
            masking=self.masking[sl], queries=self.queries[sl], norm=self.norm, eps=self.eps[sl],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary: accuracies, per-member counts, the masked sample indices."""
        eps = self.eps.tolist()
        same = len(set(eps)) == 1
        return {
            "n": self.n,
            "norm": self.norm,
            "eps": float(eps[0]) if same else [float(e) for e in eps],
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "attacks": list(self.broken_by),
            "per_attack": {
                name: {"attacked": int(self.attacked[name].sum()), "broken": int(self.broken_by[name].sum())}
                for name in self.broken_by
            },
            "masking_suspect": self.masking_suspect,
            "masked_samples": [int(i) for i in self.masking.nonzero().flatten().tolist()],
        }


def _members(attacks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(attacks, str) or not isinstance(attacks, Sequence) or len(attacks) == 0:
        raise AttackError(f"attacks must be a non-empty list drawn from {list(ENSEMBLE_ATTACKS)}, got {attacks!r}")
    for name in attacks:
        check_choice("attack", name, ENSEMBLE_ATTACKS)
    if len(set(attacks)) != len(attacks):
        raise AttackError(f"attacks lists a member twice: {list(attacks)}")
    return tuple(name for name in ENSEMBLE_ATTACKS if name in attacks)


def _decide(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    output: str | None,
    batch_size: int | None,
    clip: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Plain fp32 forward passes (inside :func:`attack_mode`): (broken, margin) per sample; with
    ``clip``, ``x`` is also checked against the clip range."""
    brokens, margins = [], []
    for sl in batch_slices(x.shape[0], batch_size):
        b = prepare_batch(model, x[sl], y[sl], 0.0, clip, output)
        brokens.append(b.adapter.predict(b.clean_z) != b.y)
        margins.append(torch.nan_to_num(margin_loss(b.clean_z, b.y, b.adapter.binary), nan=float("-inf")))
    return torch.cat(brokens), torch.cat(margins)


def _verify(x_adv: Tensor, x_ref: Tensor, eps: Tensor, norm: str, clip: tuple[float, float] | None,
            source: Tensor, names: tuple[str, ...]) -> None:
    """:class:`AttackError` unless every ``x_adv`` lies in its ε-ball (+ tolerance) and the clip range."""
    delta = (x_adv.double() - x_ref.double()).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    e = eps.double()
    over = size > e + BUDGET_TOL * e.clamp_min(1.0)
    if clip is not None:
        flat = x_adv.flatten(1)
        over = over | (flat < clip[0]).any(1) | (flat > clip[1]).any(1)
    if bool(over.any()):
        i = int(over.nonzero()[0])
        who = names[int(source[i])] if int(source[i]) >= 0 else "clean"
        raise AttackError(
            f"attack ensemble bug: sample {i} from {who!r} leaves the budget ({norm} size "
            f"{float(size[i]):.6g} > ε {float(e[i]):.6g}) or the clip range {clip}"
        )


def attack_ensemble(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    norm: str = "linf",
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    steps: int = 100,
    restarts: int = 1,
    square_queries: int = 1000,
    clip: tuple[float, float] | None = (0.0, 1.0),
    output: str | None = None,
    generator: torch.Generator | None = None,
    autocast: bool = False,
    batch_size: int | None = None,
    pgd_x_adv: Tensor | None = None,
    pgd_loss: str = "margin",
) -> EnsembleResult:
    """Run the ensemble (see the module doc) and return the per-sample worst case.

    Args:
        model: a classifier (binary logit, class logits or ``rating`` output).
        x: ``(N, ...)`` inputs in model-input units; ``y``: ``(N,)`` integer labels.
        eps: radius in model-input units, a float or a tensor ``(N,)``.
        norm: ``"linf"`` or ``"l2"``.
        attacks: members from ``("pgd", "apgd-ce", "apgd-margin", "square")`` (run in that order).
        steps, restarts: iterations and random starts of each gradient member (PGD, APGD).
        square_queries: Square's per-sample query budget.
        clip: valid input range or None; output: override the output kind.
        generator: random source shared by the members (default: torch's global RNG).
        autocast: bf16 autocast for the PGD member's ascent (verdicts stay fp32). The APGD members
            always ascend in fp32: on the hardened covid2d model bf16 gradients hid breaks that an
            fp32 APGD (ctharden's and torchattacks' alike) found (2 of 8 survivors at L2 ε 0.5), so
            the members after PGD check its bf16 ascent in full precision.
        batch_size: attack at most this many samples at once; None = all at once.
        pgd_x_adv: ``(N, ...)`` outputs of a PGD run with these settings made earlier (the
            evaluation's sanity sweep); the ``pgd`` member then takes them instead of attacking
            again. They are re-decided and budget-checked like every member's output.
        pgd_loss: the ``pgd`` member's loss (``margin``, ``ce`` or ``both``). For a binary
            classifier CE is a decreasing function of the margin, so from one start both runs take
            the same sign (L∞) or normalised (L2) steps; ``both`` only adds CE's saturation.
    """
    check_choice("norm", norm, NORMS)
    names = _members(attacks)
    check_int("steps", steps, 1)
    check_int("restarts", restarts, 1)
    check_int("square_queries", square_queries, 1)
    check_x(x)
    clip_range = check_clip(clip)
    n, device = x.shape[0], x.device
    labels = check_labels(y, n, device)
    eps_t = per_sample("eps", eps, n, device)
    if pgd_x_adv is not None and tuple(pgd_x_adv.shape) != tuple(x.shape):
        raise AttackError(f"pgd_x_adv has shape {tuple(pgd_x_adv.shape)}, x has {tuple(x.shape)}")
    x_ref = x.detach().clamp(*clip_range) if clip_range is not None else x.detach()
    attacked: dict[str, Tensor] = {}
    broken_by: dict[str, Tensor] = {}
    queries = torch.zeros(n, dtype=torch.long, device=device)
    with attack_mode(model):
        broken, score = _decide(model, x, labels, output, batch_size, clip_range)  # also validates x
        clean_correct = ~broken
        x_adv = x_ref.clone()
        source = torch.full((n,), -1, dtype=torch.long, device=device)
        common: dict[str, Any] = {"norm": norm, "clip": clip_range, "output": output, "generator": generator,
                                  "batch_size": batch_size}
        for j, name in enumerate(names):
            todo = ~broken
            attacked[name] = todo.clone()
            hit = torch.zeros(n, dtype=torch.bool, device=device)
            idx = todo.nonzero().squeeze(1)
            if idx.numel() > 0:
                xs, ys, es = x_ref[idx], labels[idx], eps_t[idx]
                if name == "pgd" and pgd_x_adv is not None:
                    xa = pgd_x_adv[idx].to(x_ref.dtype)
                elif name == "pgd":
                    xa, _ = pgd(model, xs, ys, es, steps=steps, restarts=restarts, loss=pgd_loss,
                                autocast=autocast, early_stop=True, **common)
                elif name in ("apgd-ce", "apgd-margin"):
                    xa, _ = apgd(model, xs, ys, es, steps=steps, restarts=restarts, loss=name[5:],
                                 autocast=False, early_stop=True, **common)
                else:
                    sq = square_attack_result(model, xs, ys, es, queries=square_queries, **common)
                    xa = sq.x_adv
                    queries[idx] = sq.queries
                br, m = _decide(model, xa, ys, output, batch_size)
                better = br | (m > score[idx])
                x_adv[idx] = torch.where(batch_mask(better, xa), xa, x_adv[idx])
                score[idx] = torch.where(better, m, score[idx])
                source[idx] = torch.where(better, j, source[idx])
                hit[idx] = br
                broken = broken | hit
            broken_by[name] = hit
        _verify(x_adv, x_ref, eps_t, norm, clip_range, source, names)
        final, _ = _decide(model, x_adv, labels, output, batch_size)  # on exactly the returned tensor
    broken_by = {name: hit & final for name, hit in broken_by.items()}
    has_gradient = any(name in GRADIENT_ATTACKS for name in names)
    masking = broken_by["square"] if "square" in names and has_gradient else torch.zeros_like(final)
    return EnsembleResult(
        x_adv=x_adv, broken=final, clean_correct=clean_correct, attacked=attacked, broken_by=broken_by,
        masking=masking.clone(), queries=queries, norm=norm, eps=eps_t,
    )


def ensemble_sweep(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_values: Sequence[float],
    *,
    pgd_x_adv: Mapping[float, Tensor] | None = None,
    **kwargs: Any,
) -> dict[float, EnsembleResult]:
    """:func:`attack_ensemble` at every ε in one batched call: ``x`` ``(N, ...)`` repeated once per
    ε with a per-sample ε (independent samples, so this equals one ensemble per ε up to the random
    draws). ``pgd_x_adv[ε]``: earlier PGD outputs ``(N, ...)`` at that ε (all ε or none).
    Returns ``{ε: EnsembleResult of the N samples}``; ``kwargs`` go to :func:`attack_ensemble`."""
    values = [float(e) for e in eps_values]
    if not values:
        return {}
    n = x.shape[0]
    xs, ys, eps = repeat_over_eps(x, y, values)
    prior = None
    if pgd_x_adv is not None:
        missing = [e for e in values if e not in pgd_x_adv]
        if missing:
            raise AttackError(f"pgd_x_adv has no PGD outputs at ε {missing}")
        prior = torch.cat([pgd_x_adv[e].to(x.device) for e in values])
    res = attack_ensemble(model, xs, ys, eps, pgd_x_adv=prior, **kwargs)
    return {e: res.select(slice(i * n, (i + 1) * n)) for i, e in enumerate(values)}


def check_gradient_masking(results: Mapping[float, EnsembleResult]) -> dict[str, Any]:
    """``gradient_masking``: the black-box member (Square) broke no sample that every gradient
    member failed on, at any ε. Fails too when the ensemble had no Square or no gradient member
    (then nothing checked for masking, and a masked model could pass unseen)."""
    eps = sorted(results)
    members = list(results[eps[0]].broken_by) if eps else []
    if "square" not in members or not any(a in GRADIENT_ATTACKS for a in members):
        return make_check(
            MASKING_CHECK, False, float("nan"),
            f"not checked: the attack ensemble {members} needs Square and a gradient attack to detect masking",
            eps=eps, masked=[], attacks=members,
        )
    masked = [int(results[e].masking.sum()) for e in eps]
    n = results[eps[0]].n
    worst = max(masked)
    return make_check(
        MASKING_CHECK, worst == 0, worst / n if n else 0.0,
        "no sample broken by Square survived every gradient attack" if worst == 0 else
        f"gradient masking suspected: Square broke {worst} of {n} samples that PGD and APGD did not "
        f"(at ε {eps[masked.index(worst)]:g}); the white-box numbers are not trustworthy",
        eps=eps, masked=masked, n=n, attacks=members,
    )
