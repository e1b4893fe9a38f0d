"""Batched inference: model outputs and positive-class scores, in eval mode without gradients."""

from __future__ import annotations

from typing import cast

import numpy as np
import torch

from ctharden.core.device import Runtime, eval_mode
from ctharden.models import positive_score


def predict_scores(
    model: torch.nn.Module, x: torch.Tensor, runtime: Runtime, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(outputs, scores)`` for ``x`` ``(N, *spatial)`` in model-input units.

    ``outputs`` are the raw model outputs as float32 numpy (``(N,)`` or ``(N, 2)``); ``scores``
    ``(N,)`` the positive-class score in [0, 1] (:func:`ctharden.models.positive_score`).
    """

    outs, scores = [], []
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(runtime.device, non_blocking=True)
            with runtime.autocast():
                out = model(xb)
            out = out.float()
            outs.append(out.cpu())
            scores.append(positive_score(out, cast(str, model.output)).float().cpu())  # a CTClassifier
    if not outs:
        return np.zeros((0,), np.float32), np.zeros((0,), np.float32)
    return torch.cat(outs).numpy(), torch.cat(scores).numpy()
