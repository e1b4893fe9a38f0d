"""Sanity checks that make white-box robustness numbers trustworthy (or flag them).

A PGD robust accuracy is only an upper bound on the true robust accuracy: a model whose gradients
are zero, NaN or misleading (*gradient masking*: quantising or binarising inputs, saturated
softmax, non-differentiable fronts) looks robust to a gradient attack without being robust. These
checks follow the advice of Athalye et al. (2018), Carlini et al. (2019, "On evaluating adversarial
robustness") and the self-checks of AutoAttack (Croce & Hein 2020). :func:`run_sanity_checks` runs
them all on one batch and returns a :class:`SanityReport`; ``report.flags`` names the failed checks.

=========================  ===================================================================
check                      passes when
=========================  ===================================================================
``budget``                 every PGD/FGSM output lies in the ε-ball (attack norm, + 1e-6·max(1, ε):
                           fp32 rounding of an L2 norm at ε = 2 is a few 1e-7) and in the clip range
``monotone_eps``           robust accuracy does not increase with ε by more than ``tolerance``
                           (ε = 0, the listed ε and ``large_eps``, in order)
``large_eps_chance``       at ``large_eps`` robust accuracy ≤ ``min(chance, reachable) + tolerance``;
                           chance = the largest class share of ``y``; reachable = share of
                           samples for which *no* input of the batch classified differently from
                           their label lies within ``large_eps`` (swapping in such an input is a
                           valid adversarial example, so a working attack must do at least as
                           well). At the default ``large_eps`` (the whole input range) every
                           input is reachable, so an attack on any non-constant classifier must
                           reach 0 % (+ tolerance)
``pgd_vs_fgsm``            no sample is broken by FGSM but not by PGD, at any ε
``convergence``            doubling steps *and* restarts changes the success rate by at most
                           ``tolerance`` (at ``check_eps``)
``loss_increase``          along each PGD run at ``check_eps`` the last iterate's loss is not
                           below the start's on average (per loss), and the loss went up for at
                           least ``min_loss_up_share`` of the samples; the best-so-far curve is
                           reported (non-decreasing by construction)
``zero_gradient``          at most ``max_zero_grad_share`` of the samples have an all-zero or
                           non-finite input gradient of the margin loss at the clean input
                           (the margin's gradient does not saturate; CE's share is reported too)
``random_vs_gradient``     random noise of the same size (L∞: uniform in the ε-ball; L2: uniform
                           direction on the ε-sphere; ``n_random`` draws) breaks at most
                           ``tolerance`` of the samples that PGD does not break, at every ε
=========================  ===================================================================

``check_eps`` (default): the listed ε > 0 whose PGD robust accuracy is closest to half the clean
accuracy — where the attack has most room to be better or worse.

Cost: one PGD per listed ε plus ``large_eps``, one more at ``check_eps`` with 2× steps and 2×
restarts (4× the cost), FGSM and ``n_random`` forward passes per ε, one input gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ctharden.attacks.common import (
    ATTACK_LOSSES,
    NORMS,
    attack_mode,
    canonical_forward,
    check_choice,
    check_int,
    flat_norm,
    prepare_batch,
    project,
    random_in_ball,
    random_on_sphere,
    repeat_over_eps,
    use_bf16,
)
from ctharden.attacks.losses import AttackError, attack_loss
from ctharden.attacks.pgd import RunTrace, attack_batch, fgsm

CHECKS: tuple[str, ...] = (
    "budget",
    "monotone_eps",
    "large_eps_chance",
    "pgd_vs_fgsm",
    "convergence",
    "loss_increase",
    "zero_gradient",
    "random_vs_gradient",
)
BUDGET_TOL = 1e-6


@dataclass
class SanityReport:
    """The outcome of :func:`run_sanity_checks`.

    Attributes:
        checks: one dict per check: ``name``, ``passed`` (bool), ``value`` (the number the verdict
            rests on) and ``detail`` (a dict: ``message`` plus the supporting numbers).
        curve: ``{"eps": [...], "accuracy": [...]}`` of the PGD runs (ε = 0, then the listed ε and
            ``large_eps`` in increasing order).
        settings: the arguments the checks ran with.
        broken: per ε of the curve (ε > 0), bool ``(N,)``: which samples the PGD run broke (fp32
            decisions; per-sample outcomes for paired comparisons; not part of :meth:`to_dict`).
        x_adv: per ε of the curve (ε > 0), the PGD outputs ``(N, ...)`` (what the attack ensemble
            starts from; not part of :meth:`to_dict`).
    """

    checks: list[dict[str, Any]]
    curve: dict[str, list[float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    broken: dict[float, Tensor] = field(default_factory=dict)
    x_adv: dict[float, Tensor] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)

    @property
    def flags(self) -> list[str]:
        """Names of the failed checks."""
        return [c["name"] for c in self.checks if not c["passed"]]

    def check(self, name: str) -> dict[str, Any]:
        for c in self.checks:
            if c["name"] == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "passed": self.passed,
            "flags": self.flags,
            "checks": [dict(c) for c in self.checks],
            "curve": dict(self.curve),
            "settings": dict(self.settings),
        }

    def summary(self) -> str:
        """One line per check."""
        lines = [f"sanity checks: {'PASSED' if self.passed else 'FAILED: ' + ', '.join(self.flags)}"]
        for c in self.checks:
            mark = "ok" if c["passed"] else "FAIL"
            lines.append(f"  [{mark}] {c['name']}: {c['detail'].get('message', '')}")
        return "\n".join(lines)


def make_check(name: str, passed: bool, value: float, message: str, **data: Any) -> dict[str, Any]:
    """One check record: ``{name, passed, value, detail: {message, **data}}``."""
    detail = {"message": message, **data}
    return {"name": name, "passed": bool(passed), "value": float(value), "detail": detail}


def _r(v: float) -> float:
    return round(float(v), 6)


# ---------------------------------------------------------------------------------------------------


def _pgd_traced(
    model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, *, norm: str, steps: int, restarts: int,
    loss: str, clip: Any, bf16: bool, output: str | None, early_stop: bool = False,
) -> tuple[Tensor, Tensor, list[RunTrace]]:
    traces: list[RunTrace] = []
    with attack_mode(model):
        b = prepare_batch(model, x, y, eps, clip, output)
        xa, broken = attack_batch(
            model, b, norm=norm, steps=steps, step_size=None, restarts=restarts, loss=loss,
            bf16=bf16, generator=None, traces=traces, early_stop=early_stop,
        )
    return xa, broken, traces


def _pgd_sweep(
    model: nn.Module, x: Tensor, y: Tensor, eps_values: Sequence[float], **kwargs: Any
) -> dict[float, tuple[Tensor, Tensor, list[RunTrace]]]:
    """PGD at every ε in one batched attack: the batch is ``x`` repeated once per ε with a
    per-sample ε (every sample and ε is an independent chain, so this equals one attack per ε up to
    the random starts, and amortises the per-step overhead over ``len(eps) × N`` samples)."""
    n = x.shape[0]
    xs, ys, eps = repeat_over_eps(x, y, eps_values)
    xa, broken, traces = _pgd_traced(model, xs, ys, eps, **kwargs)
    out = {}
    for i, e in enumerate(eps_values):
        sl = slice(i * n, (i + 1) * n)
        out[e] = (xa[sl], broken[sl], [t.select(sl) for t in traces])
    return out


def _budget_excess(
    x_adv: Tensor, x: Tensor, eps: float, norm: str, clip: tuple[float, float] | None
) -> tuple[float, float]:
    """(max norm excess over ε, max distance outside the clip range) of a batch of outputs."""
    excess = float((flat_norm(x_adv.float() - x.float(), norm) - eps).max())
    outside = 0.0
    if clip is not None:
        f = x_adv.float()
        outside = float(torch.maximum(clip[0] - f, f - clip[1]).clamp_min(0).max())
    return excess, outside


def _input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: str, output: str | None) -> Tensor:
    with attack_mode(model):
        b = prepare_batch(model, x, y, 0.0, None, output)
        with torch.enable_grad():
            xg = b.x.detach().requires_grad_(True)
            z = canonical_forward(model, xg, b.adapter, False)
            (grad,) = torch.autograd.grad(attack_loss(loss, z, b.y, b.adapter.binary).sum(), xg)
    return grad


def _random_broken(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str, clip: Any, draws: int, output: str | None
) -> Tensor:
    """Samples broken by at least one of ``draws`` random perturbations of size ε."""
    with attack_mode(model):
        b = prepare_batch(model, x, y, eps, clip, output)
        broken = torch.zeros_like(b.y, dtype=torch.bool)
        with torch.no_grad():
            for _ in range(draws):
                if norm == "linf":
                    noise = random_in_ball(b.x, b.eps, "linf")
                else:
                    noise = random_on_sphere(b.x, b.eps)
                xa = project(b.x + noise, b.x, b.eps, norm, b.clip)
                z = canonical_forward(model, xa, b.adapter, False)
                broken |= b.adapter.predict(z) != b.y
    return broken


def _reachable_bound(
    x: Tensor, y: Tensor, pred: Tensor, eps: float, norm: str, clip: tuple[float, float] | None
) -> float:
    """Share of samples with no batch input classified differently from their label within ε."""
    n = x.shape[0]
    flat = x.detach().flatten(1).float()
    diameter = math.inf
    if clip is not None:
        span = clip[1] - clip[0]
        diameter = span if norm == "linf" else span * math.sqrt(flat.shape[1])
    wrong_for = pred[None, :] != y[:, None]  # (i, j): x_j is classified differently from y_i
    if eps >= diameter:
        reach = wrong_for
    else:
        p = math.inf if norm == "linf" else 2.0
        reach = torch.zeros(n, n, dtype=torch.bool, device=x.device)
        for i in range(0, n, 256):  # chunks of rows (memory), not a loop over samples
            reach[i : i + 256] = torch.cdist(flat[i : i + 256], flat, p=p) <= eps + 1e-6
        reach &= wrong_for
    return float((~reach.any(1)).float().mean())


def _default_large_eps(x: Tensor, norm: str, clip: tuple[float, float] | None) -> float:
    if clip is not None:
        span = clip[1] - clip[0]
    else:
        span = float(x.max() - x.min()) or 1.0
    return span if norm == "linf" else span * math.sqrt(x[0].numel())


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PGDSetup:
    """The PGD settings being vetted (what the evaluation attacks with)."""

    norm: str
    steps: int
    restarts: int
    loss: str
    clip: Any
    bf16: bool
    output: str | None
    early_stop: bool

    def kwargs(self, *, scale: int = 1) -> dict[str, Any]:
        """Keyword arguments of :func:`_pgd_traced`; ``scale`` multiplies steps and restarts."""
        return {"norm": self.norm, "steps": scale * self.steps, "restarts": scale * self.restarts,
                "loss": self.loss, "clip": self.clip, "bf16": self.bf16, "output": self.output,
                "early_stop": self.early_stop}


Runs = dict[float, tuple[Tensor, Tensor, list[RunTrace]]]  # ε -> (x_adv, broken (N,), traces)


def check_budget(x: Tensor, runs: Runs, fgsm_runs: Runs, attack_eps: Sequence[float], norm: str,
                 clip_range: tuple[float, float] | None) -> dict[str, Any]:
    """``budget``: every PGD and FGSM output ``(N, ...)`` lies in its ε-ball and the clip range."""
    excess, outside, within = 0.0, 0.0, True
    for e in attack_eps:
        for xa in (runs[e][0], fgsm_runs[e][0]):
            ex, out = _budget_excess(xa, x, e, norm, clip_range)
            excess, outside = max(excess, ex), max(outside, out)
            within = within and ex <= BUDGET_TOL * max(1.0, e)
    return make_check(
        "budget", within and outside == 0.0, max(excess, outside),
        f"largest norm excess over ε {excess:.3g}, largest distance outside the clip range {outside:.3g}",
        norm_excess=excess, clip_excess=outside,
    )


def check_monotone_eps(curve: dict[str, list[float]], tolerance: float) -> dict[str, Any]:
    """``monotone_eps``: robust accuracy does not rise with ε by more than ``tolerance``."""
    accs = curve["accuracy"]
    rise = max([0.0] + [accs[i + 1] - accs[i] for i in range(len(accs) - 1)])
    return make_check(
        "monotone_eps", rise <= tolerance, rise,
        f"largest rise of robust accuracy with ε: {rise:.3f} (tolerance {tolerance})",
        eps=curve["eps"], accuracy=[_r(a) for a in accs],
    )


def check_large_eps_chance(x: Tensor, y: Tensor, pred: Tensor, acc_big: float, big: float, norm: str,
                           clip_range: tuple[float, float] | None, tolerance: float) -> dict[str, Any]:
    """``large_eps_chance``: at ``big`` the robust accuracy ``acc_big`` is at most
    ``min(chance, reachable) + tolerance`` (``y``, ``pred``: ``(N,)`` labels and clean predictions)."""
    shares = torch.bincount(y, minlength=2).float() / len(y)
    chance = float(shares.max())
    reachable = _reachable_bound(x, y, pred, big, norm, clip_range)
    target = min(chance, reachable)
    return make_check(
        "large_eps_chance", acc_big <= target + tolerance, acc_big,
        f"robust accuracy {acc_big:.3f} at ε={big:.4g}; must be <= {target:.3f} + {tolerance} "
        f"(chance {chance:.3f}, not trivially breakable {reachable:.3f})",
        large_eps=big, chance=chance, reachable_bound=reachable,
    )


def check_pgd_vs_fgsm(runs: Runs, fgsm_runs: Runs, attack_eps: Sequence[float]) -> dict[str, Any]:
    """``pgd_vs_fgsm``: no sample is broken by FGSM but not by PGD, at any ε."""
    fgsm_only = {e: int((fgsm_runs[e][1] & ~runs[e][1]).sum()) for e in attack_eps}
    worst = max(fgsm_only.values())
    return make_check(
        "pgd_vs_fgsm", worst == 0, worst,
        f"samples broken by FGSM but not by PGD: {worst} at worst "
        f"(FGSM success {[_r(float(fgsm_runs[e][1].float().mean())) for e in attack_eps]})",
        fgsm_only=[fgsm_only[e] for e in attack_eps], eps=attack_eps,
    )


def check_convergence(model: nn.Module, x: Tensor, y: Tensor, eps: float, base_success: float, setup: PGDSetup,
                      tolerance: float) -> dict[str, Any]:
    """``convergence``: PGD with 2× steps and 2× restarts at ``eps`` changes the success rate
    ``base_success`` by at most ``tolerance``."""
    _, broken2, _ = _pgd_traced(model, x, y, eps, **setup.kwargs(scale=2))
    success2 = float(broken2.float().mean())
    change = abs(success2 - base_success)
    return make_check(
        "convergence", change <= tolerance, change,
        f"success {base_success:.3f} with {setup.steps} steps x {setup.restarts} restarts, {success2:.3f} with "
        f"{2 * setup.steps} x {2 * setup.restarts} at ε={eps:.4g}",
        eps=eps, success=base_success, success_doubled=success2,
    )


def check_loss_increase(traces: list[RunTrace], eps: float, steps: int, min_loss_up_share: float) -> dict[str, Any]:
    """``loss_increase``: along the PGD runs at ``eps`` the loss rose for at least
    ``min_loss_up_share`` of the attacked samples and did not fall on average (per loss)."""
    # samples a run never attacked (early stop: already broken) have NaN losses and do not count
    seen = torch.cat([torch.isfinite(t.loss_first) for t in traces])
    up = torch.cat([(t.loss_last > t.loss_first) for t in traces])[seen].float()
    up_share = float(up.mean()) if up.numel() else 1.0
    gains: dict[str, float] = {}
    for name in {t.loss for t in traces}:
        diff = torch.cat([(t.loss_last - t.loss_first)[torch.isfinite(t.loss_first)] for t in traces if t.loss == name])
        gains[name] = float(torch.nan_to_num(diff, nan=0.0, posinf=0.0, neginf=0.0).mean()) if diff.numel() else 0.0
    stride = max(1, steps // 10)
    curves = {
        name: [_r(v) for v in next(t for t in traces if t.loss == name).best_curve[::stride]]
        for name in gains
    }
    return make_check(
        "loss_increase", up_share >= min_loss_up_share and all(g >= 0 for g in gains.values()), up_share,
        f"loss rose along PGD for {up_share:.1%} of samples (need {min_loss_up_share:.0%}); "
        f"mean gain {', '.join(f'{k} {v:.3g}' for k, v in sorted(gains.items()))} at ε={eps:.4g}",
        eps=eps, mean_gain=gains, best_so_far_curve=curves,
    )


def check_zero_gradient(model: nn.Module, x: Tensor, y: Tensor, output: str | None,
                        max_zero_grad_share: float) -> dict[str, Any]:
    """``zero_gradient``: at most ``max_zero_grad_share`` of the samples have an all-zero or
    non-finite input gradient of the margin loss at the clean input (CE's share is reported)."""
    zero_share: dict[str, float] = {}
    for name in ("margin", "ce"):
        g = _input_gradient(model, x, y, name, output).flatten(1)
        bad = (g == 0).all(1) | (~torch.isfinite(g)).any(1)
        zero_share[name] = float(bad.float().mean())
    return make_check(
        "zero_gradient", zero_share["margin"] <= max_zero_grad_share, zero_share["margin"],
        f"{zero_share['margin']:.1%} of samples have an all-zero or non-finite input gradient "
        f"(margin loss; CE: {zero_share['ce']:.1%}); limit {max_zero_grad_share:.0%}",
        share_margin=zero_share["margin"], share_ce=zero_share["ce"],
    )


def check_random_vs_gradient(model: nn.Module, x: Tensor, y: Tensor, runs: Runs, acc: dict[float, float],
                             attack_eps: Sequence[float], setup: PGDSetup, n_random: int,
                             tolerance: float) -> dict[str, Any]:
    """``random_vs_gradient``: random noise of the same size (``n_random`` draws per ε) breaks at
    most ``tolerance`` of the samples that PGD does not break, at every ε."""
    random_only, random_rate = [], []
    for e in attack_eps:
        rb = _random_broken(model, x, y, e, setup.norm, setup.clip, n_random, setup.output)
        random_only.append(float((rb & ~runs[e][1]).float().mean()))
        random_rate.append(float(rb.float().mean()))
    worst_random = max(random_only)
    return make_check(
        "random_vs_gradient", worst_random <= tolerance, worst_random,
        f"share of samples broken by random noise ({n_random} draws) but not by PGD: {worst_random:.3f} "
        f"at worst (tolerance {tolerance})",
        eps=attack_eps, random_only=[_r(v) for v in random_only], random_success=[_r(v) for v in random_rate],
        pgd_success=[_r(1 - acc[e]) for e in attack_eps],
    )


def run_sanity_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_list: Sequence[float],
    *,
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 1,
    clip: tuple[float, float] | None = (0.0, 1.0),
    tolerance: float = 0.05,
    large_eps: float | None = None,
    loss: str = "both",
    n_random: int = 10,
    max_zero_grad_share: float = 0.1,
    min_loss_up_share: float = 0.5,
    check_eps: float | None = None,
    autocast: bool = False,
    output: str | None = None,
    early_stop: bool = False,
) -> SanityReport:
    """Run the eight checks of the module docstring on one batch (one function each, in the order
    of :data:`CHECKS`); see :class:`SanityReport`.

    Args:
        model, x, y: as for :func:`~ctharden.attacks.pgd` (x in model-input units).
        eps_list: the ε values of the evaluation (model-input units).
        norm, steps, restarts, clip, loss, autocast, output: the PGD settings being vetted
            (``loss="both"`` = CE and margin runs, as in the evaluation).
        tolerance: allowed slack in shares of samples (monotonicity, chance level, convergence,
            random noise).
        large_eps: ε at which the attack must reach chance level; default the whole input range
            (L∞: ``hi - lo``; L2: ``(hi - lo)·sqrt(d)``, d = values per sample).
        n_random: random perturbations per ε for ``random_vs_gradient``.
        max_zero_grad_share: largest tolerated share of samples with a zero or non-finite gradient.
        min_loss_up_share: smallest share of (sample, run) pairs whose loss must rise along PGD.
        check_eps: ε for ``convergence`` and ``loss_increase`` (default: see the module docstring).
        early_stop: the PGD runs drop a sample once it is broken (as the evaluation runs them;
            same ``broken``). ``loss_increase`` then counts each run's attacked samples only.
    """
    check_choice("norm", norm, NORMS)
    check_choice("loss", loss, ATTACK_LOSSES)
    check_int("steps", steps, 1)
    check_int("restarts", restarts, 1)
    check_int("n_random", n_random, 1)
    try:
        given = [float(e) for e in eps_list]
    except (TypeError, ValueError):
        raise AttackError(f"eps_list must be a list of numbers, got {eps_list!r}") from None
    if any(not math.isfinite(e) or e < 0 for e in given):
        raise AttackError(f"eps_list must hold finite values >= 0, got {list(eps_list)}")
    eps_values = sorted({e for e in given if e > 0})  # ε = 0 is the clean accuracy, always included
    clip_range = None if clip is None else (float(clip[0]), float(clip[1]))
    big = float(large_eps) if large_eps is not None else _default_large_eps(x, norm, clip_range)
    if not big > 0:
        raise AttackError(f"large_eps must be > 0, got {large_eps!r}")
    setup = PGDSetup(norm, steps, restarts, loss, clip, use_bf16(model, x, autocast), output, early_stop)

    with attack_mode(model):
        b0 = prepare_batch(model, x, y, 0.0, None, output)
        pred, ylong = b0.adapter.predict(b0.clean_z), b0.y
    clean_acc = 1.0 - float((pred != ylong).float().mean())

    # The attacks the checks share, in this order (it fixes the random draws): PGD at every ε and
    # at the large ε, FGSM there, then PGD at check_eps if it is not among them.
    attack_eps = sorted(set(eps_values) | {big})
    runs = _pgd_sweep(model, x, y, attack_eps, **setup.kwargs())
    acc = {e: 1.0 - float(runs[e][1].float().mean()) for e in attack_eps}
    curve = {"eps": [0.0, *attack_eps], "accuracy": [clean_acc, *(acc[e] for e in attack_eps)]}
    fgsm_runs: Runs = {e: fgsm(model, x, y, e, norm=norm, loss=loss, clip=clip, output=output) + ([],)
                       for e in attack_eps}
    if check_eps is not None:
        ce_eps = float(check_eps)
        if ce_eps not in runs:
            runs[ce_eps] = _pgd_traced(model, x, y, ce_eps, **setup.kwargs())
    elif eps_values:
        ce_eps = min(eps_values, key=lambda e: (abs(acc[e] - clean_acc / 2), e))
    else:
        ce_eps = big
    base_success = float(runs[ce_eps][1].float().mean())

    checks = [
        check_budget(x, runs, fgsm_runs, attack_eps, norm, clip_range),
        check_monotone_eps(curve, tolerance),
        check_large_eps_chance(x, ylong, pred, acc[big], big, norm, clip_range, tolerance),
        check_pgd_vs_fgsm(runs, fgsm_runs, attack_eps),
        check_convergence(model, x, y, ce_eps, base_success, setup, tolerance),
        check_loss_increase(runs[ce_eps][2], ce_eps, steps, min_loss_up_share),
        check_zero_gradient(model, x, y, output, max_zero_grad_share),
        check_random_vs_gradient(model, x, y, runs, acc, attack_eps, setup, n_random, tolerance),
    ]
    settings = {
        "norm": norm, "steps": steps, "restarts": restarts, "loss": loss,
        "clip": list(clip_range) if clip_range else None,
        "tolerance": tolerance, "large_eps": big, "check_eps": ce_eps, "n_random": n_random,
        "n": int(x.shape[0]), "autocast": setup.bf16, "early_stop": bool(early_stop),
    }
    broken = {e: runs[e][1].detach().cpu() for e in attack_eps}
    x_adv = {e: runs[e][0].detach() for e in eps_values}
    return SanityReport(checks=checks, curve=curve, settings=settings, broken=broken, x_adv=x_adv)


def pgd_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, eps_values: Sequence[float], *, norm: str = "linf", steps: int = 100,
    restarts: int = 1, loss: str = "margin", autocast: bool = True, clip: Any = (0.0, 1.0),
) -> list[float]:
    """Robust accuracy of ``steps``-PGD at every ε (one batched, early-stopping attack; fp32 verdicts).

    ``x`` ``(N, ...)`` model-input units, ``y`` ``(N,)``; ε in model-input units. ε = 0 gives the
    clean accuracy. For comparisons (hardening methods, Optuna trials); the evaluation proper runs
    :func:`run_sanity_checks`, whose curve is the same sweep plus the self-checks.
    """
    with attack_mode(model):
        bf16 = use_bf16(model, x, autocast)
    sweep = _pgd_sweep(model, x, y, [float(e) for e in eps_values], norm=norm, steps=steps, restarts=restarts,
                       loss=loss, clip=clip, bf16=bf16, output=None, early_stop=True)
    return [1.0 - float(sweep[float(e)][1].float().mean()) for e in eps_values]
