"""Auto-PGD (APGD) of Croce & Hein (2020), L∞ and L2, CE and margin loss.

"Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks" (ICML 2020), Algorithm 1: PGD with momentum whose step size needs no tuning. Units: ε and
every step are in *model-input units* (``[0, 1]`` for ctharden models). Inputs ``x`` are
``(N, ...)`` of any rank (2D ``(N, 1, H, W)``, 3D ``(N, 1, D, H, W)``, ...), labels ``(N,)``, ε a
float or a per-sample tensor ``(N,)``.

Algorithm (one run, per sample; ``N_iter = steps``)
---------------------------------------------------
- Start ``x⁽⁰⁾`` random in the ε-ball (:func:`~ctharden.attacks.common.random_in_ball`, then the clip
  range), step size ``η⁽⁰⁾ = 2ε``.
- ``x⁽¹⁾ = P(x⁽⁰⁾ + η·d(∇f(x⁽⁰⁾)))`` and for ``k ≥ 1``::

      z⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + η⁽ᵏ⁾·d(∇f(x⁽ᵏ⁾)))
      x⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + α·(z⁽ᵏ⁺¹⁾ − x⁽ᵏ⁾) + (1 − α)·(x⁽ᵏ⁾ − x⁽ᵏ⁻¹⁾)),   α = 0.75

  with ``P`` the projection onto the ε-ball and then the clip range, and ``d`` the ascent
  direction: ``sign(∇)`` for L∞, ``∇/‖∇‖₂`` per sample for L2 (the L2 version of APGD).
- ``x_max``/``f_max``: the best point and loss so far (strict improvement).
- Checkpoints ``w_j = ⌈p_j·N_iter⌉`` with ``p₀ = 0``, ``p₁ = 0.22``,
  ``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)`` (for 100 steps: 22, 41, 57, 70, 80, 87, 93,
  99). At a checkpoint η is halved, per sample, when

  1. the loss increased in fewer than ``ρ·(w_j − w_{j−1})`` of the steps since the last
     checkpoint (``ρ = 0.75``), or
  2. η was not halved at the previous checkpoint and ``f_max`` has not changed since it
     (as in the reference implementation, condition 2 never fires at the first checkpoint),

  and a sample whose η is halved restarts from ``x_max`` (with its stored gradient).

Every sample has its own η, counters and best point; the checkpoints are shared (they depend
on the iteration only). A run costs ``steps`` forward+backward passes plus one forward pass.

Losses: ``"ce"`` and ``"margin"`` (:func:`ctharden.attacks.losses.attack_loss`; both work for a
binary logit and for class logits). The DLR loss of the paper is *not* offered: it needs at least
three classes (it divides by ``z_π1 − z_π3``) and ctharden's classifiers are binary. For a binary
logit the CE is evaluated as ``softplus(margin)`` — the same value as BCE-with-logits, but its fp32
gradient does not vanish on confidently classified samples (BCE's backward ``sigmoid(z) − y``
rounds to 0 beyond a margin of ~17).

Conventions (as :mod:`ctharden.attacks.pgd`)
--------------------------------------------
Eval mode and frozen parameters (:func:`~ctharden.attacks.common.attack_mode`); the gradient only
w.r.t. the iterate; fully batched (loops over steps, restarts and ``batch_size`` chunks only);
every iterate inside the ε-ball and the clip range. The clean input is a candidate (a sample the
model misclassifies is broken, so robust accuracy ≤ clean accuracy). ``restarts`` random starts
keep the per-sample worst case, re-decided by fp32 passes: broken first, then the higher loss.
``early_stop`` (default): a sample leaves the batch at its first breaking iterate (under bf16 once
an fp32 pass confirms it), and later restarts only attack unbroken samples. ``autocast``: bf16
autocast for the ascent's passes only; ``broken`` always comes from a plain fp32 forward pass on
exactly the returned tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctharden.attacks.common import (
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
    fp32_verdict,
    prepare_batch,
    project,
    random_in_ball,
    slice_arg,
    use_bf16,
)
from ctharden.attacks.losses import LOSSES, AttackError, attack_loss, margin_loss

MOMENTUM = 0.75  # α of Algorithm 1
ETA0_FACTOR = 2.0  # η⁽⁰⁾ = 2ε
P1, P_DECAY, P_MIN = 0.22, 0.03, 0.06  # the checkpoint schedule


def checkpoints(steps: int) -> list[int]:
    """The iterations ``w_j = ⌈p_j·steps⌉`` (j ≥ 1) at which η may be halved, below ``steps``
    (a checkpoint at the last iterate would have no step left to use it)."""
    p_prev, p = 0.0, P1
    out: list[int] = []
    while p <= 1.0:
        w = math.ceil(round(p * steps, 9))
        if 0 < w < steps and (not out or w > out[-1]):
            out.append(w)
        p_prev, p = p, round(p + max(p - p_prev - P_DECAY, P_MIN), 9)
    return out


def _loss(name: str, z: Tensor, y: Tensor, binary: bool) -> Tensor:
    """The attack loss; for a binary logit CE is computed as ``softplus(margin)`` (the same value as
    BCE-with-logits) because BCE's backward, ``sigmoid(z) − y``, rounds to exactly 0 in fp32 once
    the sample is classified with a margin above ~17, while ``softplus'(margin) = sigmoid(margin)``
    stays representable (down to margins of about −87)."""
    if name == "ce" and binary:
        return F.softplus(margin_loss(z.float(), y, True))
    return attack_loss(name, z, y, binary)


def _step(
    model: nn.Module, xs: Tensor, ys: Tensor, b: AttackBatch, loss: str, bf16: bool, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(loss with NaN -> -inf, broken by this pass, input gradient or None) at the iterates ``xs``."""
    if need_grad:
        with torch.enable_grad():
            xg = xs.detach().requires_grad_(True)
            z = canonical_forward(model, xg, b.adapter, bf16)
            value = _loss(loss, z, ys, b.adapter.binary)
            (grad,) = torch.autograd.grad(value.sum(), xg)
    else:
        with torch.no_grad():
            z = canonical_forward(model, xs, b.adapter, bf16)
            value = _loss(loss, z, ys, b.adapter.binary)
        grad = None
    with torch.no_grad():
        lv = torch.nan_to_num(value.detach(), nan=float("-inf"))
        broken = b.adapter.predict(z.detach()) != ys
    return lv, broken, grad


