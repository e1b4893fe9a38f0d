"""What every attack shares: eval mode with frozen parameters, argument checks, the canonical
fp32 forward pass, ε-ball geometry and batching. Attack modules import from here, never each
other's private helpers (see docs/ARCHITECTURE.md, "Attack rules")."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ctharden.attacks.losses import AttackError, OutputAdapter, attack_loss, infer_adapter
from ctharden.config import choices

NORMS = choices.NORMS  # defined once in ctharden.config.choices
ATTACK_LOSSES = choices.ATTACK_LOSSES
# default step: factor * eps / steps (see "Step size" in the module docstring)
STEP_SIZE_FACTOR: dict[str, float] = {"linf": 2.5, "l2": 5.0}


# ---------------------------------------------------------------------------------------------------
# model state


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters inside the block; the caller's state is restored after.

    Restores each module's own ``training`` flag (a partly frozen model keeps its mix) and each
    parameter's ``requires_grad``.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


def param_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def autocast_ctx(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    if enabled:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def canonical_forward(model: nn.Module, xin: Tensor, adapter: OutputAdapter, bf16: bool) -> Tensor:
    """Canonical output (binary logit or class logits) as fp32."""
    with autocast_ctx(xin.device, bf16):
        out = model(xin)
    return adapter.canonical(out).float()


# ---------------------------------------------------------------------------------------------------
# argument handling


@dataclass
class AttackBatch:
    """Validated attack inputs (all on x's device, in the model's parameter dtype)."""

    x: Tensor  # (N, ...) detached, working dtype
    y: Tensor  # (N,) long
    eps: Tensor  # (N,) fp32, >= 0
    clip: tuple[float, float] | None
    adapter: OutputAdapter
    clean_z: Tensor  # canonical fp32 output on x
    dtype: torch.dtype  # caller's dtype of x


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise AttackError(f"{name} must be one of {list(choices)}, got {value!r}")
    return cast(str, value)  # one of ``choices``


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AttackError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def per_sample(name: str, value: float | Tensor, n: int, device: torch.device) -> Tensor:
    """A float or a tensor with one value per sample -> fp32 ``(N,)``; finite and >= 0."""
    if isinstance(value, Tensor):
        t = value.detach().to(device=device, dtype=torch.float32)
        if t.numel() == 1:
            t = t.reshape(()).expand(n)
        elif t.numel() == n:
            t = t.reshape(n)
        else:
            raise AttackError(
                f"{name} must be a float or hold one value per sample ({n}), got shape {tuple(value.shape)}"
            )
    else:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise AttackError(f"{name} must be a float or a tensor, got {value!r}") from None
        t = torch.full((n,), v, device=device, dtype=torch.float32)
    bad = ~torch.isfinite(t) | (t < 0)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AttackError(f"{name} must be finite and >= 0; sample {i} has {t[i].item()!r}")
    return t.contiguous()


def check_x(x: Any) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise AttackError("x must be a floating-point tensor of shape (N, ...) with at least 2 dims")
    if x.shape[0] == 0:
        raise AttackError("x is empty")


def check_clip(clip: Any) -> tuple[float, float] | None:
    if clip is None:
        return None
    try:
        lo, hi = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise AttackError(f"clip must be None or (lo, hi), got {clip!r}") from None
    if not lo < hi:
        raise AttackError(f"clip must have lo < hi, got {clip!r}")
    return (lo, hi)


def check_labels(y: Any, n: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(y, device=device)
    if t.dim() == 2 and t.shape[1] == 1:
        t = t.squeeze(1)
    if t.shape != (n,):
        raise AttackError(f"y must have shape ({n},) to match x, got {tuple(t.shape)}")
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise AttackError("y must hold integer class labels")
    return t.long()


def prepare_batch(
    model: nn.Module,
    x: Tensor,
    y: Any,
    eps: float | Tensor,
    clip: Any,
    output: str | None,
) -> AttackBatch:
    """Validate the arguments; run the clean fp32 forward pass (needs :func:`attack_mode` active)."""
    check_x(x)
    n = x.shape[0]
    clip_range = check_clip(clip)
    xw = x.detach()
    pdtype = param_dtype(model)
    if pdtype is not None and xw.dtype != pdtype:
        xw = xw.to(pdtype)
    if not torch.isfinite(xw).all():
        bad = int((~torch.isfinite(xw.flatten(1))).any(1).nonzero()[0])
        raise AttackError(f"x has non-finite values (sample {bad})")
    if clip_range is not None:
        lo, hi = clip_range
        flat = xw.flatten(1)
        out_of_range = (flat < lo - 1e-6).any(1) | (flat > hi + 1e-6).any(1)
        if out_of_range.any():
            i = int(out_of_range.nonzero()[0])
            raise AttackError(
                f"sample {i} lies outside the clip range {clip_range} "
                f"(min {flat[i].min().item():.4g}, max {flat[i].max().item():.4g}); "
                "attacks take model-input units (CTClassifier.to_input) or pass clip=None"
            )
        xw = xw.clamp(lo, hi)
    labels = check_labels(y, n, x.device)
    eps_t = per_sample("eps", eps, n, x.device)
    with torch.no_grad(), autocast_ctx(x.device, False):
        raw = model(xw)
    adapter = infer_adapter(model, raw, output)
    z = adapter.canonical(raw).float()
    if z.shape[0] != n:
        raise AttackError(f"the model returned {z.shape[0]} outputs for {n} samples")
    n_classes = adapter.n_classes(z)
    if (labels < 0).any() or (labels >= n_classes).any():
        raise AttackError(f"labels must lie in [0, {n_classes - 1}] for a {adapter.kind!r} model")
    return AttackBatch(xw, labels, eps_t, clip_range, adapter, z, x.dtype)


# ---------------------------------------------------------------------------------------------------
# geometry


def batch_view(t: Tensor, like: Tensor) -> Tensor:
    """``(N,)`` -> ``(N, 1, ..., 1)`` broadcastable against ``like``."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def batch_mask(m: Tensor, like: Tensor) -> Tensor:
    """Bool ``(N,)`` -> ``(N, 1, ..., 1)``."""
    return m.reshape(-1, *([1] * (like.dim() - 1)))


