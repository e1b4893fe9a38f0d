"""Realistic-noise attacks: random NPS attacks and NPS-constrained optimised attacks (Shen et al. 2020).

>>> res = random_nps_attack(model, cubes_hu, [10, 50, 100, 200, 500], k=100, spacing_mm=1.0)
>>> res.table()                     # Table-2-style rows: mAs, SAN, SAN/N (%), mean SAR
>>> opt = optimized_nps_attack(model, cubes_hu, 50, 1.0, restarts=10, step_hu=5.0, tol=1e-3, n_iter=20)
>>> sar_above_curve(opt[50].sar)    # Figs 7-8

Success criterion (section 2.2.1)
---------------------------------
A perturbation ``p`` *flips* sample ``x`` when the model's predicted label on ``x + p`` differs from
its predicted label on the clean ``x`` (``ŷ ≠ y = D(x)``) — the paper's definition of a successful
attack, independent of the ground truth (the question is whether CT noise changes the model's
answer). Every flip is decided by a plain **fp32** forward pass with autocast disabled; the labels
come from :class:`ctharden.attacks.losses.OutputAdapter` (binary: logit > 0, i.e.
``positive_score > 0.5``; ``rating`` models: rating > 3; class logits: argmax). SAN, SAR and the
curves are defined in :mod:`ctharden.attacks.nps_metrics`.

Units and inputs
----------------
``x_hu`` is ``(N, *spatial)``; noise is generated in HU and is independent per axial slice (the last
two axes; :func:`ctharden.noise.sample_nps_noise`). How ``x + p`` reaches the model:

- models with an HU window (``CTClassifier.window_hu`` set, e.g. nodule3d): ``model.to_input(x + p)``
  — noise is added in HU *before* windowing (voxels leaving the window saturate);
- ``hu_per_unit`` given (models whose data are display-windowed images in ``[0, 1]``, e.g. covid2d
  with ``window_hu=None``): ``clamp(x + p / hu_per_unit, 0, 1)``. The caller states the assumed
  display window: ``hu_per_unit = hi - lo`` of the window the images were exported with (1400 for
  the lung window ``[-1000, 400]``). Giving it for a model that has its own HU window is an error;
  not giving it for a ``window_hu=None`` CTClassifier is an error too;
- any other ``nn.Module`` (no ``to_input``): ``x + p`` as is (the model takes HU).

Random attacks (section 2.2.1)
------------------------------
For every sample, K NPS noise realisations per mAs level. Common random numbers across mAs: the
k-th perturbation of sample i at every level is the same realisation scaled to that level
(``NPS ∝ 1/mAs``, so amplitude ``∝ mAs^-1/2``). The paper draws levels separately; sharing the
draws does not change any level's distribution and makes the comparison between levels far less
noisy (SAN decreases with mAs whenever the model's flip region is star-shaped around x). Runs
under ``torch.inference_mode``; the forward passes are the decisions and therefore fp32
(``autocast`` is accepted for a uniform API but does not change a random attack).

Optimised attacks (section 2.2.2, Algorithm 1, eqs. 2-5)
--------------------------------------------------------
For every sample i and restart k: ``p⁰`` = a random NPS noise sample at the mAs; then, until
``‖pᵗ - pᵗ⁻¹‖₂ / ‖pᵗ⁻¹‖₂ ≤ tol`` or ``n_iter`` steps,

    g  = ∇_p ‖D(x + p) - D(x)‖²  = 2 (D(x+p) - D(x)) ∂D/∂p        (eq. 3's ascent direction)
    pᵗ = Proj(pᵗ⁻¹ + δ · g / rms(g), S_mAs)                        (eqs. 3-5)

- ``D`` is the network's *probability* output as in the paper (its DNN ends in a sigmoid):
  ``sigmoid(z)`` of the canonical binary logit (for ``rating`` models ``z = rating - 3``), or the
  softmax vector for class-logit models. D(x) is the clean fp32 output.
- The step: eq. 3 multiplies the raw gradient by δ, whose size then depends on the network's
  gradient scale (tiny for saturated sigmoids). Here the gradient of each chain is normalised to
  unit RMS per voxel, so ``step_hu`` = δ is the RMS change in HU per voxel per step — comparable
  with the noise σ (σ = 12 HU at 250 mAs for the default NPS) and the same for every model.
  A chain with zero gradient does not move and stops.
- The projection is :func:`ctharden.noise.project_to_nps` with ``pool="sample"``: eq. 5's average
  runs over the slices of one sample (one chain), not over the whole data set as in the paper, so
  chains do not interact, results do not depend on the batch composition, and every final
  perturbation on its own has exactly the NPS of the mAs (stricter than the paper's "on average").
- Each chain stops on its own (tolerance or ``n_iter``); its final ``p`` is ``p_i*(k)``, and the
  restart succeeds if the fp32 prediction on ``x + p_i*(k)`` differs from the clean one. SAR is the
  share of restarts that succeeded, SAN the number of samples with at least one.

Dose mode (``noise_mode="dose"``, :mod:`ctharden.noise.dose`)
----------------------------------------------------------
The default (``"additive"``, the paper) adds the target-mAs NPS noise on top of the image's own
scan noise. With ``noise_mode="dose"`` and ``scan_mas`` ``(N,)`` (each sample's own scan mAs, NaN
where unknown), each sample instead gets what a rescan at the target mAs t would add to its scan at
s: noise of NPS ``a² · NPS_t`` with ``a = sqrt(max(0, 1 − t/s))`` (variance σ²(t) − σ²(s)). Samples
with ``t ≥ s`` get nothing (``a = 0``: no perturbation, never a flip); samples whose mAs is unknown
get the additive noise (``a = 1``). Every level states the counts (``NPSLevelResult.noise``:
dose / none / additive_fallback of n).

- random attack: the common draw at level t is scaled by ``sqrt(ref/t) · a_i(t)`` per sample;
- optimised attack: the start is the target-mAs draw times ``a_i``, eq. 5's constraint is the
  per-sample NPS ``a_i² · S_t`` (``Proj(·, a² S) = a · Proj(·, S)``: the projection keeps phases
  and sets the power spectrum, so scaling the target by a² scales its output by a), and the step
  is ``a_i · δ`` so that it stays the same fraction of the sample's noise σ. Chains with
  ``a_i = 0`` do not run (0 steps; ``mean_steps`` averages the chains that ran).

Additive mode is the code path of before (bit-identical results); fallback samples in dose mode
get the same noise as in additive mode (same random stream).

Batching, determinism
---------------------
No Python loop over samples: the ``N·K`` (sample, try) pairs are processed in chunks of
``batch_size`` (sample-major order). With a ``generator`` the noise comes from it in that order,
so same generator state -> same result. On CPU the result also does not depend on ``batch_size``
when a slice has a multiple of 16 pixels (torch's CPU normal sampler fills blocks of 16; a 32×32
or 224×224 slice qualifies); on CUDA the stream depends on the chunking.

The model runs in eval mode with frozen parameters (:func:`ctharden.attacks.common.attack_mode`);
the caller's flags are restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import Tensor, nn

from ctharden.attacks.common import (
    attack_mode,
    autocast_ctx,
    batch_slices,
    canonical_forward,
    check_int,
    param_dtype,
    use_bf16,
)
from ctharden.attacks.losses import AttackError, OutputAdapter, infer_adapter
from ctharden.attacks.nps_metrics import san, san_rate, sar_above_curve, sar_from_counts
from ctharden.config.choices import NOISE_MODES
from ctharden.core.errors import DataError
from ctharden.noise import default_nps, project_to_nps, sample_nps_noise
from ctharden.noise.dose import DoseCounts, ScanMas, as_scan_mas, count_dose_cases, dose_scale
from ctharden.noise.nps import NPSModel

# ---------------------------------------------------------------------------------------------------
# results


@dataclass
class NPSLevelResult:
    """One mAs level: SAN, SAN/N (%), per-sample SAR (fraction of the K tries that flipped) and
    ``flipped_any`` (``SAR > 0``); ``noise``: in dose mode, how many samples got dose / none /
    additive_fallback noise (None in additive mode)."""

    mas: float
    san: int
    san_rate: float
    sar: np.ndarray  # (N,) float64 in [0, 1]
    flipped_any: np.ndarray  # (N,) bool
    noise: DoseCounts | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "mas": self.mas,
            "san": self.san,
            "san_rate": self.san_rate,
            "mean_sar": float(self.sar.mean()),
            "sar": self.sar.tolist(),
            "flipped_any": self.flipped_any.tolist(),
            "sar_above": sar_above_curve(self.sar),
        }
        if self.noise is not None:
            out["noise"] = self.noise.to_dict()
        return out


@dataclass
class NPSAttackResult:
    """Outcome of a random or optimised NPS attack; ``result[mas]`` is that level's
    :class:`NPSLevelResult`. ``clean_pred``: ``(N,)`` fp32 predicted labels on the clean inputs.
    ``perturbations`` (optimised attack with ``return_perturbations=True``): ``{mas: (N, K, *spatial)}``
    final perturbations in HU (CPU, float32)."""

    attack: str  # "random" | "optimized"
    n: int
    k: int
    clean_pred: np.ndarray
    levels: dict[float, NPSLevelResult]
    settings: dict[str, Any] = field(default_factory=dict)
    perturbations: dict[float, Tensor] | None = None
    index: np.ndarray | None = None  # (N,) the caller's positions of the attacked samples (the evaluation sets it)

    def __getitem__(self, mas: float) -> NPSLevelResult:
        return self.levels[float(mas)]

    @property
    def mas_levels(self) -> list[float]:
        return list(self.levels)

    def table(self) -> list[dict[str, Any]]:
        """Table-2-style rows, one per mAs: attack, mAs, N, K, SAN, SAN/N (%), mean SAR."""
        return [
            {
                "attack": self.attack,
                "mas": lv.mas,
                "n": self.n,
                "k": self.k,
                "san": lv.san,
                "san_rate": lv.san_rate,
                "mean_sar": float(lv.sar.mean()),
            }
            for lv in self.levels.values()
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (no tensors; perturbations are left out)."""
        return {
            "attack": self.attack,
            "n": self.n,
            "k": self.k,
            "clean_pred": self.clean_pred.tolist(),
            "settings": dict(self.settings),
            "levels": [lv.to_dict() for lv in self.levels.values()],
        }


