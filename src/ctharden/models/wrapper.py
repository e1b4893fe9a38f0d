"""The model wrapper: backbone + input scale + output convention, saved and rebuilt together.

Input scale (the one documented place where HU becomes model input)
-------------------------------------------------------------------
Every model in ctharden takes inputs in *model-input units*, the interval ``[0, 1]``.

- ``nodule3d`` cubes are stored in Hounsfield units. :meth:`CTClassifier.to_input` maps them
  through the model's HU window ``(lo, hi)`` (default ``(-1000, 400)``: air to dense soft
  tissue/bone edge, the lung window used for nodules)::

      x = clamp((hu - lo) / (hi - lo), 0, 1)          # -1000 HU -> 0, 400 HU -> 1

  Voxels outside the window saturate (bone above 400 HU reads as 1).
- ``covid2d`` slices are already display values in ``[0, 1]``; those models have
  ``window_hu=None`` and ``to_input`` is the identity.

Units of ε
----------
Attacks perturb model inputs, so every ε (L∞ radius, PGD step, IMA margin) is in model-input
units. Inside the window the map is affine with slope ``1 / (hi - lo)``, hence

    ε_HU = ε · (hi - lo)        (:meth:`CTClassifier.eps_to_hu`; 1/1400 -> 1 HU for the default)
    ε    = ε_HU / (hi - lo)     (:meth:`CTClassifier.hu_to_eps`)

NPS noise is generated in HU and added to the HU cube *before* ``to_input``; a noise of ``n`` HU
therefore moves an in-window voxel by ``n / (hi - lo)`` model-input units (less where clamped).
For ``window_hu=None`` models there is no HU equivalent and the conversions raise.

Output conventions (``CTClassifier.output``)
--------------------------------------------
- ``"logit"``: binary, ``forward`` returns ``(N,)`` logits; positive score ``sigmoid(logit)``.
- ``"logits2"``: two-class, ``(N, 2)`` logits; positive score ``softmax(logits)[:, 1]``.
- ``"rating"``: regression of the 1-5 malignancy rating, ``(N,)``; positive score
  ``clamp((r - 1) / 4, 0, 1)``, so score 0.5 <=> rating 3 (the paper's label threshold: malignant
  means rating > 3).

In every case the predicted label is ``positive_score > 0.5`` (:func:`predicted_label`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ctharden.core.errors import ConfigError
from ctharden.models.bf16_guard import guard_conv3d

OUTPUTS: tuple[str, ...] = ("logit", "logits2", "rating")
DEFAULT_WINDOW_HU: tuple[float, float] = (-1000.0, 400.0)


def check_window(window_hu: Any) -> tuple[float, float] | None:
    """Normalise a window to ``(lo, hi)`` floats (or None); :class:`ConfigError` if it is invalid."""
    if window_hu is None:
        return None
    try:
        lo, hi = (float(v) for v in window_hu)
    except (TypeError, ValueError):
        raise ConfigError(f"window_hu must be null or [lo, hi] in HU, got {window_hu!r}") from None
    if not (lo < hi) or not all(abs(v) < float("inf") for v in (lo, hi)):
        raise ConfigError(f"window_hu must be finite with lo < hi, got {window_hu!r}")
    return (lo, hi)


class CTClassifier(nn.Module):
    """Backbone + the input scale + the output convention, saved and rebuilt together.

    Build it with :func:`ctharden.models.build_model`; rebuild it from :meth:`config` with
    :func:`ctharden.models.model_from_config` and then ``load_state_dict``.

    Attributes:
        arch: registry name, e.g. ``"nodule3d_bn"``.
        arch_kwargs: the (JSON-normalised) keyword arguments of the architecture, defaults included.
        spatial_dims: 2 or 3.
        output: ``"logit"``, ``"logits2"`` or ``"rating"`` (see the module docstring).
        window_hu: ``(lo, hi)`` HU window mapped to [0, 1] by :meth:`to_input`; None when the raw
            data are already in [0, 1].
        net: the backbone, mapping ``(N, 1, *spatial)`` to ``(N, 1)`` or ``(N, 2)``. Its
            ``Conv3d`` layers become :class:`~ctharden.models.bf16_guard.GuardedConv3d` (same
            weights), which sidesteps a oneDNN bf16 weight-gradient bug on CPU.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        arch: str,
        arch_kwargs: dict[str, Any],
        spatial_dims: int,
        output: str,
        window_hu: tuple[float, float] | None,
    ) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ConfigError(f"output must be one of {OUTPUTS}, got {output!r}")
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.net = guard_conv3d(net)  # CPU bf16 autocast: see ctharden.models.bf16_guard
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs)
        self.spatial_dims = int(spatial_dims)
        self.output = output
        self.window_hu = check_window(window_hu)
        self._channels_last = False

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """``x``: model-input units, ``(N, *spatial)`` or ``(N, 1, *spatial)``.

        Returns ``(N,)`` for ``logit``/``rating`` models, ``(N, 2)`` for ``logits2``.
        """
        if x.dim() == self.spatial_dims + 1:
            x = x.unsqueeze(1)
        elif x.dim() != self.spatial_dims + 2 or x.shape[1] != 1:
            raise ValueError(
                f"{self.arch}: expected input (N, *spatial) or (N, 1, *spatial) with "
                f"{self.spatial_dims} spatial dims, got shape {tuple(x.shape)}"
            )
        if self._channels_last:
            x = x.contiguous(memory_format=_channels_last_format(self.spatial_dims))
        out: Tensor = self.net(x)
        if self.output == "logits2":
            return out
        return out.squeeze(-1)

    # ------------------------------------------------------------------ units
    def to_input(self, raw: Tensor) -> Tensor:
        """Raw dataset values -> model-input units: ``clamp((raw - lo) / (hi - lo), 0, 1)``.

        Identity when ``window_hu`` is None. Shapes are unchanged.
        """
        if self.window_hu is None:
            return raw
        lo, hi = self.window_hu
        return ((raw - lo) / (hi - lo)).clamp(0.0, 1.0)

    def _window_width(self) -> float:
        if self.window_hu is None:
            raise ConfigError(
                f"model {self.arch} takes inputs already in [0, 1] (window_hu is None): "
                "there is no HU equivalent of its ε"
            )
        lo, hi = self.window_hu
        return hi - lo

    def eps_to_hu(self, eps: float | Tensor) -> float | Tensor:
        """ε in model-input units -> HU: ``eps * (hi - lo)``. Raises :class:`ConfigError` without a window."""
        return eps * self._window_width()

    def hu_to_eps(self, eps_hu: float | Tensor) -> float | Tensor:
        """ε in HU -> model-input units: ``eps_hu / (hi - lo)``. Raises :class:`ConfigError` without a window."""
        return eps_hu / self._window_width()

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        """Everything :func:`~ctharden.models.model_from_config` needs (JSON-serialisable)."""
        return {
            "arch": self.arch,
            "arch_kwargs": dict(self.arch_kwargs),
            "spatial_dims": self.spatial_dims,
            "window_hu": None if self.window_hu is None else list(self.window_hu),
            "output": self.output,
        }

    # ------------------------------------------------------------------ speed
    def to_channels_last(self, enabled: bool = True) -> CTClassifier:
        """Use ``channels_last`` (2D) / ``channels_last_3d`` (3D) weights and inputs; returns self.

        A runtime setting only (not part of :meth:`config`); outputs are unchanged up to rounding.
        """
        fmt = _channels_last_format(self.spatial_dims) if enabled else torch.contiguous_format
        self._channels_last = enabled
        for module in self.modules():
            for _name, param in module.named_parameters(recurse=False):
                if param.dim() == self.spatial_dims + 2:
                    param.data = param.data.contiguous(memory_format=fmt)
        return self

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, arch_kwargs={self.arch_kwargs}, spatial_dims={self.spatial_dims}, "
            f"output={self.output!r}, window_hu={self.window_hu}"
        )


def _channels_last_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def positive_score(outputs: Tensor, output: str) -> Tensor:
    """``(N,)`` float32 score in [0, 1] for the positive class (malignant / COVID).

    ``logit`` -> sigmoid; ``logits2`` -> softmax[:, 1]; ``rating`` -> ``clamp((r - 1) / 4, 0, 1)``
    (score 0.5 <=> rating 3, the label threshold).
    """
    outputs = outputs.float()
    if output == "logit":
        return torch.sigmoid(outputs)
    if output == "logits2":
        return torch.softmax(outputs, dim=1)[:, 1]
    if output == "rating":
        return ((outputs - 1.0) / 4.0).clamp(0.0, 1.0)
    raise ConfigError(f"unknown model output kind {output!r} (expected one of {OUTPUTS})")


def predicted_label(outputs: Tensor, output: str) -> Tensor:
    """``(N,)`` long: 1 where :func:`positive_score` > 0.5 (for ``rating``: rating > 3)."""
    return (positive_score(outputs, output) > 0.5).long()
