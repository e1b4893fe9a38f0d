"""A guard against a oneDNN bug: wrong bf16 weight gradients of small-depth 3D convolutions on CPU.

With torch 2.13 (CPU, oneDNN ``jit_bf16:avx512_core_bf16``), a ``Conv3d`` run under CPU bf16
autocast returns a *wrong weight gradient* when the input's depth (first spatial axis) is
smaller than the kernel's depth and the output has more than one slice — e.g. a 3×3×3 conv
(padding 1) on a 2×H×W input. The values are garbage (relative error ~1 up to 1e36, NaN), and some
shapes corrupt the heap (``free(): invalid next size``). Forward values and input gradients are
correct; fp32 is correct; 2D convolutions are correct. In ctharden this hits the 2³ stage of
``nodule3d_deeper`` and ``resnet18_3d`` (and ``nodule3d`` on 16³ inputs), which then train to NaN
under bf16 autocast.

:class:`GuardedConv3d` is an ``nn.Conv3d`` (same parameters and state_dict) that runs such
convolutions in fp32 when CPU autocast is active and a weight gradient will be computed. These
layers sit at the lowest resolution, so the fp32 detour costs little. Forward-only passes
(evaluation, attacks) keep bf16. ``tests/test_models.py`` checks the weight gradients against
fp32 (and would notice if a torch upgrade fixed or moved the bug).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Measured (kernel depth 3, 5, 7; stride 1, 2; input depth 1..16; 4-8 samples, 16-128 channels):
# wrong exactly when 1 < input depth < kernel depth (and the output has > 1 slice); one case
# (k=7, depth 4) crashed the process. Input depths below kernel depth + margin take the fp32
# path; the margin keeps the neighbouring shapes out of the buggy kernel too.
_MARGIN = 2


def needs_fp32(depth: int, kernel_depth: int) -> bool:
    """True for the input depths at which a bf16 Conv3d weight gradient is not trusted."""
    return depth < kernel_depth + _MARGIN and kernel_depth > 1


class GuardedConv3d(nn.Conv3d):
    """``nn.Conv3d`` that avoids oneDNN's broken bf16 weight gradient for small input depths."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and torch.is_grad_enabled()
            and self.weight.requires_grad
            and needs_fp32(x.shape[2], self.kernel_size[0])
        ):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def guard_conv3d(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Conv3d`` below ``module`` into a :class:`GuardedConv3d`, in place."""
    for m in module.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = GuardedConv3d
    return module
