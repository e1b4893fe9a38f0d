"""Increasing-Margin Adversarial (IMA) training (ma 2020, Algorithms 1-3).

Every training sample has a margin estimate ``E[i]`` (model-input units, norm ``norm``),
initialised to ``Δε`` (``delta``; default ``eps_max / epochs``, the paper's note under Algorithm 2).

Algorithm 1, per batch: classify the batch (eval mode); the wrongly classified ``X0`` and the
correctly classified ``X1``; noisy samples ``Xn = BPGD(X1, Y1, E[X1])`` on the decision boundary
(:func:`~ctharden.attacks.bpgd.bpgd`; samples without a boundary point within their margin are
left out); loss ``((1-β)(L0 + L1) + β·L2) / batch_size`` with summed cross-entropies
``L0 = CE(f(X0), Y0)``, ``L1 = CE(f(X1), Y1)``, ``L2 = CE(f(Xn), Y1)``; one optimizer step.

Algorithm 2, the margin update: wrongly classified -> ``Δε`` (re-initialise); boundary point found
-> ``‖x - x_n‖`` (shrink/refine); none found within ``E`` -> ``E + Δε`` (expand); then clip into
``[Δε, ε_max]``. Implementation choice (as in the authors' code, and what keeps an IMA epoch at
the cost of an "adv ε" epoch): the classification and BPGD that Algorithm 1 runs on a batch are
also Algorithm 2's for those samples; the new margins are collected during the epoch and applied
after it, so every batch of an epoch uses the margins of the previous epoch.
``margin_update="pass"`` instead runs Algorithm 2 literally, as a separate BPGD pass over the
whole training set after each epoch (about twice the cost).

Attacks and classification run in **eval mode** with frozen parameters, so BatchNorm statistics
never move during BPGD (a trap of the reference implementation, see ``docs/ARCHITECTURE.md``); only the loss
forward/backward runs in train mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ctharden.attacks.bpgd import BPGDResult, bpgd
from ctharden.attacks.common import NORMS, attack_mode
from ctharden.core.errors import ConfigError
from ctharden.hardening.objectives import ce_sum, dataset_size, fit_with, indexed_batches, resolve_device

MARGIN_UPDATES = ("batch", "pass")


@dataclass
class IMAState:
    """IMA's per-sample state: margins ``(N,)`` fp32 on CPU and the per-epoch history."""

    margins: Tensor
    eps_max: float
    delta: float
    history: list[np.ndarray] = field(default_factory=list)  # margins after each epoch


class IMALoss:
    """Algorithm 1's batch loss with Algorithm 2's margin bookkeeping (see the module docstring)."""

    name = "ima"

    def __init__(self, n: int, *, eps_max: float, delta: float, norm: str, beta: float, n_pgd: int, n_binary: int,
                 clip: tuple[float, float] | None, margin_update: str = "batch",
                 loader: DataLoader[Any] | None = None, device: torch.device | None = None) -> None:
        self.state = IMAState(torch.full((n,), delta, dtype=torch.float32), eps_max, delta)
        self.pending = self.state.margins.clone()
        self.norm, self.beta, self.n_pgd, self.n_binary, self.clip = norm, beta, n_pgd, n_binary, clip
        self.margin_update, self.loader, self.device = margin_update, loader, device

    def _search(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor) -> BPGDResult:
        eps = self.state.margins[idx.cpu()].to(x.device)
        return bpgd(model, x, y, eps, norm=self.norm, n_pgd=self.n_pgd, n_binary=self.n_binary, clip=self.clip)

    def _record(self, idx: Tensor, correct: Tensor, found: Tensor, distance: Tensor) -> None:
        i = idx.cpu()
        old = self.state.margins[i]
        new = torch.where(found.cpu(), distance.cpu().float(), old + self.state.delta)
        new = torch.where(correct.cpu(), new, torch.full_like(old, self.state.delta))
        self.pending[i] = new

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, float]]:
        res = self._search(model, x, y, idx)
        if self.margin_update == "batch":
            self._record(idx, res.correct, res.found, res.distance)
        xn = res.x_n[res.found].detach()
        out = model(torch.cat([x, xn]))
        n = len(x)
        clean = ce_sum(model, out[:n], y)  # L0 + L1
        noisy = ce_sum(model, out[n:], y[res.found]) if len(xn) else out.sum() * 0.0
        loss = ((1 - self.beta) * clean + self.beta * noisy) / n
        return loss, {"clean_accuracy": res.correct.float().mean().item(),
                      "boundary_found": res.found.float().mean().item()}

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if self.margin_update == "pass":
            assert self.loader is not None
            with attack_mode(model):
                for x, y, idx in indexed_batches(self.loader):
                    x, y = x.to(self.device).float(), y.to(self.device).long()
                    res = self._search(model, x, y, idx)
                    self._record(idx, res.correct, res.found, res.distance)
        m = self.pending.clamp(self.state.delta, self.state.eps_max)
        self.state.margins = m.clone()
        self.pending = m.clone()
        self.state.history.append(m.numpy().copy())
        return {"margin_mean": float(m.mean()), "margin_median": float(m.median()),
                "margin_at_max": float((m >= self.state.eps_max - 1e-12).float().mean())}


