"""BPGD: PGD that stops at the decision boundary (ma 2020, Algorithm 3).

For each correctly classified sample, PGD with ``n_pgd`` steps of ``α·ε/n_pgd`` (α = 4, the paper's
setting) runs from the clean input inside the ε-ball; the first iterate the model misclassifies
ends the sample's run, and the pair (last correctly classified iterate, first misclassified
iterate) brackets the decision boundary ("case 1"). ``n_binary`` bisection steps on the straight
segment between them shrink the bracket by ``2^-n_binary``. A sample whose iterates all stay
correct has no boundary point within ε ("case 0", the paper's ``None``).

Choices (documented, see ``docs/ARCHITECTURE.md``):

- The model runs in **eval mode** with frozen parameters (:func:`~ctharden.attacks.common.attack_mode`),
  so BatchNorm running statistics never move during the search (the authors' code attacks in
  train mode).
- PGD starts at the clean sample itself (no random start): the sequence then begins on the
  correct side, so the first bracket always exists for case 1, and the found distance is a margin
  estimate along the loss-ascent path.
- Every decision (case 0/1, every bisection step) is a plain fp32 forward pass. PGD ascends the
  logit margin by default (``loss="margin"``): the cross-entropy the paper's PGD uses (``loss="ce"``)
  has an fp32 gradient of exactly zero on confidently classified samples (BCE's ``sigmoid(z) - y``
  rounds to 0 above a logit of ~17), so PGD would never move and the sample would be reported
  "no boundary within ε" although it is there (tested); the margin's gradient does not vanish.
- ``x_n`` is the *misclassified* end of the final bracket: it is an adversarial example within
  ε, and the boundary lies between ``x_in`` (correct) and ``x_n`` (wrong), at most ``bracket`` away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ctharden.attacks.common import (
    NORMS,
    ascent_direction,
    attack_mode,
    batch_view,
    canonical_forward,
    check_choice,
    check_int,
    flat_norm,
    prepare_batch,
    project,
)
from ctharden.attacks.losses import attack_loss

BPGD_ALPHA = 4.0  # ma 2020, section 3: "α in PGD is 4"


@dataclass
class BPGDResult:
    """Output of :func:`bpgd` for ``N`` samples.

    ``x_n``: ``(N, ...)`` boundary points (misclassified side) where ``found``, else the last PGD
    iterate (or ``x`` for samples misclassified from the start). ``x_in``: ``(N, ...)`` the correctly
    classified end of the final bracket (``x`` where nothing was found). ``found``: ``(N,)`` bool, a
    boundary point exists on the PGD path within ε (case 1). ``correct``: ``(N,)`` bool, the clean
    sample is classified correctly. ``distance``: ``(N,)`` fp32 ``‖x_n - x‖_p`` (NaN where not
    found). ``bracket``: ``(N,)`` fp32 ``‖x_n - x_in‖_p`` (NaN where not found).
    """

    x_n: Tensor
    x_in: Tensor
    found: Tensor
    correct: Tensor
    distance: Tensor
    bracket: Tensor


def bpgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    norm: str = "l2",
    n_pgd: int = 20,
    n_binary: int = 10,
    alpha: float = BPGD_ALPHA,
    loss: str = "margin",
    clip: tuple[float, float] | None = (0.0, 1.0),
    output: str | None = None,
) -> BPGDResult:
    """Find points on the decision boundary within ε of each correctly classified sample.

    Args:
        model: any classifier (binary logit, class logits or a ``CTClassifier``).
        x: ``(N, ...)`` inputs in model-input units.
        y: ``(N,)`` integer labels.
        eps: search radius (the sample's current margin estimate in IMA): float or ``(N,)``,
            model-input units, norm ``norm``.
        norm: ``"l2"`` or ``"linf"``.
        n_pgd: PGD steps (N_PGD); step size ``alpha·ε/n_pgd`` per sample.
        n_binary: bisection steps (N_binary).
        loss: ``"margin"`` (default, see the module docstring) or ``"ce"``, the quantity PGD ascends.
        clip: valid input range or None.

    Returns:
        :class:`BPGDResult`. Costs at most ``n_pgd + 1`` forward and ``n_pgd`` backward passes per
        sample (a sample leaves the PGD loop at its first misclassified iterate) plus ``n_binary``
        forward passes for each sample with a boundary point.
    """
    check_choice("norm", norm, NORMS)
    check_choice("loss", loss, ("ce", "margin"))
    check_int("n_pgd", n_pgd, 1)
    check_int("n_binary", n_binary, 0)
    with attack_mode(model):
        b = prepare_batch(model, x, y, eps, clip, output)
        correct = b.adapter.predict(b.clean_z) == b.y
        step = float(alpha) * b.eps / n_pgd
        cur, prev = b.x.clone(), b.x.clone()
        x_in, x_n = b.x.clone(), b.x.clone()
        found = torch.zeros_like(correct)
        active = correct & (b.eps > 0)
        for i in range(n_pgd + 1):
            act = active.nonzero().squeeze(1)
            if act.numel() == 0:
                break
            xa, ya = cur[act], b.y[act]
            last = i == n_pgd
            with torch.enable_grad():
                xg = xa.detach().requires_grad_(not last)
                z = canonical_forward(model, xg, b.adapter, False)
                if not last:
                    (grad,) = torch.autograd.grad(attack_loss(loss, z, ya, b.adapter.binary).sum(), xg)
            with torch.no_grad():
                wrong = b.adapter.predict(z.detach()) != ya
                hit = act[wrong]
                x_in[hit], x_n[hit] = prev[hit], cur[hit]
                found[hit] = True
                active[hit] = False
                if last:
                    break
                keep = ~wrong
                go = act[keep]
                prev[go] = xa[keep]
                moved = xa[keep] + batch_view(step[go], xa) * ascent_direction(grad[keep], norm)
                cur[go] = project(moved, b.x[go], b.eps[go], norm, b.clip)
        rest = correct & ~found
        x_n[rest] = cur[rest]
        f = found.nonzero().squeeze(1)
        if f.numel() and n_binary:
            lo, hi, yf = x_in[f], x_n[f], b.y[f]
            with torch.no_grad():
                for _ in range(n_binary):
                    mid = (lo + hi) / 2
                    wrong = b.adapter.predict(canonical_forward(model, mid, b.adapter, False)) != yf
                    hi = torch.where(batch_view(wrong.to(mid.dtype), mid).bool(), mid, hi)
                    lo = torch.where(batch_view(wrong.to(mid.dtype), mid).bool(), lo, mid)
            x_in[f], x_n[f] = lo, hi
        nan = torch.full((x.shape[0],), float("nan"), device=x.device)
        distance = torch.where(found, flat_norm(x_n - b.x, norm), nan)
        bracket = torch.where(found, flat_norm(x_n - x_in, norm), nan)
    return BPGDResult(x_n.to(x.dtype), x_in.to(x.dtype), found, correct, distance, bracket)
