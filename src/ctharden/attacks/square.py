"""The Square Attack of Andriushchenko et al. (2020): score-based black-box, L∞ and L2.

"Square Attack: a query-efficient black-box adversarial attack via random search" (ECCV 2020).
Only forward passes of the model's output are used (never a gradient; everything runs under
``torch.no_grad()``), so gradient masking cannot hide a model's weakness from it — the reason
AutoAttack runs it last, on the samples the gradient attacks did not break.

Units and shapes: ε is in *model-input units*; ``x`` is ``(N, C, *S)`` with one or more spatial
dims ``S`` — 2D ``(N, C, H, W)`` or 3D ``(N, C, D, H, W)``. A ``CTClassifier`` input without the
channel axis (``x.dim() == model.spatial_dims + 1``, e.g. ``(N, D, H, W)`` for a 3D model) and
``(N, F)`` inputs are read as ``C = 1``.

Algorithm (random search on the margin loss, per sample)
--------------------------------------------------------
The loss is the logit margin (:func:`ctharden.attacks.losses.margin_loss`, > 0 = misclassified);
a candidate replaces the current iterate when its margin is strictly higher (or it is broken
and the current one is not). A sample stops once broken.

- **Square size** ``s``: a window covers the share ``p`` of the spatial positions,
  ``s = round((p·|S|)^(1/k))`` over the ``k`` spatial dims. ``p`` follows the reference
  implementation's piecewise-constant schedule: ``p_init`` halved after iterations
  10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10000, rescaled to ``queries``
  (``i ↦ ⌊i/queries·10000⌋``). ``p_init`` defaults to 0.05 (L∞, the paper's ImageNet default)
  and 0.1 (L2, the reference's default for L2).
- **L∞**: start from vertical stripes, ``x + ε·σ`` with ``σ = ±1`` per channel and column (constant
  along the second-to-last spatial axis). Each step draws, per sample, a window of side
  ``s ≤ min(S) − 1`` and a sign per channel, and sets the perturbation in the window to ``±ε``
  (a draw that would not change the iterate is re-drawn, as in the reference).
- **L2**: start from a grid of tiles of side ``⌊min(S)/5⌋``, each a "meta pseudo-Gaussian" bump
  (two halves of opposite sign, each a sum of nested boxes weighted ``1/(r+1)²``) with a random
  sign per channel, rescaled to ``‖δ‖₂ = ε``. Each step draws two windows ``W₁, W₂`` of odd side
  ``s ≥ 3``: the perturbation's mass in ``W₂`` is moved to ``W₁`` — ``δ|W₂ ← 0``,
  ``δ|W₁ ← (bump·(±1) + δ|W₁/‖δ|W₁‖)`` rescaled per channel to
  ``√(max(ε² − ‖δ‖², 0)/C + ‖δ|W₁∪W₂‖²)`` — and the whole perturbation is rescaled to norm ε.

Every iterate is projected onto the ε-ball and the clip range. Window positions, signs and the
bump orientation are drawn per sample (the reference draws the L2 windows once per batch).

3D (and any other rank): squares generalise to cubes (boxes of side ``s`` over all spatial dims),
the bumps to nested boxes, the bump's split axis is one of the ``k`` spatial axes (the
reference's random transpose), and the tiles to a grid over all spatial dims. This natural
generalisation is ctharden's; the paper is 2D only.

Queries: ``queries`` is the per-sample budget of forward passes (the initial iterate counts, the
clean pass does not); only samples not yet broken are queried. Samples that are misclassified
already, or have ε = 0, are not attacked (0 queries; ``x_adv = x``). ``broken`` is re-decided by a
plain fp32 forward pass on exactly the returned tensor.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ctharden.attacks.common import (
    NORMS,
    AttackBatch,
    attack_mode,
    batch_mask,
    batch_slices,
    batch_view,
    canonical_forward,
    check_choice,
    check_int,
    check_x,
    prepare_batch,
    project,
    slice_arg,
)
from ctharden.attacks.losses import AttackError, margin_loss

P_INIT: dict[str, float] = {"linf": 0.05, "l2": 0.1}
# the reference's schedule: p_init / 2**j after these iterations (out of 10000)
SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
MAX_REDRAWS = 64  # L∞: re-draws of a window's signs that would not change the iterate


@dataclass
class SquareResult:
    """Outcome of :func:`square_attack_result`: ``x_adv`` (shape and dtype of ``x``), ``broken``
    bool ``(N,)`` (fp32 forward on ``x_adv``) and ``queries`` long ``(N,)`` (model passes spent)."""

    x_adv: Tensor
    broken: Tensor
    queries: Tensor


def p_selection(p_init: float, it: int, queries: int) -> float:
    """The square's share ``p`` at iteration ``it`` of ``queries`` (reference schedule, rescaled)."""
    i = int(it / queries * 10000)
    halvings = sum(i > t for t in SCHEDULE)
    return float(p_init) * 0.5**halvings


