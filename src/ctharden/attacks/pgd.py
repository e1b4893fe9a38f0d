"""White-box PGD (L∞ / L2, CE / margin loss), FGSM and the robust-accuracy curve.

The attack of ma et al. (2020), section 3: "100-PGD", run twice, once with the cross-entropy loss and
once with the margin loss, a sample counting as broken when either run breaks it
(``loss="both"``). Units: every ε and step size is in *model-input units* (``[0, 1]`` for ctharden
models; see :mod:`ctharden.models.wrapper` for the HU equivalent, ``CTClassifier.eps_to_hu``).

Conventions (``docs/ARCHITECTURE.md``)
--------------------------------------
- The model runs in **eval mode** with **parameters frozen** (``requires_grad=False``) for the whole
  attack; the caller's per-module train/eval flags and per-parameter ``requires_grad`` are restored
  afterwards, also when the attack raises. BatchNorm statistics therefore never move.
- The gradient is taken **only with respect to the perturbation**: the iterate ``x + δ`` is the only
  tensor that requires grad (``torch.autograd.grad``; no ``.grad`` is written anywhere), and the
  update, the projection and the worst-case bookkeeping run under ``torch.no_grad()``.
- **Fully batched**: no Python loop over samples (loops over steps, restarts and optional chunks
  of ``batch_size`` samples only). ε may be a float or a per-sample tensor ``(N,)``. Inputs may have
  any rank ``(N, ...)`` — 2D ``(N, 1, H, W)``, 3D ``(N, D, H, W)``, ...
- Every step projects onto the ε-ball around ``x`` (L∞: clamp to ``[-ε, ε]``; L2: rescale to norm
  ``≤ ε``), then onto the clip range (default ``[0, 1]``; ``clip=None`` disables it). L2 norms and the
  L2 gradient normalisation are per sample over all non-batch dimensions.
- ``broken`` is always decided by a **plain forward pass** of the model in its own parameter dtype
  (fp32 for ctharden models) with autocast disabled, on exactly the returned ``x_adv``, even when
  the attack itself ran under bf16 autocast (``autocast=True``) or the caller is inside an autocast
  region.

Algorithm (per restart, per loss)
---------------------------------
1. Random start inside the ball. One draw per restart, shared by the CE and the margin run of
   ``loss="both"``: with the same seed "both" is exactly the per-sample union of the "ce" and the
   "margin" attacks, and restart 1 of a multi-restart attack is the 1-restart attack.
   L∞: uniform in ``[-ε, ε]`` per element; L2: a uniformly random direction times a radius
   ``ε·U`` with ``U ~ Uniform(0, 1)``; then projected onto the clip range.
   (Not uniform in the ball's volume: in high dimension that would put every start on the sphere
   in a direction nearly orthogonal to the gradient, and fixed-step PGD then needs many steps to
   turn towards the optimum; starts at smaller radii leave room to move straight up the gradient.)
2. ``steps`` iterations of ``δ ← Π(δ + α·sign(∇))`` (L∞) or ``δ ← Π(δ + α·∇/‖∇‖₂)`` (L2). Non-finite
   gradient entries count as zero (the sanity checks report such samples).
3. Worst case per sample over all ``steps + 1`` iterates: a misclassified iterate beats a correctly
   classified one, then the higher loss wins.

Across restarts (and, for ``loss="both"``, across the CE and margin runs) the per-sample worst case
is re-decided from fp32 forward passes: broken first, then the higher loss (the run's own loss; the
margin when comparing CE with margin runs — for a binary logit ``BCE = softplus(margin)``, so the
order is the same). The clean input itself is also a candidate, so a sample the model already
misclassifies is always reported broken (robust accuracy ≤ clean accuracy).

Step size
---------
``step_size=None`` uses, per sample,

- L∞: ``α = 2.5·ε / steps`` — the rule of Madry et al. (2018) and the ``robustness`` library: each
  coordinate can travel 2.5 ε, enough to cross the ball from any random start and still have
  steps left to settle. For 100-PGD that is ε/40.
- L2: ``α = 5·ε / steps`` (ε/20 for 100-PGD). Once an L2 iterate reaches the sphere, a fixed step
  turns it towards the gradient direction only slowly: the angle's tangent shrinks by about
  ``1/(1 + α/ε)`` per step, so with 2.5 ε/steps 100 steps leave ~8 % of the initial angle
  (e^-2.5). On the small CNNs of the tests that made 100-step L2 PGD miss samples that one FGSM
  step breaks; with 5 ε/steps (e^-5 < 1 %) it missed none and broke more samples overall
  (10 ε/steps was no better).

A float or a per-sample tensor ``(N,)`` gives an absolute step in model-input units.

Outputs supported
-----------------
Binary logit ``(N,)`` / ``(N, 1)``, class logits ``(N, C)`` (C ≥ 2) and ``CTClassifier`` ``rating``
models through ``logit = rating - 3`` (see :mod:`ctharden.attacks.losses`). The kind comes from
``output=``, else ``model.output``, else the output shape.
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
    AttackBatch,
    ascent_direction,
    attack_mode,
    batch_mask,
    batch_slices,
    batch_view,
    canonical_forward,
    check_choice,
    check_int,
    check_x,
    default_step_size,
    fp32_verdict,
    per_sample,
    prepare_batch,
    project,
    random_in_ball,
    slice_arg,
    use_bf16,
)
from ctharden.attacks.losses import AttackError, attack_loss

# ---------------------------------------------------------------------------------------------------
# the attack


@dataclass
class RunTrace:
    """What one PGD run (one loss, one restart) did: for the sanity checks.

    ``loss_first``/``loss_last``: per-sample loss at the start and at the last iterate (NaN for
    samples the run never attacked); ``best_steps``: the per-sample best-so-far loss after each of
    the ``steps + 1`` iterates (``(N,)`` each); ``best_curve``: its mean over attacked samples.
    """

    loss: str
    loss_first: Tensor
    loss_last: Tensor
    best_steps: list[Tensor] = field(default_factory=list)

    @property
    def best_curve(self) -> list[float]:
        seen = torch.isfinite(self.loss_first)
        if not bool(seen.any()):
            return []
        return [float(b[seen].clamp_min(-1e30).mean()) for b in self.best_steps]

    def select(self, sl: slice) -> RunTrace:
        """The trace of a block of samples."""
        return RunTrace(self.loss, self.loss_first[sl], self.loss_last[sl], [b[sl] for b in self.best_steps])


def _run(
    model: nn.Module,
    b: AttackBatch,
    *,
    norm: str,
    loss: str,
    steps: int,
    alpha: Tensor,
    bf16: bool,
    start: Tensor,
    trace: RunTrace | None = None,
    active: Tensor | None = None,
    early_stop: bool = False,
) -> Tensor:
    """One PGD run from the iterate ``start``; returns the per-sample worst iterate (tracked with the
    run's own forward passes).

    ``active`` (bool ``(N,)``): samples to attack; the others return ``start`` untouched. With
    ``early_stop`` a sample leaves the batch at the first iterate that breaks it (under bf16: once a
    plain fp32 pass confirms it), and that iterate is its worst case: whether it is broken cannot
    change afterwards, and the remaining steps' passes are saved. A trace holds NaN for samples
    never attacked.
    """
    x, y, binary = b.x, b.y, b.adapter.binary
    n = x.shape[0]
    xa = start.clone()
    best = start.clone()
    best_broken = torch.zeros_like(y, dtype=torch.bool)
    best_loss = torch.full(y.shape, float("-inf"), device=x.device)
    cur_loss = torch.full(y.shape, float("nan"), device=x.device)
    idx = torch.arange(n, device=x.device) if active is None else active.nonzero().squeeze(1)
    if trace is not None:
        trace.loss_first = torch.full(y.shape, float("nan"), device=x.device)
    for t in range(steps + 1):
        if idx.numel() == 0:
            break
        last = t == steps
        xs, ys, xs0 = xa[idx], y[idx], x[idx]
        if last:
            with torch.no_grad():
                z = canonical_forward(model, xs, b.adapter, bf16)
                value = attack_loss(loss, z, ys, binary)
        else:
            with torch.enable_grad():
                xg = xs.detach().requires_grad_(True)
                z = canonical_forward(model, xg, b.adapter, bf16)
                value = attack_loss(loss, z, ys, binary)
                (grad,) = torch.autograd.grad(value.sum(), xg)
        with torch.no_grad():
            lv = torch.nan_to_num(value.detach(), nan=float("-inf"))
            broken = b.adapter.predict(z.detach()) != ys
            bb, bl = best_broken[idx], best_loss[idx]
            better = (broken & ~bb) | ((broken == bb) & (lv > bl))
            best[idx] = torch.where(batch_mask(better, xs), xs, best[idx])
            best_broken[idx] = bb | broken
            best_loss[idx] = torch.where(better, lv, bl)
            cur_loss[idx] = lv
            if trace is not None:
                if t == 0:
                    trace.loss_first[idx] = lv
                trace.best_steps.append(best_loss.clone())
            if not last:
                xa[idx] = project(
                    xs + batch_view(alpha[idx], xs) * ascent_direction(grad, norm), xs0, b.eps[idx], norm, b.clip
                )
            if early_stop:
                drop = best_broken[idx]
                if bf16 and bool(drop.any()):  # leave only when the fp32 decision agrees
                    cand = idx[drop]
                    zf = canonical_forward(model, best[cand], b.adapter, False)
                    drop[drop.clone()] = b.adapter.predict(zf) != y[cand]
                idx = idx[~drop]
    if trace is not None:
        trace.loss_last = cur_loss.clone()
    return best


def _merge(
    cur: tuple[Tensor, Tensor, Tensor] | None, new: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample worst case of two (x_adv, broken, score) candidates: broken first, then score."""
    if cur is None:
        return new
    xc, bc, sc = cur
    xn, bn, sn = new
    better = (bn & ~bc) | ((bn == bc) & (sn > sc))
    return (
        torch.where(batch_mask(better, xc), xn, xc),
        bc | bn,
        torch.where(better, sn, sc),
    )


def attack_batch(
    model: nn.Module,
    b: AttackBatch,
    *,
    norm: str,
    steps: int,
    step_size: float | Tensor | None,
    restarts: int,
    loss: str,
    bf16: bool,
    generator: torch.Generator | None,
    traces: list[RunTrace] | None = None,
    early_stop: bool = False,
) -> tuple[Tensor, Tensor]:
    """PGD on a prepared batch (inside :func:`attack_mode`): (x_adv working dtype, broken).

    ``early_stop``: a sample already broken (clean, or by an earlier run) is not attacked again,
    and a run drops a sample at its first breaking iterate (see :func:`_run`)."""
    n = b.x.shape[0]
    alpha = (
        default_step_size(b.eps, steps, norm)
        if step_size is None
        else per_sample("step_size", step_size, n, b.x.device)
    )
    losses = ("ce", "margin") if loss == "both" else (loss,)
    key = "margin" if loss == "both" else loss
    # the clean input is a candidate too (a misclassified sample is broken at any ε)
    best = (b.x, *_score(b, b.clean_z, key))
    for _ in range(restarts):
        # one random start per restart, shared by the losses: with the same seed, "both" is
        # exactly the per-sample worst case of the "ce" and the "margin" attacks
        with torch.no_grad():
            start = project(b.x + random_in_ball(b.x, b.eps, norm, generator), b.x, b.eps, norm, b.clip)
        for name in losses:
            trace = None
            if traces is not None:
                trace = RunTrace(name, torch.empty(0), torch.empty(0))
                traces.append(trace)
            xa = _run(
                model, b, norm=norm, loss=name, steps=steps, alpha=alpha, bf16=bf16, start=start, trace=trace,
                active=~best[1] if early_stop else None, early_stop=early_stop,
            )
            best = _merge(best, (xa, *fp32_verdict(model, xa, b, key)))
    x_adv = best[0]
    broken, _ = fp32_verdict(model, x_adv, b, key)  # decided on exactly the returned tensor
    return x_adv, broken


def _score(b: AttackBatch, z: Tensor, key: str) -> tuple[Tensor, Tensor]:
    broken = b.adapter.predict(z) != b.y
    return broken, torch.nan_to_num(attack_loss(key, z, b.y, b.adapter.binary), nan=float("-inf"))






def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    norm: str = "linf",
    steps: int = 100,
    step_size: float | Tensor | None = None,
    restarts: int = 1,
    loss: str = "ce",
    clip: tuple[float, float] | None = (0.0, 1.0),
    autocast: bool = False,
    output: str | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    early_stop: bool = False,
) -> tuple[Tensor, Tensor]:
    """Projected gradient descent (ascent on the loss) within an L∞ or L2 ball; worst case kept.

    Args:
        model: a classifier whose output is a binary logit ``(N,)``/``(N, 1)``, class logits
            ``(N, C)``, or a ``CTClassifier`` rating (``logit = rating - 3``).
        x: ``(N, ...)`` inputs in model-input units (any rank; ``[0, 1]`` for ctharden models).
        y: ``(N,)`` integer labels (0/1 for binary models).
        eps: radius in model-input units: a float, or a tensor ``(N,)`` (one budget per sample).
        norm: ``"linf"`` or ``"l2"`` (L2 over all non-batch dims of a sample).
        steps: iterations per run (100 = the papers' 100-PGD).
        step_size: None -> ``2.5·ε/steps`` (L∞) or ``5·ε/steps`` (L2) per sample; else absolute
            (float or ``(N,)``, model-input units).
        restarts: random starts per loss (>= 1); the worst case over all of them is kept.
        loss: ``"ce"``, ``"margin"`` or ``"both"`` (a CE run and a margin run, each with its
            restarts; a sample is broken if either breaks it — what the evaluation uses).
        clip: ``(lo, hi)`` valid input range (x must lie in it), or None for no clipping.
        autocast: run the attack's forward/backward passes under bf16 autocast (fp32 models on
            CPU/CUDA only; about 1.3-5× faster on CPUs with AVX-512 BF16, see
            ``benchmarks/attacks.py``). ``broken`` still comes from an fp32 pass.
        output: override the output kind (``logit`` | ``logits2`` | ``rating`` | ``logits``).
        generator: random source for the starts (default: torch's global RNG, so
            ``torch.manual_seed`` makes the attack reproducible).
        batch_size: attack at most this many samples at once (memory); None = all at once.
        early_stop: stop attacking a sample once an iterate breaks it (and skip samples the
            model already misclassifies). ``broken`` is exactly the same as without it; ``x_adv``
            of a broken sample is then its first breaking iterate rather than the highest-loss one.
            What an evaluation wants (it only counts broken samples, and an undefended model costs a
            fraction of the passes); adversarial *training* wants the loss maximiser (False).

    Returns:
        ``(x_adv, broken)``: ``x_adv`` with the shape and dtype of ``x``; ``broken`` a bool ``(N,)``,
        True where the model's fp32 prediction on ``x_adv`` differs from ``y``.
    """
    check_choice("norm", norm, NORMS)
    check_choice("loss", loss, ATTACK_LOSSES)
    check_int("steps", steps, 1)
    check_int("restarts", restarts, 1)
    check_x(x)
    n = x.shape[0]
    y = torch.as_tensor(y, device=x.device)
    advs, brokens = [], []
    with attack_mode(model):
        bf16 = use_bf16(model, x, autocast)
        for sl in batch_slices(n, batch_size):
            b = prepare_batch(model, x[sl], slice_arg(y, sl, n), slice_arg(eps, sl, n), clip, output)
            xa, broken = attack_batch(
                model, b, norm=norm, steps=steps, step_size=slice_arg(step_size, sl, n),
                restarts=restarts, loss=loss, bf16=bf16, generator=generator, early_stop=early_stop,
            )
            advs.append(xa)
            brokens.append(broken)
    x_adv = torch.cat(advs).to(x.dtype)
    broken = torch.cat(brokens)
    if x_adv.dtype != advs[0].dtype:  # the caller's dtype differs from the model's: re-decide
        broken = predict_broken(model, x_adv, y, output=output)
    return x_adv, broken


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    norm: str = "linf",
    loss: str = "ce",
    clip: tuple[float, float] | None = (0.0, 1.0),
    output: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One gradient step of size ε from the clean input (Goodfellow et al. 2015; L2: normalised).

    L∞: ``x + ε·sign(∇)``; L2: ``x + ε·∇/‖∇‖₂``; then the clip range. ``loss="both"`` takes the
    worse of the CE and margin steps per sample. Returns ``(x_adv, broken)`` like :func:`pgd`.
    """
    check_choice("norm", norm, NORMS)
    check_choice("loss", loss, ATTACK_LOSSES)
    losses = ("ce", "margin") if loss == "both" else (loss,)
    key = "margin" if loss == "both" else loss
    with attack_mode(model):
        b = prepare_batch(model, x, y, eps, clip, output)
        best = None
        for name in losses:
            with torch.enable_grad():
                xg = b.x.detach().requires_grad_(True)
                z = canonical_forward(model, xg, b.adapter, False)
                (grad,) = torch.autograd.grad(attack_loss(name, z, b.y, b.adapter.binary).sum(), xg)
            with torch.no_grad():
                step = batch_view(b.eps, b.x) * ascent_direction(grad, norm)
                xa = project(b.x + step, b.x, b.eps, norm, b.clip)
            best = _merge(best, (xa, *fp32_verdict(model, xa, b, key)))
        assert best is not None
        broken, _ = fp32_verdict(model, best[0], b, key)
    x_adv = best[0].to(x.dtype)
    if x_adv.dtype != best[0].dtype:
        broken = predict_broken(model, x_adv, y, output=output)
    return x_adv, broken


def predict_broken(model: nn.Module, x: Tensor, y: Tensor, *, output: str | None = None) -> Tensor:
    """``(N,)`` bool: the model's plain fp32 (eval-mode) prediction on ``x`` differs from ``y``."""
    with attack_mode(model):
        b = prepare_batch(model, x, y, 0.0, None, output)
        return b.adapter.predict(b.clean_z) != b.y