def fit(
    model: nn.Module,
    loader: DataLoader[Any],
    *,
    eps_max: float,
    norm: str = "l2",
    epochs: int,
    beta: float = 0.5,
    n_pgd: int = 20,
    n_binary: int = 10,
    delta: float | None = None,
    clip: tuple[float, float] | None = (0.0, 1.0),
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
    margin_update: str = "batch",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    state: list[IMAState] | None = None,
) -> tuple[nn.Module, Tensor]:
    """Train ``model`` in place with IMA; returns ``(model, margins)``.

    Args:
        model: any classifier module (binary logit ``(N,)``/``(N, 1)`` or class logits ``(N, C)``).
        loader: a DataLoader yielding ``(x, y)`` or ``(x, y, idx)`` (``idx`` = index into
            ``loader.dataset``); ``x`` in model-input units.
        eps_max: ε_max, the largest margin (model-input units, norm ``norm``).
        norm: ``"l2"`` or ``"linf"``.
        epochs: training epochs.
        beta: β, weight of the boundary samples' loss (0.5 in the paper).
        n_pgd, n_binary: BPGD's PGD steps and bisection steps (20 and 10 in the paper).
        delta: Δε, the margin expansion step; None -> ``eps_max / epochs``.
        clip: valid input range for the attacks, None for no clipping.
        optimizer: default Adam with default parameters (the paper's setting).
        device: default the model's device.
        margin_update: ``"batch"`` (Algorithm 2 from Algorithm 1's BPGD results, default) or
            ``"pass"`` (a separate BPGD pass after each epoch).
        on_epoch: called with ``(epoch, record)`` after each epoch (loss, accuracy, margin stats).
        state: if a list is given, the :class:`IMAState` (margins per epoch) is appended to it.

    Returns:
        ``(model, margins)``: the trained model (eval mode) and the final margin estimates
        ``(len(loader.dataset),)`` fp32 on CPU.
    """
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    if margin_update not in MARGIN_UPDATES:
        raise ConfigError(f"margin_update must be one of {list(MARGIN_UPDATES)}, got {margin_update!r}")
    try:
        eps_max = float(eps_max) if not isinstance(eps_max, bool) else math.nan
        beta = float(beta)
    except (TypeError, ValueError):
        raise ConfigError(f"eps_max and beta must be numbers, got {eps_max!r}, {beta!r}") from None
    if not (math.isfinite(eps_max) and eps_max > 0):
        raise ConfigError(f"eps_max must be a positive number, got {eps_max!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ConfigError(f"beta must lie in [0, 1], got {beta!r}")
    d = float(eps_max) / epochs if delta is None else float(delta)
    if not (math.isfinite(d) and 0 < d <= eps_max):
        raise ConfigError(f"delta must lie in (0, eps_max], got {delta!r}")
    dev = resolve_device(model, device)
    method = IMALoss(dataset_size(loader), eps_max=float(eps_max), delta=d, norm=norm, beta=float(beta),
                     n_pgd=n_pgd, n_binary=n_binary, clip=clip, margin_update=margin_update, loader=loader, device=dev)
    if state is not None:
        state.append(method.state)
    fit_with(model, loader, method, epochs=epochs, optimizer=optimizer, device=dev, on_epoch=on_epoch)
    return model, method.state.margins.clone()


def suggest_eps(margins: Tensor | np.ndarray, eps_max: float, quantile: float = 0.5) -> float:
    """The ε that IMA's margin distribution suggests (ma 2020, Fig. 9: "IMA indicates a good ε").

    The ``quantile`` of the margins that are below ``eps_max`` (samples still expanding at ε_max
    carry no boundary information); ``eps_max / 2`` if every margin sits at ε_max.
    """
    m = torch.as_tensor(margins, dtype=torch.float32)
    inside = m[m < eps_max * (1 - 1e-6)]
    if inside.numel() == 0:
        return float(eps_max) / 2
    return float(torch.quantile(inside, float(quantile)))