# ---------------------------------------------------------------------------------------------------
# geometry on the (n, C, *S) view


def _window_index(starts: Tensor, s: int) -> tuple[Tensor, ...]:
    """Advanced index selecting, per sample, the box ``starts[i] + [0, s)^k`` from a channel-last
    ``(n, *S, C)`` tensor: the result is ``(n, s, ..., s, C)``."""
    n, k = starts.shape
    ar = torch.arange(s, device=starts.device)
    index = [torch.arange(n, device=starts.device).reshape(n, *([1] * k))]
    for d in range(k):
        shape = [n] + [1] * k
        shape[d + 1] = s
        index.append((starts[:, d : d + 1] + ar).reshape(shape))
    return tuple(index)


def _window_mask(starts: Tensor, s: int, spatial: tuple[int, ...]) -> Tensor:
    """Bool ``(n, 1, *S)``: the box ``starts[i] + [0, s)^k`` of each sample."""
    n, k = starts.shape
    mask = torch.ones((n, *([1] * k)), dtype=torch.bool, device=starts.device)
    for d, length in enumerate(spatial):
        ar = torch.arange(length, device=starts.device)
        m = (ar >= starts[:, d : d + 1]) & (ar < starts[:, d : d + 1] + s)
        shape = [n] + [1] * k
        shape[d + 1] = length
        mask = mask & m.reshape(shape)
    return mask.unsqueeze(1)


def _random_starts(n: int, s: int, spatial: tuple[int, ...], g: torch.Generator | None, device: torch.device) -> Tensor:
    """Long ``(n, k)``: a uniformly random box position per sample (every position allowed)."""
    cols = [torch.randint(0, length - s + 1, (n, 1), generator=g, device=device) for length in spatial]
    return torch.cat(cols, dim=1)