def normalized_area(eps: Sequence[float], accuracy: Sequence[float]) -> float:
    """Trapezoid area under accuracy(ε) over ``[0, max ε]`` divided by ``max ε`` (sorted ε starting
    at 0; 1.0 = fully robust over the range); the clean accuracy when max ε = 0."""
    top = eps[-1]
    if top <= 0:
        return float(accuracy[0])
    area = sum((eps[i + 1] - eps[i]) * (accuracy[i] + accuracy[i + 1]) / 2 for i in range(len(eps) - 1))
    return float(area / top)


def eps_grid(eps_list: Sequence[float]) -> list[float]:
    """The sorted distinct ε values of a robust-accuracy curve, with 0 (the clean accuracy) added;
    :class:`AttackError` unless they are finite numbers >= 0."""
    try:
        values = sorted({float(e) for e in eps_list} | {0.0})
    except (TypeError, ValueError):
        raise AttackError(f"eps_list must be a list of numbers, got {eps_list!r}") from None
    if any(not math.isfinite(e) or e < 0 for e in values):
        raise AttackError(f"eps_list must hold finite values >= 0, got {list(eps_list)}")
    return values


def robust_accuracy_curve(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_list: Sequence[float],
    **pgd_kwargs: Any,
) -> dict[str, Any]:
    """Robust accuracy of :func:`pgd` at each ε, and the normalised area under that curve.

    ε = 0 (the clean accuracy) is always part of the curve (prepended when missing); the ε values
    are sorted. ``auc`` is the trapezoid area under accuracy(ε) over ``[0, max ε]`` divided by
    ``max ε`` (so 1.0 = fully robust over the range; equal to the clean accuracy when max ε = 0).

    Returns a JSON-serialisable dict: ``eps``, ``accuracy``, ``success_rate`` (share broken), ``auc``,
    ``n`` and the attack settings (``norm``, ``loss``, ``steps``, ``restarts``).
    """
    values = eps_grid(eps_list)
    accuracy: list[float] = []
    for e in values:
        if e == 0.0:
            broken = predict_broken(model, x, y, output=pgd_kwargs.get("output"))
        else:
            _, broken = pgd(model, x, y, e, **pgd_kwargs)
        accuracy.append(1.0 - float(broken.float().mean()))
    auc = normalized_area(values, accuracy)
    return {
        "eps": values,
        "accuracy": accuracy,
        "success_rate": [1.0 - a for a in accuracy],
        "auc": auc,
        "n": int(x.shape[0]),
        "norm": pgd_kwargs.get("norm", "linf"),
        "loss": pgd_kwargs.get("loss", "ce"),
        "steps": pgd_kwargs.get("steps", 100),
        "restarts": pgd_kwargs.get("restarts", 1),
    }
