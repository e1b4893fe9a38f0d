"""Output adapters and attack losses for binary and multi-class classifiers.

Every attack in :mod:`ctharden.attacks` sees a model through :class:`OutputAdapter`, which turns the
model's raw output into one of two canonical forms:

- **binary logit** ``z`` of shape ``(N,)``: predicted label ``1`` iff ``z > 0``. Models whose output
  is ``(N,)`` or ``(N, 1)`` (``CTClassifier.output == "logit"``), and ``"rating"`` models through
  the documented adapter ``z = rating - 3`` (a rating above 3 means malignant, the same threshold as
  :func:`ctharden.models.predicted_label`).
- **class logits** ``z`` of shape ``(N, C)`` with ``C >= 2``: predicted label ``argmax z``
  (``CTClassifier.output == "logits2"`` and any multi-class model).

Losses (per sample, larger = more adversarial; the attack *ascends* them):

=========  ===========================================  =========================================
loss       binary logit ``z``, label ``y`` in {0, 1}     class logits ``z``, label ``y``
=========  ===========================================  =========================================
``ce``     ``BCEWithLogits(z, y)``                       ``CrossEntropy(z, y)``
``margin`` ``z`` if y = 0, ``-z`` if y = 1               ``max_{j != y} z_j - z_y``
=========  ===========================================  =========================================

The margin is the signed logit margin: positive when the sample is misclassified. For a binary
logit ``BCE = softplus(margin)``, so the two losses order iterates the same way but their gradients
differ in scale (CE's vanishes on confidently classified samples; the margin's does not). DLR-type
losses need at least three classes and are not offered (see ``docs/ARCHITECTURE.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctharden.core.errors import ConfigError

LOSSES: tuple[str, ...] = ("ce", "margin")
KINDS: tuple[str, ...] = ("logit", "logits2", "rating", "logits")


class AttackError(ConfigError, ValueError):
    """Bad attack arguments (norm, loss, ε, shapes, labels). A :class:`ConfigError` and a ValueError."""


@dataclass(frozen=True)
class OutputAdapter:
    """How to read a model's output. ``kind``: ``logit`` | ``rating`` | ``logits2`` | ``logits``.

    ``logit`` and ``rating`` are binary (a single score per sample); ``logits2``/``logits`` are
    class logits ``(N, C)``. :meth:`canonical` maps raw outputs to the canonical form.
    """

    kind: str

    @property
    def binary(self) -> bool:
        return self.kind in ("logit", "rating")

    def canonical(self, out: Tensor) -> Tensor:
        """Raw model output -> binary logit ``(N,)`` or class logits ``(N, C)`` (same dtype)."""
        if self.binary:
            if out.dim() == 2 and out.shape[1] == 1:
                out = out.squeeze(1)
            if out.dim() != 1:
                raise AttackError(f"a {self.kind!r} model must output (N,) or (N, 1), got {tuple(out.shape)}")
            return out - 3.0 if self.kind == "rating" else out
        if out.dim() != 2 or out.shape[1] < 2:
            raise AttackError(f"a class-logit model must output (N, C) with C >= 2, got {tuple(out.shape)}")
        return out

    def predict(self, z: Tensor) -> Tensor:
        """Canonical output -> predicted label ``(N,)`` long."""
        if self.binary:
            return (z > 0).long()
        return z.argmax(dim=1)

    def n_classes(self, z: Tensor) -> int:
        return 2 if self.binary else int(z.shape[1])


def infer_adapter(model: nn.Module, out: Tensor | None = None, output: str | None = None) -> OutputAdapter:
    """The adapter for ``model``: ``output`` if given, else ``model.output`` (a
    :class:`~ctharden.models.CTClassifier`), else inferred from the output shape ``out``:
    ``(N,)``/``(N, 1)`` -> binary logit, ``(N, C >= 2)`` -> class logits."""
    kind = output if output is not None else getattr(model, "output", None)
    if isinstance(kind, str):
        if kind not in KINDS:
            raise AttackError(f"output must be one of {KINDS}, got {kind!r}")
        return OutputAdapter(kind)
    if out is None:
        raise AttackError("cannot infer the model's output kind without a sample output")
    if out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1):
        return OutputAdapter("logit")
    if out.dim() == 2 and out.shape[1] >= 2:
        return OutputAdapter("logits")
    raise AttackError(f"unsupported model output shape {tuple(out.shape)}: expected (N,), (N, 1) or (N, C)")


def margin_loss(z: Tensor, y: Tensor, binary: bool) -> Tensor:
    """Signed margin per sample (positive = misclassified). ``z`` canonical, ``y`` long ``(N,)``."""
    if binary:
        return torch.where(y == 1, -z, z)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf"))
    return other.amax(dim=1) - z_y


def ce_loss(z: Tensor, y: Tensor, binary: bool) -> Tensor:
    """Cross-entropy per sample (BCE-with-logits for a binary logit)."""
    if binary:
        return F.binary_cross_entropy_with_logits(z, y.to(z.dtype), reduction="none")
    return F.cross_entropy(z, y, reduction="none")


def attack_loss(name: str, z: Tensor, y: Tensor, binary: bool) -> Tensor:
    """Per-sample loss ``name`` (``ce`` | ``margin``), computed in fp32."""
    z = z.float()
    if name == "ce":
        return ce_loss(z, y, binary)
    if name == "margin":
        return margin_loss(z, y, binary)
    raise AttackError(f"loss must be one of {LOSSES}, got {name!r}")
