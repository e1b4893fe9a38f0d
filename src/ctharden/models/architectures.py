"""Named architectures, :func:`build_model` and :func:`model_from_config`.

=======================  =======  ============  ==================  ============================
name                     output   spatial dims  default window_hu   arch_kwargs (defaults)
=======================  =======  ============  ==================  ============================
``nodule3d``             logit    3 (or 2)      (-1000, 400)        width=64, stem_stride=2
``nodule3d_bn``          logit    3 (or 2)      (-1000, 400)        width=64, stem_stride=2
``nodule3d_dropout0.1``  logit    3 (or 2)      (-1000, 400)        width=64, stem_stride=2
``nodule3d_dropout0.2``  logit    3 (or 2)      (-1000, 400)        width=64, stem_stride=2
``nodule3d_deeper``      logit    3 (or 2)      (-1000, 400)        width=64, stem_stride=2
``nodule3d_shallower``   logit    3 (or 2)      (-1000, 400)        width=64, stem_stride=2
``nodule3d_wider``       logit    3 (or 2)      (-1000, 400)        width=64, stem_stride=2
``nodule3d_narrower``    logit    3 (or 2)      (-1000, 400)        width=64, stem_stride=2
``nodule3d_fiveclass``   rating   3 (or 2)      (-1000, 400)        width=64, stem_stride=2
``nodule2d``             logit    2             (-1000, 400)        width=64, stem_stride=2
``resnet18_2d``          logits2  2             None                MONAI ResNet kwargs
``resnet18_3d``          logits2  3             (-1000, 400)        MONAI ResNet kwargs
=======================  =======  ============  ==================  ============================

``nodule3d_fiveclass`` regresses the readers' 1-5 malignancy rating; its predicted label is
rating > 3 (``positive_score > 0.5``). The nodule variants are described in
:mod:`ctharden.models.nodule_cnn`, the ResNets in :mod:`ctharden.models.resnet`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ctharden.core.errors import ConfigError
from ctharden.models.nodule_cnn import NoduleCNN, nodule_layout
from ctharden.models.resnet import RESNET_DEFAULTS, build_resnet18
from ctharden.models.wrapper import DEFAULT_WINDOW_HU, OUTPUTS, CTClassifier, check_window

_ARCH_DEFAULT: Any = object()  # sentinel: "the architecture's own default"


@dataclass(frozen=True)
class ArchSpec:
    """One named architecture. Calling it builds the backbone: ``spec(spatial_dims, **kwargs)``."""

    name: str
    builder: Callable[..., nn.Module]
    output: str
    spatial_dims: tuple[int, ...]  # allowed; the first is the default
    window_hu: tuple[float, float] | None  # default window
    defaults: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)  # per spatial_dims
    open_kwargs: bool = False  # accept keyword arguments beyond ``defaults`` (passed through)
    description: str = ""

    def __call__(self, spatial_dims: int, **kwargs: Any) -> nn.Module:
        return self.builder(spatial_dims, **kwargs)


def _nodule_builder(variant: str, out_features: int) -> Callable[..., nn.Module]:
    def build(spatial_dims: int, width: int = 64, stem_stride: int = 2) -> nn.Module:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"width must be a positive integer, got {width!r}")
        if variant == "narrower" and width < 2:
            raise ConfigError("nodule3d_narrower needs width >= 2 (it halves the width)")
        if stem_stride not in (1, 2) or isinstance(stem_stride, bool):
            raise ConfigError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
        layout = nodule_layout(variant, width)
        return NoduleCNN(spatial_dims=spatial_dims, out_features=out_features, stem_stride=stem_stride, **layout)

    return build


_NODULE_VARIANTS = {
    "": "shen et al. 2020 nodule CNN: 4 conv + 4 FC, sigmoid-logit output",
    "_bn": "+ BatchNorm after each conv (Table 3, scenario 1)",
    "_dropout0.1": "+ Dropout 0.1 after each hidden FC layer (scenario 2)",
    "_dropout0.2": "+ Dropout 0.2 after each hidden FC layer (scenario 2)",
    "_deeper": "+ one conv of 16w (1024 at w=64) kernels and one FC of 16w features (scenario 3)",
    "_shallower": "one conv and one FC layer fewer (scenario 3)",
    "_wider": "all widths x2 (scenario 3)",
    "_narrower": "all widths /2 (scenario 3)",
    "_fiveclass": "regression of the 1-5 malignancy rating; label = rating > 3 (scenario 4)",
}

ARCHITECTURES: dict[str, ArchSpec] = {}
for _suffix, _desc in _NODULE_VARIANTS.items():
    _variant = _suffix.lstrip("_") or "base"
    _name = f"nodule3d{_suffix}"
    ARCHITECTURES[_name] = ArchSpec(
        name=_name,
        builder=_nodule_builder(_variant, 1),
        output="rating" if _variant == "fiveclass" else "logit",
        spatial_dims=(3, 2),
        window_hu=DEFAULT_WINDOW_HU,
        defaults={3: {"width": 64, "stem_stride": 2}, 2: {"width": 64, "stem_stride": 2}},
        description=_desc,
    )
ARCHITECTURES["nodule2d"] = ArchSpec(
    name="nodule2d",
    builder=_nodule_builder("base", 1),
    output="logit",
    spatial_dims=(2,),
    window_hu=DEFAULT_WINDOW_HU,
    defaults={2: {"width": 64, "stem_stride": 2}},
    description="shen et al. 2020 nodule CNN in 2D: the same 4 conv + 4 FC layout and widths, 3x3 convolutions",
)
ARCHITECTURES["resnet18_2d"] = ArchSpec(
    name="resnet18_2d",
    builder=build_resnet18,
    output="logits2",
    spatial_dims=(2,),
    window_hu=None,
    defaults=RESNET_DEFAULTS,
    open_kwargs=True,
    description="MONAI ResNet-18, instance norm, two logits (ma et al. 2020, COVID-19 CT)",
)
ARCHITECTURES["resnet18_3d"] = ArchSpec(
    name="resnet18_3d",
    builder=build_resnet18,
    output="logits2",
    spatial_dims=(3,),
    window_hu=DEFAULT_WINDOW_HU,
    defaults=RESNET_DEFAULTS,
    open_kwargs=True,
    description="MONAI ResNet-18 3D, instance norm, two logits, for 32^3 nodule cubes",
)


def get_arch(arch: str) -> ArchSpec:
    """The :class:`ArchSpec` named ``arch``; :class:`ConfigError` listing the names otherwise."""
    try:
        return ARCHITECTURES[arch]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown architecture {arch!r} (expected one of: {', '.join(ARCHITECTURES)})") from None


def _json_normalise(arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        normalised: dict[str, Any] = json.loads(json.dumps(kwargs, allow_nan=False))
        return normalised
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{arch}: arch_kwargs must be JSON-serialisable ({exc})") from None


def build_model(
    arch: str,
    *,
    spatial_dims: int | None = _ARCH_DEFAULT,
    window_hu: tuple[float, float] | None = _ARCH_DEFAULT,
    **arch_kwargs: Any,
) -> CTClassifier:
    """Build the named architecture wrapped in a :class:`CTClassifier`.

    Args:
        arch: a name in :data:`ARCHITECTURES`.
        spatial_dims: 2 or 3; default: the architecture's (3 for ``nodule3d*`` and
            ``resnet18_3d``, 2 for ``resnet18_2d``).
        window_hu: HU window mapped to [0, 1] by ``to_input``, or None if raw inputs are already
            in [0, 1]; default: the architecture's ((-1000, 400), or None for ``resnet18_2d``).
        **arch_kwargs: architecture options, e.g. ``width=16`` for the nodule CNNs, or MONAI
            ``ResNet`` options for the ResNets. Stored, with the defaults filled in, in
            ``model.arch_kwargs``.

    Raises:
        ConfigError: unknown architecture or option, unsupported ``spatial_dims``, bad window.
    """
    spec = get_arch(arch)
    dims = spec.spatial_dims[0] if spatial_dims is _ARCH_DEFAULT or spatial_dims is None else spatial_dims
    if dims not in spec.spatial_dims:
        raise ConfigError(f"{arch} supports spatial_dims {list(spec.spatial_dims)}, got {spatial_dims!r}")
    window = spec.window_hu if window_hu is _ARCH_DEFAULT else check_window(window_hu)
    defaults = dict(spec.defaults.get(dims, {}))
    unknown = sorted(set(arch_kwargs) - set(defaults))
    if unknown and not spec.open_kwargs:
        raise ConfigError(f"{arch}: unknown option(s) {unknown} (accepted: {sorted(defaults) or 'none'})")
    kwargs = _json_normalise(arch, {**defaults, **arch_kwargs})
    try:
        net = spec(dims, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{arch}: cannot build with {kwargs}: {exc}") from None
    return CTClassifier(net, arch=arch, arch_kwargs=kwargs, spatial_dims=dims, output=spec.output, window_hu=window)


def model_from_config(config: Mapping[str, Any]) -> CTClassifier:
    """Rebuild a model from :meth:`CTClassifier.config` (weights are fresh: ``load_state_dict`` next)."""
    if not isinstance(config, Mapping) or "arch" not in config:
        raise ConfigError(f"model config must be a mapping with an 'arch' key, got {config!r}")
    extra = set(config) - {"arch", "arch_kwargs", "spatial_dims", "window_hu", "output"}
    if extra:
        raise ConfigError(f"model config has unknown keys {sorted(extra)}")
    kwargs = dict(config.get("arch_kwargs") or {})
    build: dict[str, Any] = {}
    if "spatial_dims" in config:
        build["spatial_dims"] = config["spatial_dims"]
    if "window_hu" in config:
        build["window_hu"] = config["window_hu"]
    model = build_model(config["arch"], **build, **kwargs)
    output = config.get("output", model.output)
    if output not in OUTPUTS or output != model.output:
        raise ConfigError(f"model config says output {output!r} but {config['arch']} gives {model.output!r}")
    return model
