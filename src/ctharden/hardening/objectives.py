"""The training loop behind every hardening method, and the baselines of ma 2020.

One loop (:func:`fit_with`) runs any :class:`BatchLoss`: it takes ``(x, y, idx)`` batches from any
DataLoader, asks the method for the batch loss, steps the optimizer, and calls the method's
``end_epoch`` hook (IMA updates its margins there). The methods:

- :class:`CleanCE` — "ce": cross-entropy on clean data.
- :class:`AdvPGD` — "adv ε": vanilla PGD adversarial training, ``x_ε = PGD(x, y, ε)`` with 20
  steps of ``α·ε/20`` (α = 4) and one random start, loss ``(Lce(x) + Lce(x_ε))/2`` (ma 2020, eq. 2).
- :class:`RandNoise` — "rand ε": the same loss with uniform noise ``U(-ε, ε)`` (L∞) or a uniform
  random direction of norm ``ε·U(0, 1)`` (L2) instead of the attack.
- :class:`Trades` — TRADES (Zhang et al. 2019): ``Lce(x) + β·KL(p(x) ‖ p(x'))``, ``x'`` maximising the
  KL by the same 20-step PGD (start ``x + 0.001·N(0, 1)``).
- :class:`NPSNoise` — CT-noise augmentation: ``(Lce(x) + Lce(x + n))/2`` with ``n`` random NPS noise
  (HU, shen 2020) at a mAs drawn per sample from ``mas_levels``, mapped to model-input units.

Every attack or noise draw runs with the model in **eval mode** and frozen parameters
(:func:`~ctharden.attacks.common.attack_mode`); only the loss forward/backward runs in train mode.
Losses use the classifier's canonical output (:class:`~ctharden.attacks.losses.OutputAdapter`):
BCE on a binary logit, CE on class logits.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ctharden.attacks.common import NORMS, ascent_direction, attack_mode, batch_view, project, random_in_ball
from ctharden.attacks.losses import AttackError, OutputAdapter, ce_loss, infer_adapter
from ctharden.attacks.pgd import pgd
from ctharden.core.errors import ConfigError
from ctharden.core.progress import progress
from ctharden.noise import sample_nps_noise

PGD_ALPHA = 4.0  # ma 2020: 20-PGD with α = 4 for "adv ε" and TRADES


class BatchLoss(Protocol):
    """A hardening method: the loss of one batch (the model is in train mode when called)."""

    name: str

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, float]]:
        """``x`` ``(B, ...)`` model-input units, ``y`` ``(B,)`` labels, ``idx`` ``(B,)`` dataset
        indices -> (scalar loss, per-batch statistics to average over the epoch)."""
        ...


# ---------------------------------------------------------------------------------------------------
# data


class _Indexed(Dataset[Any]):
    """Adds the dataset index to items that are ``(x, y)``."""

    def __init__(self, base: Dataset[Any]) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        return (*self.base[i], i)


def dataset_size(loader: DataLoader[Any]) -> int:
    """Number of samples in the loader's dataset (margins are indexed over it)."""
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError("the DataLoader's dataset must have a length (map-style dataset)") from None


def _yields_pairs(loader: DataLoader[Any]) -> bool:
    """Do the loader's items look like ``(x, y)`` (no index)? Peeks at ``dataset[0]`` only."""
    try:
        item = loader.dataset[0]
    except (TypeError, IndexError, NotImplementedError, KeyError):
        return False
    return isinstance(item, (tuple, list)) and len(item) == 2


