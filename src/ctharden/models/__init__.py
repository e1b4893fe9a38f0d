"""Models: the shen et al. nodule CNN and its variants, MONAI ResNet-18, and the wrapper that fixes
each model's input scale (HU window -> [0, 1]) and output convention.

>>> model = build_model("nodule3d", width=16)          # 3D, HU window (-1000, 400), logit output
>>> logits = model(model.to_input(hu_cubes))            # hu_cubes: (N, 32, 32, 32) float32 HU
>>> labels = predicted_label(logits, model.output)
>>> same = model_from_config(model.config()); same.load_state_dict(model.state_dict())

See :mod:`ctharden.models.wrapper` for the units of inputs and ε, and
:mod:`ctharden.models.architectures` for the architectures.
"""

from ctharden.models.architectures import ARCHITECTURES, ArchSpec, build_model, get_arch, model_from_config
from ctharden.models.wrapper import (
    DEFAULT_WINDOW_HU,
    OUTPUTS,
    CTClassifier,
    positive_score,
    predicted_label,
)

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "CTClassifier",
    "DEFAULT_WINDOW_HU",
    "OUTPUTS",
    "build_model",
    "get_arch",
    "model_from_config",
    "positive_score",
    "predicted_label",
]