def _where(m: Tensor, a: Tensor, c: Tensor) -> Tensor:
    """Per-sample select: ``a`` where the bool ``(n,)`` ``m`` holds, else ``c``."""
    return torch.where(batch_mask(m, a) if a.dim() > 1 else m, a, c)


def _run(
    model: nn.Module,
    b: AttackBatch,
    *,
    norm: str,
    loss: str,
    steps: int,
    rho: float,
    bf16: bool,
    start: Tensor,
    active: Tensor,
    early_stop: bool,
) -> Tensor:
    """One APGD run from ``start`` on the samples ``active`` (bool ``(N,)``); the others return
    ``start``. Returns the per-sample worst iterate (broken first, then the higher loss; with
    ``early_stop`` the first breaking iterate). The state is kept for the samples still attacked
    only: a sample that leaves is written to the output and dropped from every state tensor."""
    x_out = start.clone()
    idx = active.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x_out
    marks = set(checkpoints(steps))
    x0, y, eps = b.x[idx], b.y[idx], b.eps[idx]
    xk = start[idx].clone()
    f_k, brk, grad = _step(model, xk, y, b, loss, bf16, True)
    assert grad is not None
    eta = ETA0_FACTOR * eps
    x_prev = xk.clone()
    x_max, f_max, g_max = xk.clone(), f_k.clone(), grad.clone()
    o_x, o_broken, o_loss = xk.clone(), brk.clone(), f_k.clone()  # the output candidate
    ups = torch.zeros_like(f_k)  # steps since the last checkpoint in which the loss went up
    f_max_last = f_max.clone()
    reduced_last = torch.ones_like(brk)  # condition 2 cannot fire at the first checkpoint
    w_last = 0
    for k in range(steps):
        if early_stop:
            drop = o_broken.clone()
            if bf16 and bool(drop.any()):  # leave only when the fp32 decision agrees
                zf = canonical_forward(model, o_x[drop], b.adapter, False)
                confirmed = b.adapter.predict(zf) != y[drop]
                o_broken[drop] = confirmed
                drop[drop.clone()] = confirmed
            if bool(drop.any()):
                x_out[idx[drop]] = o_x[drop]
                keep = ~drop
                idx, x0, y, eps, eta = idx[keep], x0[keep], y[keep], eps[keep], eta[keep]
                xk, x_prev, grad, f_k = xk[keep], x_prev[keep], grad[keep], f_k[keep]
                x_max, f_max, g_max = x_max[keep], f_max[keep], g_max[keep]
                o_x, o_broken, o_loss = o_x[keep], o_broken[keep], o_loss[keep]
                ups, f_max_last, reduced_last = ups[keep], f_max_last[keep], reduced_last[keep]
                if idx.numel() == 0:
                    return x_out
        with torch.no_grad():
            z = project(xk + batch_view(eta, xk) * ascent_direction(grad, norm), x0, eps, norm, b.clip)
            if k == 0:
                xn = z
            else:
                xn = project(xk + MOMENTUM * (z - xk) + (1 - MOMENTUM) * (xk - x_prev), x0, eps, norm, b.clip)
        last = k + 1 == steps
        f_n, brk, g_n = _step(model, xn, y, b, loss, bf16, not last)
        with torch.no_grad():
            ups += (f_n > f_k).float()
            up = f_n > f_max
            x_max, f_max = _where(up, xn, x_max), torch.where(up, f_n, f_max)
            if g_n is not None:
                g_max = _where(up, g_n, g_max)
            better = (brk & ~o_broken) | ((brk == o_broken) & (f_n > o_loss))
            o_x, o_loss, o_broken = _where(better, xn, o_x), torch.where(better, f_n, o_loss), o_broken | brk
            x_prev, xk, f_k = xk, xn, f_n
            if g_n is not None:
                grad = g_n
            if k + 1 in marks:
                span = k + 1 - w_last
                halve = (ups < rho * span) | (~reduced_last & (f_max <= f_max_last))
                eta = torch.where(halve, eta / 2, eta)
                xk, grad, f_k = _where(halve, x_max, xk), _where(halve, g_max, grad), torch.where(halve, f_max, f_k)
                reduced_last, f_max_last = halve, f_max.clone()
                ups.zero_()
                w_last = k + 1
    x_out[idx] = o_x
    return x_out