def indexed_batches(loader: DataLoader[Any]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(x, y, idx)`` batches from a loader yielding ``(x, y)``, ``(x, y, idx)`` or ctharden's
    ``(x, y, target, idx)``. For ``(x, y)`` items the loader is rebuilt over an indexed view of its
    dataset with the *same* batch sampler (and worker settings) before anything is drawn, so the
    sample order and batching are those the loader itself would give."""
    if _yields_pairs(loader):
        if loader.batch_sampler is None:
            raise ConfigError("a DataLoader yielding (x, y) needs a batch sampler (batch_size set) to index samples")
        loader = DataLoader(_Indexed(loader.dataset), batch_sampler=loader.batch_sampler,
                            num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                            pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                            timeout=loader.timeout, persistent_workers=loader.persistent_workers,
                            generator=loader.generator)
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (3, 4):
            raise ConfigError("the DataLoader must yield (x, y), (x, y, idx) or (x, y, target, idx) batches")
        yield batch[0], torch.as_tensor(batch[1]), torch.as_tensor(batch[-1])


# ---------------------------------------------------------------------------------------------------
# losses


def class_logits(model: nn.Module, out: Tensor, adapter: OutputAdapter | None = None) -> Tensor:
    """Model output -> class logits ``(N, C)`` (a binary logit ``z`` becomes ``[0, z]``), fp32."""
    a = adapter or infer_adapter(model, out)
    z = a.canonical(out).float()
    if a.binary:
        return torch.stack([torch.zeros_like(z), z], dim=1)
    return z


def ce_sum(model: nn.Module, out: Tensor, y: Tensor) -> Tensor:
    """Summed cross-entropy (BCE on a binary logit) of raw model outputs ``out`` against ``y``."""
    a = infer_adapter(model, out)
    return ce_loss(a.canonical(out).float(), y.long(), a.binary).sum()


def _check_eps(name: str, eps: float) -> float:
    e = float(eps)
    if not math.isfinite(e) or e < 0:
        raise ConfigError(f"{name} must be finite and >= 0, got {eps!r}")
    return e


def _check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    return norm


class CleanCE:
    """"ce": cross-entropy on the clean batch."""

    name = "ce"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, float]]:
        return ce_sum(model, model(x), y) / len(x), {}


class _PairLoss:
    """``(Lce(x) + Lce(x̃))/2`` for a perturbed batch ``x̃`` from :meth:`perturb` (eval mode)."""

    name = "pair"

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, float]]:
        with attack_mode(model):
            xp = self.perturb(model, x, y).detach()
        out = model(torch.cat([x, xp]))
        n = len(x)
        loss = (ce_sum(model, out[:n], y) + ce_sum(model, out[n:], y)) / (2 * n)
        with torch.no_grad():
            a = infer_adapter(model, out)
            acc = (a.predict(a.canonical(out[n:]).float()) == y).float().mean().item()
        return loss, {"perturbed_accuracy": acc}


class AdvPGD(_PairLoss):
    """"adv ε": 20-PGD (α = 4) adversarial training, loss (Lce(x) + Lce(x_ε))/2."""

    name = "adv"

    def __init__(self, eps: float, norm: str = "linf", n_pgd: int = 20, alpha: float = PGD_ALPHA,
                 clip: tuple[float, float] | None = (0.0, 1.0)) -> None:
        self.eps, self.norm = _check_eps("eps", eps), _check_norm(norm)
        self.n_pgd, self.alpha, self.clip = n_pgd, alpha, clip

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self.eps == 0:
            return x
        xa, _ = pgd(model, x, y, self.eps, norm=self.norm, steps=self.n_pgd,
                    step_size=self.alpha * self.eps / self.n_pgd, loss="ce", clip=self.clip)
        return xa


class RandNoise(_PairLoss):
    """"rand ε": uniform noise in the ε-ball, loss (Lce(x) + Lce(x + noise))/2."""

    name = "rand"

    def __init__(self, eps: float, norm: str = "linf", clip: tuple[float, float] | None = (0.0, 1.0)) -> None:
        self.eps, self.norm, self.clip = _check_eps("eps", eps), _check_norm(norm), clip

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        e = torch.full((len(x),), self.eps, device=x.device)
        xn = x + random_in_ball(x, e, self.norm)
        return xn.clamp(*self.clip) if self.clip is not None else xn


class NPSNoise(_PairLoss):
    """CT-noise augmentation: random NPS noise (HU) at a mAs drawn per sample from ``mas_levels``.

    ``hu_per_unit``: HU per model-input unit (the model's window width, 1400 for ``[-1000, 400]``;
    the assumed display window for PNG data); noise moves an input by ``n_HU / hu_per_unit``,
    then the input is clamped to ``[0, 1]`` as the model's window would.
    """

    name = "nps"

    def __init__(self, mas_levels: Sequence[float], spacing_mm: float, hu_per_unit: float, nps: Any = None,
                 seed: int = 0) -> None:
        if not mas_levels or any(not float(m) > 0 for m in mas_levels):
            raise ConfigError(f"NPS augmentation needs positive mAs levels, got {list(mas_levels)}")
        if not float(hu_per_unit) > 0 or not float(spacing_mm) > 0:
            raise ConfigError("NPS augmentation needs positive hu_per_unit and spacing_mm")
        self.mas = [float(m) for m in mas_levels]
        self.spacing, self.hu, self.nps = float(spacing_mm), float(hu_per_unit), nps
        self.rng = random.Random(seed)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        mas = torch.tensor([self.rng.choice(self.mas) for _ in range(len(x))], device=x.device)
        lead = x.shape[:-2]
        mas = mas.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)
        noise = sample_nps_noise(tuple(x.shape), mas, self.spacing, nps=self.nps, device=x.device)
        return (x + noise.to(x.dtype) / self.hu).clamp(0.0, 1.0)


class Trades:
    """TRADES: ``Lce(x) + β·KL(p(x) ‖ p(x'))``, ``x'`` from 20-step PGD on the KL (eval mode)."""

    name = "trades"

    def __init__(self, eps: float, norm: str = "linf", beta: float = 6.0, n_pgd: int = 20, alpha: float = PGD_ALPHA,
                 clip: tuple[float, float] | None = (0.0, 1.0)) -> None:
        self.eps, self.norm, self.beta = _check_eps("eps", eps), _check_norm(norm), float(beta)
        self.n_pgd, self.alpha, self.clip = n_pgd, alpha, clip

    def _adversary(self, model: nn.Module, x: Tensor) -> Tensor:
        eps = torch.full((len(x),), self.eps, device=x.device)
        step = self.alpha * self.eps / self.n_pgd
        with attack_mode(model), torch.no_grad():
            p_clean = F.softmax(class_logits(model, model(x)), dim=1)
        xa = project(x + 0.001 * torch.randn_like(x), x, eps, self.norm, self.clip)
        with attack_mode(model):
            for _ in range(self.n_pgd):
                with torch.enable_grad():
                    xg = xa.detach().requires_grad_(True)
                    kl = F.kl_div(F.log_softmax(class_logits(model, model(xg)), dim=1), p_clean, reduction="sum")
                    (grad,) = torch.autograd.grad(kl, xg)
                with torch.no_grad():
                    xa = project(xa + batch_view(torch.full_like(eps, step), xa) * ascent_direction(grad, self.norm),
                                 x, eps, self.norm, self.clip)
        return xa.detach()

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, float]]:
        xa = self._adversary(model, x) if self.eps > 0 else x
        out = model(torch.cat([x, xa]))
        n = len(x)
        logits = class_logits(model, out)
        natural = F.cross_entropy(logits[:n], y.long(), reduction="sum") / n
        robust = F.kl_div(F.log_softmax(logits[n:], dim=1), F.softmax(logits[:n], dim=1), reduction="sum") / n
        return natural + self.beta * robust, {"kl": robust.item()}


# ---------------------------------------------------------------------------------------------------
# the loop


def resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device`` if given, else where the model's parameters are (CPU for a parameterless model)."""
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def fit_with(
    model: nn.Module,
    loader: DataLoader[Any],
    method: BatchLoss,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place with ``method`` for ``epochs``; returns the per-epoch history.

    ``optimizer`` defaults to Adam with default parameters (the IMA paper's setting). A method with
    an ``end_epoch(model, epoch) -> dict`` hook has it called after every epoch; its statistics join
    the epoch's record, which ``on_epoch(epoch, record)`` receives.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
    dev = resolve_device(model, device)
    model.to(dev)
    opt = optimizer or torch.optim.Adam(model.parameters())
    history: list[dict[str, float]] = []
    with progress(epochs, f"{method.name} fine-tuning") as advance:
        for epoch in range(epochs):
            history.append(_epoch(model, loader, method, opt, dev, epoch))
            advance(note=f"loss {history[-1].get('loss', float('nan')):.4f}")
            if on_epoch is not None:
                on_epoch(epoch, history[-1])
    model.eval()
    return history


def _epoch(model: nn.Module, loader: DataLoader[Any], method: BatchLoss, opt: torch.optim.Optimizer,
           dev: torch.device, epoch: int) -> dict[str, float]:
    """One epoch of :func:`fit_with`: the epoch's record (mean loss and statistics, hook results)."""
    model.train()
    sums: dict[str, float] = {}
    n_total = 0
    for x, y, idx in indexed_batches(loader):
        x, y, idx = x.to(dev).float(), y.to(dev).long(), idx.to(dev).long()
        opt.zero_grad(set_to_none=True)
        loss, stats = method(model, x, y, idx)
        if not torch.isfinite(loss):
            raise AttackError(f"{method.name}: non-finite training loss at epoch {epoch}")
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        opt.step()
        for k, v in {"loss": loss.item(), **stats}.items():
            sums[k] = sums.get(k, 0.0) + v * len(x)
        n_total += len(x)
    record = {"epoch": float(epoch), **{k: v / max(n_total, 1) for k, v in sums.items()}}
    hook = getattr(method, "end_epoch", None)
    if hook is not None:
        record.update(hook(model, epoch))
    return record