def flat_norm(t: Tensor, norm: str) -> Tensor:
    """Per-sample norm over all non-batch dims, fp32 ``(N,)``."""
    f = t.flatten(1).float()
    return f.abs().amax(dim=1) if norm == "linf" else f.norm(dim=1)


def random_in_ball(x: Tensor, eps: Tensor, norm: str, generator: torch.Generator | None = None) -> Tensor:
    """A random perturbation inside the ε-ball: L∞ uniform; L2 uniform direction × radius ε·U, U ~ U(0, 1)."""
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        return ((2 * u - 1) * batch_view(eps, u)).to(x.dtype)
    direction = random_on_sphere(x, torch.ones_like(eps), generator)
    r = torch.rand(eps.shape, generator=generator, device=x.device, dtype=torch.float32)
    return direction * batch_view(eps * r, direction)


def random_on_sphere(x: Tensor, radius: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random direction per sample scaled to L2 norm ``radius`` ``(N,)``."""
    g = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    g = g / batch_view(flat_norm(g, "l2").clamp_min(1e-12), g)
    return (g * batch_view(radius, g)).to(x.dtype)


def project(xa: Tensor, x: Tensor, eps: Tensor, norm: str, clip: tuple[float, float] | None) -> Tensor:
    """Project the iterate ``xa`` onto the ε-ball around ``x``, then onto the clip range."""
    delta = xa - x
    if norm == "linf":
        e = batch_view(eps, delta)
        delta = torch.maximum(torch.minimum(delta, e), -e)
    else:
        n = flat_norm(delta, "l2")
        factor = (eps / n.clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * batch_view(factor, delta)
    xa = x + delta
    if clip is not None:
        xa = xa.clamp(clip[0], clip[1])
    return xa


def ascent_direction(grad: Tensor, norm: str) -> Tensor:
    g = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if norm == "linf":
        return g.sign()
    return g / batch_view(flat_norm(g, "l2").clamp_min(1e-12), g)


def default_step_size(eps: Tensor, steps: int, norm: str = "linf") -> Tensor:
    """Per-sample default step: L∞ ``2.5·ε/steps``, L2 ``5·ε/steps``."""
    return STEP_SIZE_FACTOR[norm] * eps / steps




# ---------------------------------------------------------------------------------------------------
# batching


def use_bf16(model: nn.Module, x: Tensor, autocast: bool) -> bool:
    return bool(autocast) and param_dtype(model) == torch.float32 and x.device.type in ("cpu", "cuda")


LossFn = Callable[[str, Tensor, Tensor, bool], Tensor]


def fp32_verdict(model: nn.Module, xa: Tensor, b: AttackBatch, loss: str,
                 loss_fn: LossFn = attack_loss) -> tuple[Tensor, Tensor]:
    """Plain (fp32, no autocast) forward on exactly ``xa``: ``(broken (N,), loss (N,))`` with the
    attack loss ``loss_fn(loss, ...)`` per sample, NaN -> -inf (the attacks' worst-case bookkeeping)."""
    with torch.no_grad():
        z = canonical_forward(model, xa, b.adapter, False)
        broken = b.adapter.predict(z) != b.y
        score = torch.nan_to_num(loss_fn(loss, z, b.y, b.adapter.binary), nan=float("-inf"))
    return broken, score


def slice_arg(value: Any, sl: slice, n: int) -> Any:
    """A chunk ``sl`` of a per-sample argument: tensors with one value per sample (ε, step size,
    labels) follow the chunk; scalars pass through."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n and value.numel() > 1:
        return value[sl]
    return value


def repeat_over_eps(x: Tensor, y: Tensor, eps_values: Sequence[float]) -> tuple[Tensor, Tensor, Tensor]:
    """One batch for an attack at every ε: ``x`` ``(N, ...)`` and ``y`` ``(N,)`` repeated once per
    ε (ε-major: rows ``i·N … (i+1)·N`` belong to ``eps_values[i]``) and the per-sample ε ``(N·M,)``."""
    n, m = x.shape[0], len(eps_values)
    xs = x.repeat(m, *([1] * (x.dim() - 1)))
    ys = torch.as_tensor(y, device=x.device).repeat(m)
    eps = torch.tensor([float(e) for e in eps_values], dtype=torch.float32, device=x.device).repeat_interleave(n)
    return xs, ys, eps


def batch_slices(n: int, batch_size: int | None) -> list[slice]:
    if batch_size is None:
        return [slice(0, n)]
    check_int("batch_size", batch_size, 1)
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