def _attack_batch(
    model: nn.Module,
    b: AttackBatch,
    *,
    norm: str,
    steps: int,
    loss: str,
    restarts: int,
    rho: float,
    bf16: bool,
    generator: torch.Generator | None,
    early_stop: bool,
) -> tuple[Tensor, Tensor]:
    """APGD with restarts on a prepared batch (inside :func:`attack_mode`): (x_adv, broken)."""
    best_x = b.x
    best_broken, best_score = fp32_verdict(model, b.x, b, loss, _loss)  # the clean input is a candidate
    positive = b.eps > 0  # ε = 0: nothing to search
    for _ in range(restarts):
        with torch.no_grad():
            start = project(b.x + random_in_ball(b.x, b.eps, norm, generator), b.x, b.eps, norm, b.clip)
        active = positive & ~best_broken if early_stop else positive
        xa = _run(
            model, b, norm=norm, loss=loss, steps=steps, rho=rho, bf16=bf16, start=start, active=active,
            early_stop=early_stop,
        )
        broken, score = fp32_verdict(model, xa, b, loss, _loss)
        better = active & ((broken & ~best_broken) | ((broken == best_broken) & (score > best_score)))
        best_x = _where(better, xa, best_x)
        best_broken, best_score = torch.where(better, broken, best_broken), torch.where(better, score, best_score)
    broken, _ = fp32_verdict(model, best_x, b, loss, _loss)  # decided on exactly the returned tensor
    return best_x, broken