def _level(mas: float, counts: Tensor, k: int, noise: DoseCounts | None = None) -> NPSLevelResult:
    sar = sar_from_counts(counts.cpu().numpy(), k)
    return NPSLevelResult(float(mas), san(sar), san_rate(sar), sar, sar > 0, noise)


# ---------------------------------------------------------------------------------------------------
# inputs


class _WindowedModel(Protocol):
    """A model with its own HU window: ``to_input`` maps HU ``(N, ...)`` to model input ``(N, ...)``."""

    def to_input(self, x: Tensor) -> Tensor: ...


class InputMap:
    """``(x, p_hu) -> model input`` (see "Units and inputs" in the module docstring)."""

    def __init__(self, model: nn.Module, hu_per_unit: float | None) -> None:
        window = getattr(model, "window_hu", None)
        has_to_input = callable(getattr(model, "to_input", None))
        if hu_per_unit is not None:
            h = float(hu_per_unit)
            if not math.isfinite(h) or h <= 0:
                raise AttackError(f"hu_per_unit must be positive and finite, got {hu_per_unit!r}")
            if window is not None:
                raise AttackError(
                    f"the model has its own HU window {window}: pass x in HU and hu_per_unit=None"
                )
            self.mode, self.hu = "display", h
        elif has_to_input and window is not None:
            self.mode, self.hu = "window", 1.0
        elif has_to_input and hasattr(model, "window_hu"):
            raise AttackError(
                "the model takes display-windowed inputs in [0, 1] (window_hu is None): pass x in those "
                "units and hu_per_unit (HU per display unit, e.g. 1400 for a [-1000, 400] window)"
            )
        else:
            self.mode, self.hu = "raw", 1.0
        self.model = model

    def __call__(self, x: Tensor, p: Tensor) -> Tensor:
        if self.mode == "window":
            return cast(_WindowedModel, self.model).to_input(x + p)  # mode 'window': to_input is callable
        if self.mode == "display":
            return (x + p / self.hu).clamp(0.0, 1.0)
        return x + p


