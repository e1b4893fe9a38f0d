"""ResNet-18 from MONAI with instance normalisation (ma et al. 2020, section 3.3).

The IMA paper's COVID-19 model is a ResNet-18 (He et al. 2016) with a two-class output layer and
batch norm replaced by instance norm. ctharden builds it with MONAI 1.6.1::

    monai.networks.nets.resnet18(spatial_dims=2, n_input_channels=1, num_classes=2,
                                 norm=("instance", {"affine": True}), conv1_t_stride=2)

- ``norm="instance"`` alone fails in MONAI (no ``affine`` default); the tuple form works.
- **Trap:** MONAI 1.6.1's ``ResNet`` applies ``norm`` to the stem only. ``ResNet.__init__``
  calls ``_make_layer`` without it, so all 19 norm layers inside the residual blocks (and their
  shortcuts) silently stay ``BatchNorm``. :func:`build_resnet18` replaces every BatchNorm by
  the requested norm, so the model really is instance-normalised (checked in the tests).
  Instance norm normalises each sample by itself, in train and eval mode alike (no running
  statistics), so a sample's output never depends on the rest of its batch.
- MONAI's ``conv1_t_stride`` defaults to 1 on *every* axis, unlike He et al.'s stride-2 7×7
  stem; at 224×224 that runs the whole network at 4× the resolution (≈ 4× the compute). The
  2D default here is ``conv1_t_stride=2`` (224 → 112 → 56 after the max-pool → 7×7 at the end),
  the standard ResNet-18.
- 3D (``resnet18_3d``, for 32³ nodule cubes): ``conv1_t_stride=2, no_max_pool=True`` gives
  32 → 16 → 16 → 8 → 4 → 2 per axis. With the max-pool as well the last stage would be 1³,
  where instance norm has one voxel per channel to normalise (its output would not depend on
  the input; PyTorch refuses it in training).

Any of MONAI's ``ResNet`` keyword arguments can be overridden through ``build_model`` (e.g.
``widen_factor=0.5``), except the channel count, the class count and ``spatial_dims``.
"""

from __future__ import annotations

from typing import Any

from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets.resnet import resnet18
from torch import nn

RESNET_DEFAULTS: dict[int, dict[str, Any]] = {
    2: {"norm": ["instance", {"affine": True}], "conv1_t_stride": 2},
    3: {"norm": ["instance", {"affine": True}], "conv1_t_stride": 2, "no_max_pool": True},
}
_FIXED = ("spatial_dims", "n_input_channels", "num_classes", "pretrained", "feed_forward")


def build_resnet18(spatial_dims: int, num_classes: int = 2, **kwargs: Any) -> nn.Module:
    """MONAI ResNet-18, one input channel, ``num_classes`` logits; kwargs go to MONAI's ``ResNet``."""
    bad = [k for k in kwargs if k in _FIXED]
    if bad:
        raise TypeError(f"resnet18 arguments {bad} are fixed by the architecture")
    kw = dict(kwargs)
    norm = kw.get("norm")
    if isinstance(norm, list):  # JSON round-trip turns MONAI's (name, args) tuple into a list
        kw["norm"] = tuple(norm)
    act = kw.get("act")
    if isinstance(act, list):
        kw["act"] = tuple(act)
    net = resnet18(spatial_dims=spatial_dims, n_input_channels=1, num_classes=num_classes, **kw)
    norm = kw.get("norm", "batch")
    if _norm_name(norm) != "batch":
        _replace_batchnorm(net, norm, spatial_dims)
    return net


def _norm_name(norm: Any) -> str:
    return str(norm if isinstance(norm, str) else norm[0]).lower()


def _replace_batchnorm(module: nn.Module, norm: Any, spatial_dims: int) -> None:
    """Swap every BatchNorm below ``module`` for ``norm`` (MONAI 1.6.1 drops ``norm`` in its blocks)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=child.num_features))
        else:
            _replace_batchnorm(child, norm, spatial_dims)
