"""A model ctharden did not build, behind the interface every attack and evaluation uses.

:class:`ExternalClassifier` wraps any ``nn.Module`` (TorchScript, a ``torch.export`` program, a
user's own network, an ONNX session) with its :class:`~ctharden.config.schema.ModelContract` and
presents what a :class:`~ctharden.models.CTClassifier` presents:

- inputs ``(N, *S)`` or ``(N, 1, *S)`` in *attack units* ``[0, 1]``: ``to_input`` maps HU through the contract's
  window (``window``), through the attack window and then the z-score inside ``forward``
  (``zscore``), or takes display values as they are (``display``). So every attack keeps its
  clip range ``[0, 1]`` and ε is in the same units as for ctharden's own models;
- one binary logit ``(N,)`` (``output = "logit"``), from whatever the model returns: a logit; two
  logits (``z[:, pos] - z[:, 1 - pos]``); a probability (``log p - log(1 - p)``); C-class logits
  (``z[:, pos] - logsumexp(z[:, others])``, the log-odds of the positive class);
- ``eps_to_hu`` / ``hu_to_eps`` and :meth:`eps_to_model_units`, the radius in the model's own
  input units (``window``/``display``: the same; ``zscore``: ``ε · (hi - lo) / std_hu``).

``gradients`` is False for a model without autograd (ONNX): the white-box attacks are then not
applicable and the evaluation says so.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import torch
from torch import Tensor, nn

from ctharden.config.schema import ModelContract

#: The attack window of a z-score model (HU): the whole range of 12-bit CT, so nothing is clamped.
ZSCORE_WINDOW_HU: tuple[float, float] = (-1024.0, 3071.0)


class ExternalClassifier(nn.Module):
    """An external network ``net`` with its contract; see the module docstring.

    Attributes:
        net: the wrapped module (its parameters are the ones a hardening run fine-tunes).
        contract: the validated :class:`ModelContract`.
        source: where it came from (``torchscript``, ``export``, ``mlflow``, ``factory``, ``onnx``).
        gradients: whether input gradients exist (False for ONNX).
        trainable: whether :mod:`ctharden.hardening` can fine-tune it.
    """

    output = "logit"

    def __init__(self, net: nn.Module, contract: ModelContract, source: str, *, gradients: bool = True,
                 trainable: bool = True) -> None:
        super().__init__()
        self.net = net
        self.contract = contract
        self.source = source
        self.gradients = gradients
        self.trainable = trainable
        self.spatial_dims = contract.spatial_dims
        self.arch = f"external:{source}"
        scaling = contract.input
        if scaling.kind == "display":
            self.window_hu: tuple[float, float] | None = None
        elif scaling.window_hu is not None:
            self.window_hu = (float(scaling.window_hu[0]), float(scaling.window_hu[1]))
        else:
            self.window_hu = ZSCORE_WINDOW_HU

    # ------------------------------------------------------------------------------ input side

    def to_input(self, raw: Tensor) -> Tensor:
        """Raw data (HU, or display values for ``display``) ``(N, 1, *S)`` -> attack units [0, 1]."""
        if self.window_hu is None:
            return raw.float()
        lo, hi = self.window_hu
        return ((raw.float() - lo) / (hi - lo)).clamp(0.0, 1.0)

    def model_input(self, x: Tensor) -> Tensor:
        """Attack units ``(N, *S)`` or ``(N, 1, *S)`` -> what ``net`` takes ``(N, channels, *S)``."""
        if x.dim() == self.spatial_dims + 1:
            x = x.unsqueeze(1)
        elif x.dim() != self.spatial_dims + 2 or x.shape[1] != 1:
            raise ValueError(f"{self.arch}: expected input (N, *spatial) or (N, 1, *spatial) with "
                             f"{self.spatial_dims} spatial dims, got shape {tuple(x.shape)}")
        scaling = self.contract.input
        if scaling.kind == "zscore":
            assert self.window_hu is not None and scaling.mean_hu is not None and scaling.std_hu is not None
            lo, hi = self.window_hu
            x = (lo + x * (hi - lo) - scaling.mean_hu) / scaling.std_hu
        if self.contract.channels > 1:
            x = x.expand(-1, self.contract.channels, *x.shape[2:])
        return x

    def _width(self) -> float:
        if self.window_hu is None:
            raise ValueError("a display-scaled model has no HU equivalent of ε")
        return self.window_hu[1] - self.window_hu[0]

    def eps_to_hu(self, eps: float | Tensor) -> float | Tensor:
        """ε in attack units -> HU (``ε · (hi - lo)``)."""
        return eps * self._width()

    def hu_to_eps(self, eps_hu: float | Tensor) -> float | Tensor:
        """HU -> ε in attack units."""
        return eps_hu / self._width()

    def eps_to_model_units(self, eps: float) -> float:
        """ε in attack units -> the same radius in the model's own input units."""
        scaling = self.contract.input
        if scaling.kind == "zscore":
            assert scaling.std_hu is not None
            return eps * self._width() / scaling.std_hu
        return eps

    # ------------------------------------------------------------------------------ output side

    def canonical(self, z: Tensor) -> Tensor:
        """The net's raw output -> one binary logit ``(N,)`` (see the module docstring)."""
        out = self.contract.output
        n = z.shape[0]
        if out.kind in ("logit", "probability"):
            if z.dim() > 2 or (z.dim() == 2 and z.shape[1] != 1):
                raise ValueError(f"a {out.kind} output must be (N,) or (N, 1), got {tuple(z.shape)}")
            z = z.reshape(n)
            if out.kind == "probability":
                p = z.float().clamp(1e-7, 1 - 1e-7)
                return torch.log(p) - torch.log1p(-p)
            return z
        if z.dim() != 2:
            raise ValueError(f"a {out.kind} output must be (N, C), got {tuple(z.shape)}")
        c = z.shape[1]
        want = 2 if out.kind == "logits2" else out.classes
        if (want is not None and c != want) or c < 2 or out.positive_index >= c:
            raise ValueError(f"a {out.kind} output with positive class {out.positive_index} needs "
                             f"{want or 'C >= 2'} columns, got {tuple(z.shape)}")
        pos = z[:, out.positive_index]
        others = torch.cat([z[:, : out.positive_index], z[:, out.positive_index + 1 :]], 1)
        return pos - torch.logsumexp(others, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(N, *S)`` or ``(N, 1, *S)`` in attack units -> binary logit ``(N,)``."""
        return self.canonical(self.net(self.model_input(x)))

    def train(self, mode: bool = True) -> ExternalClassifier:
        """Set the mode of the wrapper and of ``net`` where it has one to set (a ``torch.export``
        program is fixed in the mode it was exported in, an ONNX session has none)."""
        self.training = mode
        try:
            self.net.train(mode)
        except NotImplementedError:
            pass
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ExternalClassifier:
        """A copy with its own parameters. A TorchScript ``net`` is copied through its own
        serialisation: ``copy.deepcopy`` of a ScriptModule gives non-leaf parameters that no
        optimizer accepts (torch 2.13), which would stop hardening a TorchScript model."""
        if isinstance(self.net, torch.jit.ScriptModule):
            buffer = io.BytesIO()
            torch.jit.save(self.net, buffer)
            buffer.seek(0)
            net: nn.Module = torch.jit.load(buffer)  # type: ignore[no-untyped-call]
        else:
            net = copy.deepcopy(self.net, memo)
        twin = ExternalClassifier(net, self.contract.model_copy(deep=True), self.source, gradients=self.gradients,
                                  trainable=self.trainable)
        return twin.train(self.training)

    def config(self) -> dict[str, Any]:
        """The contract and the source (what the registry tags and the report show)."""
        return {"arch": self.arch, "source": self.source, "contract": self.contract.model_dump(mode="json"),
                "gradients": self.gradients, "trainable": self.trainable}

    def extra_repr(self) -> str:
        return f"source={self.source}, contract={self.contract.model_dump(mode='json')}"
