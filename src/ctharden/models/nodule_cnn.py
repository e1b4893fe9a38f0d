"""The shen et al. (2020) nodule CNN and its Table 3 variants, for 3D cubes or 2D images.

The paper's network (its Fig. 1, section 2.1): four 3×3×3 convolutions each followed by ReLU,
then four fully connected layers, the last giving the output (sigmoid applied by the loss /
:func:`~ctharden.models.positive_score`, not in the network). The figure's first layer has 64
filters; the other widths are not given in the text, so ctharden scales them from ``width``
(``w``, default 64):

=====================  ==========================  ===================================  ========
variant                conv channels               FC features (hidden → out)           params
=====================  ==========================  ===================================  ========
``nodule3d``           w, w, 2w, 2w                4w, 2w, w → 1                        1.08 M
``nodule3d_bn``        as nodule3d + BatchNorm after each conv                          1.08 M
``nodule3d_dropout*``  as nodule3d + Dropout(p) after each hidden FC                    1.08 M
``nodule3d_deeper``    w, w, 2w, 2w, **16w**       **16w**, 4w, 2w, w → 1               13.0 M
``nodule3d_shallower`` w, w, 2w                    2w, w → 1                            0.47 M
``nodule3d_wider``     nodule3d at width 2w                                             4.3 M
``nodule3d_narrower``  nodule3d at width w/2                                            0.27 M
``nodule3d_fiveclass`` as nodule3d, output = 1-5 rating (regression)                    1.08 M
=====================  ==========================  ===================================  ========

(parameter counts for 3D at w = 64). At the paper width the deeper variant's extra conv has
1024 kernels and its extra FC layer 1024 features, as in the paper; the shallower one drops the
last conv and the first FC layer.

Layout: every conv is ``Conv(k=3, padding=1) [→ BatchNorm] → ReLU``, and each of the first four
halves the resolution, so a 32³ cube is 2³ after four convs (32 → 16 → 8 → 4 → 2): the first
conv has stride 2 (``stem_stride=2``, the default) and the next three are followed by a 2×
max-pool. ``stem_stride=1`` instead runs the first conv at full resolution followed by a
max-pool as well (the classic layout; the paper's figure does not say which): same parameters
(and state_dict keys), but 2.3× slower to train at width 64 on a 2-core CPU in fp32 and 3.4×
under bf16 autocast (``benchmarks/train_throughput.py``), because the full-resolution 32³×w
activation of the first layer and its pooling dominate the time. An adaptive average pool to
2 per axis (identity for 32³ cubes and four convs) then fixes the flatten size, so the same
weights accept other input sizes (≥ 16 per axis) and the 2D version (``spatial_dims=2``:
Conv2d, MaxPool2d, …) accepts e.g. 64×64 or 224×224 images. The conv widths double only once,
which keeps a fwd+bwd pass on a 2-core CPU practical.

BatchNorm in eval mode uses its running statistics (no dependence on the batch), so attacks in
eval mode see a fixed function. Dropout is inactive in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

_POOLED = 2  # spatial size per axis after the adaptive pool
_N_POOLS = 4  # each of the first four convs halves the resolution (stride 2 or a 2x max-pool)


class NoduleCNN(nn.Module):
    """Plain conv → FC classifier; ``(N, in_channels, *spatial)`` -> ``(N, out_features)``.

    Args:
        spatial_dims: 2 or 3.
        conv_channels: output channels of each 3×3(×3) conv.
        fc_features: features of the hidden fully connected layers (the output layer is extra).
        out_features: size of the output layer (1 for a logit or a rating, 2 for two logits).
        in_channels: input channels (1 for CT).
        batch_norm: BatchNorm after each conv (before its ReLU).
        dropout: dropout probability after each hidden FC layer (0 = none).
        output_bias: initial bias of the output layer (3.0 for a 1-5 rating regression).
        stem_stride: 2 = the first conv has stride 2 (and no max-pool after it); 1 = it runs at
            full resolution and is followed by a max-pool like the others.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        conv_channels: Sequence[int] = (64, 64, 128, 128),
        fc_features: Sequence[int] = (256, 128, 64),
        out_features: int = 1,
        in_channels: int = 1,
        batch_norm: bool = False,
        dropout: float = 0.0,
        output_bias: float = 0.0,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not conv_channels:
            raise ValueError("conv_channels must not be empty")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        norm = nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d
        pool = nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d
        adaptive = nn.AdaptiveAvgPool3d if spatial_dims == 3 else nn.AdaptiveAvgPool2d

        layers: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(conv_channels):
            stride = stem_stride if i == 0 else 1
            layers.append(conv(prev, ch, kernel_size=3, stride=stride, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(norm(ch))
            layers.append(nn.ReLU(inplace=True))
            if i < _N_POOLS:  # Identity keeps the state_dict keys independent of stem_stride
                layers.append(pool(kernel_size=2) if stride == 1 else nn.Identity())
            prev = ch
        layers.append(adaptive(_POOLED))
        self.features = nn.Sequential(*layers)

        head: list[nn.Module] = [nn.Flatten()]
        prev = prev * _POOLED**spatial_dims
        for f in fc_features:
            head += [nn.Linear(prev, f), nn.ReLU(inplace=True)]
            if dropout > 0:
                head.append(nn.Dropout(dropout))
            prev = f
        self.classifier = nn.Sequential(*head)
        self.out = nn.Linear(prev, out_features)
        self._init_weights(output_bias)

    def _init_weights(self, output_bias: float) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)) and m is not self.out:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.constant_(self.out.bias, output_bias)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.out(self.classifier(self.features(x)))
        return out


def nodule_layout(variant: str, width: int) -> dict[str, Any]:
    """Conv channels, FC features and options of a Table 3 variant at ``width`` (see module doc)."""
    w = width
    if variant == "wider":
        w = 2 * width
    elif variant == "narrower":
        w = width // 2
    if w < 1:
        raise ValueError(f"width {width} is too small for the {variant} variant")
    layout: dict[str, Any] = {
        "conv_channels": [w, w, 2 * w, 2 * w],
        "fc_features": [4 * w, 2 * w, w],
        "batch_norm": variant == "bn",
        "dropout": {"dropout0.1": 0.1, "dropout0.2": 0.2}.get(variant, 0.0),
        "output_bias": 3.0 if variant == "fiveclass" else 0.0,
    }
    if variant == "deeper":
        layout["conv_channels"].append(16 * w)
        layout["fc_features"].insert(0, 16 * w)
    elif variant == "shallower":
        layout["conv_channels"].pop()
        layout["fc_features"].pop(0)
    return layout