def _random_signs(shape: tuple[int, ...], g: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randint(0, 2, shape, generator=g, device=device).float() * 2 - 1


def _pseudo_gaussian(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """The reference's ``pseudo_gaussian_pert_rectangles`` in k dims: nested boxes around the centre
    ``a_d // 2``, box ``r`` weighted ``1/(r+1)²``, L2-normalised (all zeros for an empty shape)."""
    if math.prod(shape) == 0:
        return torch.zeros(shape, device=device)
    m = max(a // 2 + 1 for a in shape)
    weights = 1.0 / torch.arange(1, m + 1, dtype=torch.float32, device=device) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[r] = sum_{t >= r} 1/(t+1)^2
    r = torch.zeros(shape, dtype=torch.long, device=device)
    for d, a in enumerate(shape):
        dist = (torch.arange(a, device=device) - a // 2).abs()
        view = [1] * len(shape)
        view[d] = a
        r = torch.maximum(r, dist.reshape(view))
    bump: Tensor = tail[r]
    normalised: Tensor = bump / bump.norm()
    return normalised


@functools.lru_cache(maxsize=64)
def _meta_bumps(s: int, k: int, device: torch.device) -> Tensor:
    """``(k, s, ..., s)``: the reference's ``meta_pseudo_gaussian_pert`` split along each of the k
    axes (first half +, second half −), L2-normalised. Cached (read-only: callers index copies)."""
    out = []
    for axis in range(k):
        first = tuple(s // 2 if d == axis else s for d in range(k))
        second = tuple(s - s // 2 if d == axis else s for d in range(k))
        bump = torch.cat([_pseudo_gaussian(first, device), -_pseudo_gaussian(second, device)], dim=axis)
        out.append(bump / bump.norm().clamp_min(1e-12))
    return torch.stack(out)


def _l2_per_channel(t: Tensor) -> Tensor:
    """``(n, C, *S)`` -> ``(n, C)`` L2 norms over the spatial dims."""
    norms: Tensor = t.flatten(2).norm(dim=2)
    return norms


def _cl(t: Tensor) -> Tensor:
    """``(n, C, *S)`` -> channel-last ``(n, *S, C)`` view."""
    return t.movedim(1, -1)


# ---------------------------------------------------------------------------------------------------
# the attack on a prepared batch


class _Oracle:
    """Margin and verdict from plain fp32 forward passes on ``(n, C, *S)`` iterates."""

    def __init__(self, model: nn.Module, b: AttackBatch, shape: tuple[int, ...]) -> None:
        self.model, self.b, self.shape = model, b, shape

    def __call__(self, xv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        z = canonical_forward(self.model, xv.reshape(xv.shape[0], *self.shape), self.b.adapter, False)
        m = torch.nan_to_num(margin_loss(z, y, self.b.adapter.binary), nan=float("-inf"))
        return m, self.b.adapter.predict(z) != y


def _linf_init(x: Tensor, eps: Tensor, g: torch.Generator | None) -> Tensor:
    shape = list(x.shape)
    if x.dim() >= 4:  # vertical stripes: constant along the second-to-last spatial axis
        shape[-2] = 1
    sign = _random_signs(tuple(shape), g, x.device)
    return x + batch_view(eps, x) * sign.to(x.dtype)


def _l2_init(x: Tensor, eps: Tensor, g: torch.Generator | None) -> Tensor:
    n, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    k = len(spatial)
    s = max(min(spatial) // 5, 1)
    tiles = tuple(length // s for length in spatial)
    bumps = _meta_bumps(s, k, x.device)  # (k, s, ..., s)
    axis = torch.randint(0, k, (n, *tiles), generator=g, device=x.device)
    sign = _random_signs((n, c, *tiles), g, x.device)
    per_tile = bumps[axis]  # (n, *tiles, s, ..., s)
    # interleave (T1, s, T2, s, ...) and multiply by the per-(sample, channel, tile) sign
    perm = [0] + [p for d in range(k) for p in (1 + d, 1 + k + d)]
    grid = per_tile.permute(perm).unsqueeze(1)  # (n, 1, T1, s, T2, s, ...)
    sign_view = sign.reshape(n, c, *[v for t in tiles for v in (t, 1)])
    grid = (grid * sign_view).reshape(n, c, *[t * s for t in tiles])
    delta = torch.zeros(x.shape, device=x.device)
    offsets = [(length - t * s) // 2 for length, t in zip(spatial, tiles, strict=True)]
    region = (slice(None), slice(None), *[slice(o, o + t * s) for o, t in zip(offsets, tiles, strict=True)])
    delta[region] = grid
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return x + (delta * batch_view(eps / norm, delta)).to(x.dtype)


def _linf_candidate(
    x: Tensor, xb: Tensor, eps: Tensor, s: int, clip: tuple[float, float] | None, g: torch.Generator | None
) -> Tensor:
    n, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    index = _window_index(_random_starts(n, s, spatial, g, x.device), s)
    xw, xbw = _cl(x)[index], _cl(xb)[index]  # (n, s, ..., s, C)
    e = eps.reshape(n, *([1] * len(spatial)), 1).to(x.dtype)
    sign = _random_signs((n, *([1] * len(spatial)), c), g, x.device).to(x.dtype)
    new = xw + e * sign
    if clip is not None:
        new = new.clamp(clip[0], clip[1])
    for _ in range(MAX_REDRAWS):
        stuck = ((new - xbw).abs() < 1e-7).flatten(1).all(1)
        if not bool(stuck.any()):
            break
        redraw = _random_signs((int(stuck.sum()), *([1] * len(spatial)), c), g, x.device).to(x.dtype)
        sign[stuck] = redraw
        new = xw + e * sign
        if clip is not None:
            new = new.clamp(clip[0], clip[1])
    cand = xb.clone()
    _cl(cand)[index] = new
    return cand


def _l2_candidate(
    x: Tensor, xb: Tensor, eps: Tensor, s: int, clip: tuple[float, float] | None, g: torch.Generator | None
) -> Tensor:
    n, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    k = len(spatial)
    delta = (xb - x).float()
    starts1 = _random_starts(n, s, spatial, g, x.device)
    starts2 = _random_starts(n, s, spatial, g, x.device)
    index1 = _window_index(starts1, s)
    mask1, mask2 = _window_mask(starts1, s, spatial), _window_mask(starts2, s, spatial)
    w1 = _cl(delta)[index1]  # (n, s, ..., s, C)
    w1_norm = w1.flatten(1, k).norm(dim=1)  # (n, C)
    img_norm = delta.flatten(1).norm(dim=1)  # (n,)
    union_norm = _l2_per_channel(delta * (mask1 | mask2))  # (n, C)
    bumps = _meta_bumps(s, k, x.device)
    axis = torch.randint(0, k, (n,), generator=g, device=x.device)
    sign = _random_signs((n, c), g, x.device)
    view = (n, *([1] * k), c)
    new = bumps[axis].unsqueeze(-1) * sign.reshape(view) + w1 / (1e-10 + w1_norm.reshape(view))
    new_norm = new.flatten(1, k).norm(dim=1).clamp_min(1e-12)  # (n, C)
    spare = (eps**2 - img_norm**2).clamp_min(0.0)[:, None] / c
    target = (spare + union_norm**2).sqrt()
    new = new * (target / new_norm).reshape(view)
    delta = delta * ~mask2
    _cl(delta)[index1] = new
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return x + (delta * batch_view(eps / norm, delta)).to(x.dtype)


def _attack_batch(
    model: nn.Module,
    b: AttackBatch,
    *,
    norm: str,
    queries: int,
    p_init: float,
    channels_first: bool,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Square Attack on a prepared batch (inside :func:`attack_mode`, under no_grad):
    (x_adv in the working dtype, queries long ``(N,)``)."""
    n = b.x.shape[0]
    shape = tuple(b.x.shape[1:])
    xv = b.x if channels_first else b.x.reshape(n, 1, *shape)  # (N, C, *S)
    spatial = tuple(xv.shape[2:])
    n_spatial = math.prod(spatial)
    k = len(spatial)
    oracle = _Oracle(model, b, shape)
    used = torch.zeros(n, dtype=torch.long, device=b.x.device)
    clean_broken = b.adapter.predict(b.clean_z) != b.y
    idx = (~clean_broken & (b.eps > 0)).nonzero().squeeze(1)
    out = xv.clone()
    if idx.numel() == 0:
        return out.reshape(b.x.shape), used
    x0, y, eps = xv[idx], b.y[idx], b.eps[idx]
    init = _linf_init(x0, eps, generator) if norm == "linf" else _l2_init(x0, eps, generator)
    xb = project(init, x0, eps, norm, b.clip)
    m_best, brk = oracle(xb, y)
    used[idx] += 1
    for i in range(queries - 1):
        keep = ~brk
        if not bool(keep.all()):  # broken samples leave: write them out, drop their state
            out[idx[~keep]] = xb[~keep]
            idx, x0, y, eps = idx[keep], x0[keep], y[keep], eps[keep]
            xb, m_best, brk = xb[keep], m_best[keep], brk[keep]
            if idx.numel() == 0:
                break
        p = p_selection(p_init, i, queries)
        side = round((p * n_spatial) ** (1.0 / k))
        if norm == "linf":
            side = max(min(side, min(spatial) - 1), 1)
            cand = _linf_candidate(x0, xb, eps, side, b.clip, generator)
        else:
            side = max(side, 3)
            side += 1 - side % 2  # odd
            if side > min(spatial):
                side = min(spatial) if min(spatial) % 2 == 1 or min(spatial) < 3 else min(spatial) - 1
            cand = _l2_candidate(x0, xb, eps, side, b.clip, generator)
        cand = project(cand, x0, eps, norm, b.clip)
        m, broken = oracle(cand, y)
        used[idx] += 1
        better = (m > m_best) | (broken & ~brk)
        xb = torch.where(batch_mask(better, xb), cand, xb)
        m_best = torch.where(better, m, m_best)
        brk = brk | broken
    if idx.numel() > 0:
        out[idx] = xb
    return out.reshape(b.x.shape), used


def _channels_first(model: nn.Module, x: Tensor, spatial_dims: int | None) -> bool:
    """Whether dim 1 of ``x`` is a channel axis (else every non-batch dim is spatial)."""
    sd = spatial_dims if spatial_dims is not None else getattr(model, "spatial_dims", None)
    if isinstance(sd, int) and not isinstance(sd, bool):
        if x.dim() == sd + 1:
            return False
        if x.dim() == sd + 2:
            return True
        raise AttackError(f"x has shape {tuple(x.shape)}: expected {sd} spatial dims (with or without a channel axis)")
    return x.dim() >= 3


def square_attack_result(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    norm: str = "linf",
    queries: int = 1000,
    p_init: float | None = None,
    clip: tuple[float, float] | None = (0.0, 1.0),
    output: str | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    spatial_dims: int | None = None,
) -> SquareResult:
    """The Square Attack (Andriushchenko et al. 2020) within an L∞ or L2 ball: see the module doc.

    Args:
        model: a classifier (binary logit, class logits or ``rating`` output); only its outputs
            are used.
        x: ``(N, C, *S)`` inputs in model-input units (see the module doc for channel-less inputs).
        y: ``(N,)`` integer labels.
        eps: radius in model-input units, a float or a tensor ``(N,)``.
        norm: ``"linf"`` or ``"l2"``.
        queries: per-sample budget of model passes (>= 1).
        p_init: initial share of the spatial positions a square covers, in ``(0, 1]``; None ->
            0.05 (L∞) or 0.1 (L2).
        clip: valid input range ``(lo, hi)`` or None.
        output: override the output kind (``logit`` | ``logits2`` | ``rating`` | ``logits``).
        generator: random source (default: torch's global RNG).
        batch_size: attack at most this many samples at once; None = all at once.
        spatial_dims: the number of spatial dims (None: ``model.spatial_dims`` if the model has
            one, else ``x.dim() − 2``); decides whether dim 1 of ``x`` is a channel axis.

    Returns:
        :class:`SquareResult` with ``x_adv`` (shape and dtype of ``x``), ``broken`` (fp32 forward
        on ``x_adv``) and ``queries`` per sample.
    """
    check_choice("norm", norm, NORMS)
    check_int("queries", queries, 1)
    if p_init is None:
        p_init = P_INIT[norm]
    if isinstance(p_init, bool) or not isinstance(p_init, int | float) or not 0.0 < float(p_init) <= 1.0:
        raise AttackError(f"p_init must be a number in (0, 1], got {p_init!r}")
    check_x(x)
    channels_first = _channels_first(model, x, spatial_dims)
    n = x.shape[0]
    y = torch.as_tensor(y, device=x.device)
    advs, used = [], []
    with attack_mode(model), torch.no_grad():
        for sl in batch_slices(n, batch_size):
            b = prepare_batch(model, x[sl], slice_arg(y, sl, n), slice_arg(eps, sl, n), clip, output)
            xa, q = _attack_batch(
                model, b, norm=norm, queries=queries, p_init=float(p_init), channels_first=channels_first,
                generator=generator,
            )
            advs.append(xa)
            used.append(q)
        x_adv = torch.cat(advs).to(x.dtype)
        verdicts = []
        for sl in batch_slices(n, batch_size):  # fp32 verdict on exactly the returned tensor
            rb = prepare_batch(model, x_adv[sl], slice_arg(y, sl, n), 0.0, None, output)
            verdicts.append(rb.adapter.predict(rb.clean_z) != rb.y)
    return SquareResult(x_adv, torch.cat(verdicts), torch.cat(used))


def square_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    norm: str = "linf",
    queries: int = 1000,
    p_init: float | None = None,
    clip: tuple[float, float] | None = (0.0, 1.0),
    output: str | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    spatial_dims: int | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`square_attack_result` as ``(x_adv, broken)``."""
    r = square_attack_result(
        model, x, y, eps, norm=norm, queries=queries, p_init=p_init, clip=clip, output=output,
        generator=generator, batch_size=batch_size, spatial_dims=spatial_dims,
    )
    return r.x_adv, r.broken
