"""The dry run of a model on a sample batch: does it fit its contract, and can it be attacked?

:func:`dry_run` checks, in order, and raises a :class:`DataError` with one line for the first
failure:

1. the batch ``(N, *S)`` / ``(N, 1, *S)`` matches the contract's spatial shape;
2. the forward pass runs and its output has the contract's shape (``logit``/``probability``:
   ``(N,)`` or ``(N, 1)``; ``logits2``: ``(N, 2)``; ``classes``: ``(N, C)``);
3. every output is finite (and a ``probability`` lies in [0, 1]);
4. the forward pass is deterministic in eval mode: two identical forwards agree (to 1e-5 of the
   logit scale). Randomness in the forward (dropout left on, Monte-Carlo sampling, stochastic
   layers) hides gradients and makes every white-box number meaningless, so it is refused;
5. with gradients: the input gradient of the summed logit exists and is finite.

The returned dict states what was checked and measured (the report and ``gate.json`` keep it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ctharden.core.errors import DataError


def _raw_output(model: nn.Module, x: Tensor) -> Tensor:
    net = getattr(model, "net", None)
    to_net = getattr(model, "model_input", None)
    if net is None or to_net is None:
        out: Tensor = model(x)
        return out
    raw: Tensor = net(to_net(x))
    return raw


def dry_run(model: nn.Module, x: Tensor, *, name: str = "model") -> dict[str, Any]:
    """Run the checks of the module docstring on ``x`` ``(N, *S)`` or ``(N, 1, *S)`` in attack units."""
    contract = getattr(model, "contract", None)
    dims = int(getattr(model, "spatial_dims", x.dim() - 2))
    spatial = tuple(x.shape[-dims:])
    if contract is not None and list(spatial) != list(contract.input_shape):
        raise DataError(f"{name}: the data's shape {list(spatial)} does not match the contract's input_shape "
                        f"{list(contract.input_shape)}")
    model.eval()
    with torch.no_grad():
        try:
            raw = _raw_output(model, x)
        except Exception as exc:  # any failure of user code in the forward pass
            raise DataError(f"{name}: the forward pass fails on a batch of shape {list(x.shape)} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        try:
            z1 = model(x)
        except ValueError as exc:
            raise DataError(f"{name}: wrong output shape: {exc}") from None
        z2 = model(x)
    if not bool(torch.isfinite(raw).all()):
        bad = int((~torch.isfinite(raw)).any(dim=tuple(range(1, raw.dim()))).sum()) if raw.dim() > 1 else int(
            (~torch.isfinite(raw)).sum())
        raise DataError(f"{name}: non-finite outputs (NaN or inf) for {bad} of {x.shape[0]} samples")
    if contract is not None and contract.output.kind == "probability" and bool(((raw < 0) | (raw > 1)).any()):
        raise DataError(f"{name}: the contract says probability, but outputs leave [0, 1] "
                        f"(min {float(raw.min()):.3g}, max {float(raw.max()):.3g})")
    scale = max(1.0, float(z1.abs().max()))
    diff = float((z1 - z2).abs().max())
    if diff > 1e-5 * scale:
        raise DataError(f"{name}: the forward pass is not deterministic in eval mode (two identical forwards "
                        f"differ by {diff:.3g} in the logit): randomness hides gradients and invalidates "
                        "white-box numbers; disable dropout / sampling at inference")
    report: dict[str, Any] = {"n": int(x.shape[0]), "input_shape": list(x.shape), "output_shape": list(raw.shape),
                              "deterministic": True, "max_forward_diff": diff, "finite": True}
    if getattr(model, "gradients", True):
        xg = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            try:
                (grad,) = torch.autograd.grad(model(xg).sum(), xg)
            except RuntimeError as exc:
                raise DataError(f"{name}: no input gradient ({str(exc).splitlines()[0]}); export the model with "
                                "autograd support or evaluate it as black-box (ONNX)") from None
        if not bool(torch.isfinite(grad).all()):
            raise DataError(f"{name}: the input gradient has NaN or inf values")
        report["zero_gradient_share"] = float((grad.flatten(1).abs().amax(1) == 0).float().mean())
    report["gradients"] = bool(getattr(model, "gradients", True))
    return report