def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    norm: str = "linf",
    steps: int = 100,
    loss: str = "ce",
    restarts: int = 1,
    rho: float = 0.75,
    clip: tuple[float, float] | None = (0.0, 1.0),
    output: str | None = None,
    generator: torch.Generator | None = None,
    autocast: bool = False,
    early_stop: bool = True,
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Auto-PGD (Croce & Hein 2020, Algorithm 1) within an L∞ or L2 ball; worst case kept.

    Args:
        model: a classifier with a binary logit ``(N,)``/``(N, 1)``, class logits ``(N, C)`` or a
            ``CTClassifier`` rating output (see :mod:`ctharden.attacks.losses`).
        x: ``(N, ...)`` inputs in model-input units (any rank).
        y: ``(N,)`` integer labels.
        eps: radius in model-input units, a float or a tensor ``(N,)``.
        norm: ``"linf"`` (sign steps) or ``"l2"`` (per-sample normalised gradient steps).
        steps: ``N_iter``, iterations per run (>= 1).
        loss: ``"ce"`` or ``"margin"`` (DLR needs >= 3 classes and is not offered).
        restarts: random starts (>= 1); the per-sample worst case is kept.
        rho: the oscillation threshold ρ of checkpoint condition 1, in ``(0, 1]``.
        clip: valid input range ``(lo, hi)`` or None.
        output: override the output kind (``logit`` | ``logits2`` | ``rating`` | ``logits``).
        generator: random source for the starts (default: torch's global RNG).
        autocast: bf16 autocast for the ascent (fp32 models on CPU/CUDA); verdicts stay fp32.
        early_stop: a sample leaves the batch once broken (its ``x_adv`` is then the first
            breaking iterate); False keeps ascending and returns the highest-loss broken iterate.
        batch_size: attack at most this many samples at once; None = all at once.

    Returns:
        ``(x_adv, broken)``: ``x_adv`` with the shape and dtype of ``x``; ``broken`` bool ``(N,)``,
        the model's plain fp32 prediction on ``x_adv`` differs from ``y``.
    """
    check_choice("norm", norm, NORMS)
    check_choice("loss", loss, LOSSES)
    check_int("steps", steps, 1)
    check_int("restarts", restarts, 1)
    if isinstance(rho, bool) or not isinstance(rho, int | float) or not 0.0 < float(rho) <= 1.0:
        raise AttackError(f"rho must be a number in (0, 1], got {rho!r}")
    check_x(x)
    n = x.shape[0]
    y = torch.as_tensor(y, device=x.device)
    advs, brokens = [], []
    with attack_mode(model):
        bf16 = use_bf16(model, x, autocast)
        for sl in batch_slices(n, batch_size):
            b = prepare_batch(model, x[sl], slice_arg(y, sl, n), slice_arg(eps, sl, n), clip, output)
            xa, broken = _attack_batch(
                model, b, norm=norm, steps=steps, loss=loss, restarts=restarts, rho=float(rho), bf16=bf16,
                generator=generator, early_stop=early_stop,
            )
            advs.append(xa)
            brokens.append(broken)
        x_adv = torch.cat(advs).to(x.dtype)
        broken = torch.cat(brokens)
        if x_adv.dtype != advs[0].dtype:  # the caller's dtype differs from the model's: re-decide
            rb = prepare_batch(model, x_adv, y, 0.0, None, output)
            broken = rb.adapter.predict(rb.clean_z) != rb.y
    return x_adv, broken
