"""Training losses for the three output conventions of :class:`~ctharden.models.CTClassifier`.

- ``mse``: the shen paper's loss, squared error between the sigmoid output and the 0/1 label
  (eq. 1); for ``logits2`` the softmax positive probability; for ``rating`` models, squared error
  between the predicted and the readers' mean 1-5 rating.
- ``ce``: binary cross-entropy on the logit, or cross-entropy over two logits (IMA paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ctharden.config import choices
from ctharden.core.errors import ConfigError

LOSSES = choices.TRAIN_LOSSES


def check_loss(loss: str, output: str) -> None:
    """Raise :class:`ConfigError` if ``loss`` does not apply to models with this ``output``."""
    if loss not in LOSSES:
        raise ConfigError(f"loss must be one of {LOSSES}, got {loss!r}")
    if output == "rating" and loss != "mse":
        raise ConfigError("a rating (five-class regression) model trains with loss 'mse'")


def training_loss(outputs: torch.Tensor, y: torch.Tensor, target: torch.Tensor, output: str, loss: str) -> torch.Tensor:
    """Mean loss over the batch. ``outputs`` as the model returns them; ``y`` (N,) int labels; ``target`` (N,) float."""
    outputs = outputs.float()
    if output == "rating":
        return F.mse_loss(outputs, target)
    if output == "logit":
        if loss == "mse":
            return F.mse_loss(torch.sigmoid(outputs), y.float())
        return F.binary_cross_entropy_with_logits(outputs, y.float())
    if output == "logits2":
        if loss == "mse":
            return F.mse_loss(torch.softmax(outputs, dim=1)[:, 1], y.float())
        return F.cross_entropy(outputs, y)
    raise ConfigError(f"unknown model output kind {output!r}")