def _check_inputs(model: nn.Module, x: Any, spacing_mm: Any) -> Tensor:
    if not isinstance(model, nn.Module):
        raise AttackError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 3:
        raise AttackError("x must be a floating-point tensor (N, ..., H, W): samples with axial slices last")
    if x.shape[0] == 0:
        raise AttackError("x is empty")
    if x.shape[-1] < 2 or x.shape[-2] < 2:
        raise AttackError(f"axial slices must be at least 2x2, got shape {tuple(x.shape)}")
    xw = x.detach()
    dtype = param_dtype(model)
    if dtype is not None and xw.dtype != dtype:
        xw = xw.to(dtype)
    finite = torch.isfinite(xw.flatten(1)).all(1)
    if not finite.all():
        raise AttackError(f"x has non-finite values (sample {int((~finite).nonzero()[0])})")
    return xw


def _check_mas(mas: Any) -> float:
    try:
        m = float(mas)
    except (TypeError, ValueError):
        raise AttackError(f"mAs must be a number, got {mas!r}") from None
    if not math.isfinite(m) or m <= 0:
        raise AttackError(f"mAs must be positive and finite, got {mas!r}")
    return m


def _check_float(name: str, value: Any, *, positive: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AttackError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise AttackError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def _clean(model: nn.Module, x: Tensor, imap: InputMap, batch_size: int) -> tuple[OutputAdapter, Tensor]:
    """Adapter and fp32 canonical clean outputs ``z`` (needs :func:`attack_mode` active)."""
    zs: list[Tensor] = []
    adapter: OutputAdapter | None = None
    with torch.no_grad(), autocast_ctx(x.device, False):
        for sl in batch_slices(x.shape[0], batch_size):
            xb = x[sl]
            raw = model(imap(xb, torch.zeros_like(xb)))
            if adapter is None:
                adapter = infer_adapter(model, raw)
            zs.append(adapter.canonical(raw).float())
    assert adapter is not None
    z = torch.cat(zs)
    if z.shape[0] != x.shape[0]:
        raise AttackError(f"the model returned {z.shape[0]} outputs for {x.shape[0]} samples")
    return adapter, z


def _prob(z: Tensor, adapter: OutputAdapter) -> Tensor:
    """The paper's D: probability output, ``(B, 1)`` (sigmoid) or ``(B, C)`` (softmax)."""
    return torch.sigmoid(z)[:, None] if adapter.binary else torch.softmax(z, dim=1)


def _nps_and_ref(nps: NPSModel | None) -> tuple[NPSModel, float]:
    model = nps if nps is not None else default_nps()
    return model, float(model.ref_mas)


def _scan_mas(noise_mode: str, scan_mas: ScanMas | None, n: int) -> Tensor | None:
    """``(N,)`` float64 CPU scan mAs (NaN unknown) in dose mode, None in additive mode."""
    if noise_mode not in NOISE_MODES:
        raise AttackError(f"noise_mode must be one of {', '.join(NOISE_MODES)}, got {noise_mode!r}")
    if noise_mode == "additive":
        if scan_mas is not None:
            raise AttackError("scan_mas is only used with noise_mode='dose'")
        return None
    try:
        return as_scan_mas(scan_mas, n)
    except DataError as exc:
        raise AttackError(str(exc)) from None


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """``v`` ``(B,)`` shaped ``(B, 1, ...)`` to broadcast over ``like`` ``(B, ...)``, in its dtype/device."""
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


# ---------------------------------------------------------------------------------------------------
# random attacks


def random_nps_attack(
    model: nn.Module,
    x_hu: Tensor,
    mas_levels: Sequence[float],
    k: int,
    spacing_mm: float | tuple[float, float],
    *,
    nps: NPSModel | None = None,
    hu_per_unit: float | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    autocast: bool = False,
    noise_mode: str = "additive",
    scan_mas: ScanMas | None = None,
) -> NPSAttackResult:
    """Random NPS attacks (section 2.2.1): K noise realisations per sample and mAs level.

    Args:
        model: classifier (``CTClassifier`` or any module with a binary-logit/class-logit output).
        x_hu: ``(N, *spatial)`` samples in HU (or display units with ``hu_per_unit``), slices last.
        mas_levels: mAs levels, e.g. ``[10, 50, 100, 200, 500]``.
        k: perturbations per sample and level (K).
        spacing_mm: in-plane pixel size (float or ``(dy, dx)`` mm).
        nps: NPS model (default: :func:`ctharden.noise.default_nps`).
        hu_per_unit: HU per model-input unit for display-windowed data (see the module docstring).
        generator: random source of the noise (reproducible results).
        batch_size: (sample, try) pairs per forward pass.
        autocast: accepted for API symmetry; the forwards are the decisions and run in fp32.
        noise_mode: ``"additive"`` (the paper, default) or ``"dose"`` (see "Dose mode" in the
            module docstring).
        scan_mas: dose mode: ``(N,)`` mAs of each sample's own scan, NaN where unknown (None: all
            unknown, i.e. additive for every sample, counted); must be None in additive mode.

    Returns:
        :class:`NPSAttackResult` with one level per mAs (in the given order); in dose mode every
        level's ``noise`` gives the dose / none / additive_fallback counts.
    """
    check_int("k", k, 1)
    check_int("batch_size", batch_size, 1)
    levels = [_check_mas(m) for m in mas_levels]
    if not levels:
        raise AttackError("mas_levels is empty")
    if len(set(levels)) != len(levels):
        raise AttackError(f"mas_levels has duplicates: {list(mas_levels)}")
    x = _check_inputs(model, x_hu, spacing_mm)
    n = x.shape[0]
    scan = _scan_mas(noise_mode, scan_mas, n)
    nps_model, ref = _nps_and_ref(nps)
    imap = InputMap(model, hu_per_unit)
    scales = [math.sqrt(ref / m) for m in levels]
    # dose mode: per (level, sample) amplitude a = sqrt(max(0, 1 - t/s)), 1 where s is unknown
    dose_a = None if scan is None else torch.stack([dose_scale(m, scan) for m in levels]).to(x.device)
    counts = torch.zeros((len(levels), n), dtype=torch.long, device=x.device)
    with attack_mode(model), torch.inference_mode(), autocast_ctx(x.device, False):
        adapter, z0 = _clean(model, x, imap, batch_size)
        y0 = adapter.predict(z0)
        for sl in batch_slices(n * k, batch_size):
            idx = torch.arange(sl.start, sl.stop, device=x.device) // k  # sample-major order
            xb = x[idx]
            base = sample_nps_noise(xb.shape, ref, spacing_mm, nps=nps_model, generator=generator, device=x.device)
            for m, scale in enumerate(scales):  # common random numbers across mAs levels
                if dose_a is None:
                    z = canonical_forward(model, imap(xb, (base * scale).to(xb.dtype)), adapter, False)
                    counts[m].index_add_(0, idx, (adapter.predict(z) != y0[idx]).long())
                else:
                    a = dose_a[m, idx].float()
                    z = canonical_forward(model, imap(xb, (base * _bcast(a * scale, base)).to(xb.dtype)), adapter,
                                          False)
                    flipped = (adapter.predict(z) != y0[idx]) & (a > 0)  # nothing added: never a flip
                    counts[m].index_add_(0, idx, flipped.long())
    noise = [None if scan is None else count_dose_cases(m, scan) for m in levels]
    result = NPSAttackResult(
        attack="random",
        n=n,
        k=k,
        clean_pred=y0.cpu().numpy(),
        levels={m: _level(m, counts[i], k, noise[i]) for i, m in enumerate(levels)},
        settings={
            "mas_levels": levels,
            "k": k,
            "spacing_mm": spacing_mm if isinstance(spacing_mm, (int, float)) else list(spacing_mm),
            "hu_per_unit": hu_per_unit,
            "decision": "fp32 label(x+p) != label(x)",
        },
    )
    if scan is not None:
        result.settings["noise_mode"] = "dose"
    return result


# ---------------------------------------------------------------------------------------------------
# optimised attacks


def optimized_nps_attack(
    model: nn.Module,
    x_hu: Tensor,
    mas: float,
    spacing_mm: float | tuple[float, float],
    *,
    restarts: int,
    step_hu: float,
    tol: float,
    n_iter: int,
    nps: NPSModel | None = None,
    hu_per_unit: float | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    autocast: bool = False,
    return_perturbations: bool = False,
    noise_mode: str = "additive",
    scan_mas: ScanMas | None = None,
) -> NPSAttackResult:
    """NPS-constrained optimised attack (Algorithm 1): projected gradient ascent on
    ``‖D(x+p) - D(x)‖²`` from ``restarts`` random NPS starts (see the module docstring).

    Args:
        mas: the mAs level whose NPS constrains ``p``.
        restarts: K, random initialisations per sample (SAR = share of restarts that flip).
        step_hu: δ, RMS step per voxel in HU (the gradient is normalised per chain).
        tol: ε, stop a chain when ``‖pᵗ - pᵗ⁻¹‖₂ / ‖pᵗ⁻¹‖₂ ≤ tol``.
        n_iter: N_iter, maximum steps per chain (>= 1).
        autocast: forward/backward of the ascent under bf16 autocast (fp32 models on CPU/CUDA);
            the flip decisions are fp32.
        return_perturbations: keep the final perturbations (``result.perturbations[mas]``,
            ``(N, restarts, *spatial)`` HU on CPU).
        noise_mode, scan_mas: dose mode: the constraint of sample i is the NPS ``a_i² · S_mas``
            (see "Dose mode" in the module docstring).
        Other arguments as in :func:`random_nps_attack`.
    """
    check_int("restarts", restarts, 1)
    check_int("n_iter", n_iter, 1)
    check_int("batch_size", batch_size, 1)
    m = _check_mas(mas)
    step = _check_float("step_hu", step_hu, positive=True)
    tol_v = _check_float("tol", tol, positive=False)
    x = _check_inputs(model, x_hu, spacing_mm)
    n = x.shape[0]
    scan = _scan_mas(noise_mode, scan_mas, n)
    dose_a = None if scan is None else dose_scale(m, scan).float().to(x.device)  # (N,) a per sample
    nps_model, _ = _nps_and_ref(nps)
    imap = InputMap(model, hu_per_unit)
    counts = torch.zeros(n, dtype=torch.long, device=x.device)
    finals: list[Tensor] = []
    steps_taken = torch.zeros(n * restarts, dtype=torch.long)
    with attack_mode(model):
        bf16 = use_bf16(model, x, autocast)
        adapter, z0 = _clean(model, x, imap, batch_size)
        y0 = adapter.predict(z0)
        d0 = _prob(z0, adapter)
        for sl in batch_slices(n * restarts, batch_size):
            idx = torch.arange(sl.start, sl.stop, device=x.device) // restarts
            xb, d0b = x[idx], d0[idx]
            with torch.no_grad():
                p = sample_nps_noise(xb.shape, m, spacing_mm, nps=nps_model, generator=generator, device=x.device)
                p = p.to(xb.dtype)
            ab = None if dose_a is None else dose_a[idx]  # dose mode: (B,) a of each chain
            if ab is not None:
                p = p * _bcast(ab, p)  # start: the target draw scaled to the sample's budget a² · S
            active = torch.ones(idx.shape[0], dtype=torch.bool, device=x.device) if ab is None else ab > 0
            n_steps = torch.zeros(idx.shape[0], dtype=torch.long)
            for _ in range(n_iter):
                act = active.nonzero().squeeze(1)
                if act.numel() == 0:
                    break
                pa, xa = p[act], xb[act]
                with torch.enable_grad():
                    pg = pa.detach().requires_grad_(True)
                    with autocast_ctx(x.device, bf16):
                        raw = model(imap(xa, pg))
                    d = _prob(adapter.canonical(raw).float(), adapter)
                    obj = (d - d0b[act]).square().sum(1)
                    (grad,) = torch.autograd.grad(obj.sum(), pg)
                with torch.no_grad():
                    g = torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0)
                    rms = g.flatten(1).square().mean(1).sqrt()
                    step_c = step if ab is None else step * ab[act]  # dose: δ·a, the same share of σ
                    scale = torch.where(rms > 0, step_c / rms.clamp_min(1e-30), torch.zeros_like(rms))
                    half = pa + (g * scale.reshape(-1, *([1] * (g.dim() - 1)))).to(pa.dtype)
                    new = project_to_nps(half, m, spacing_mm, nps=nps_model, pool="sample")
                    if ab is not None:
                        new = new * _bcast(ab[act], new)  # Proj(·, a²·S) = a · Proj(·, S)
                    rel = (new - pa).flatten(1).norm(dim=1) / pa.flatten(1).norm(dim=1).clamp_min(1e-12)
                    p[act] = new
                    n_steps[act.cpu()] += 1
                    active[act] = rel > tol_v
            with torch.no_grad():
                z = canonical_forward(model, imap(xb, p), adapter, False)
                flipped = adapter.predict(z) != y0[idx]
                if ab is not None:
                    flipped &= ab > 0  # nothing added: never a flip
                counts.index_add_(0, idx, flipped.long())
            steps_taken[sl] = n_steps
            if return_perturbations:
                finals.append(p.detach().float().cpu())
    result = NPSAttackResult(
        attack="optimized",
        n=n,
        k=restarts,
        clean_pred=y0.cpu().numpy(),
        levels={m: _level(m, counts, restarts, None if scan is None else count_dose_cases(m, scan))},
        settings={
            "mas": m, "restarts": restarts, "step_hu": step, "tol": tol_v, "n_iter": n_iter,
            "spacing_mm": spacing_mm if isinstance(spacing_mm, (int, float)) else list(spacing_mm),
            "hu_per_unit": hu_per_unit, "objective": "||D(x+p)-D(x)||^2, D = sigmoid/softmax",
            "projection_pool": "sample", "decision": "fp32 label(x+p) != label(x)",
            "mean_steps": float(steps_taken.float().mean()), "autocast": bool(bf16),
        },
    )
    if dose_a is not None:
        ran = (dose_a > 0).cpu().repeat_interleave(restarts)  # chains in sample-major order
        result.settings["noise_mode"] = "dose"
        result.settings["mean_steps"] = float(steps_taken[ran].float().mean()) if bool(ran.any()) else 0.0
    if return_perturbations:
        result.perturbations = {m: torch.cat(finals).reshape(n, restarts, *x.shape[1:])}
    return result
