"""Attention of a classifier: first-layer feature maps and Grad-CAM (shen et al. 2020, section 2.4).

The paper opens the trained network and shows (a) the features computed after its first layers and
(b) an attention map "integrating the extracted features" that highlights where the network looks,
for a clean sample and for the same sample after a successful noise attack. ctharden implements
(b) as Grad-CAM (Selvaraju et al. 2017): the last conv layer's activations weighted by the
spatial mean of the gradient of the target score.

Which layers
------------
Both layers are found generically in the model's backbone (``model.backbone`` if it exists, else
``model.net`` of a :class:`~ctharden.models.CTClassifier`, else the model itself):

- *first layer*: the first ``nn.Conv2d``/``nn.Conv3d`` in module order;
- *last conv*: the last ``nn.Conv2d``/``nn.Conv3d`` in module order.

A conv's output is taken **after the norm and activation modules that directly follow it** at run
time: a forward pass is traced with hooks on the backbone's leaf modules, and the chain
``conv → norm → activation`` is extended while the next leaf module called is a norm
(BatchNorm/InstanceNorm/GroupNorm/LayerNorm) or an activation (ReLU, LeakyReLU, ELU, GELU, SiLU, …)
whose input is exactly the previous link's output, unmodified (tensor identity and version
counter). Any other module or an in-place op in between (e.g. a residual ``+=``) ends the chain.
For the nodule CNN that is ``Conv → [BatchNorm →] ReLU``; for the MONAI ResNet stem
``conv1 → bn1 → act`` and for its last conv ``layer4[-1].conv2 → bn2`` (the residual add follows).
Every hook is removed before the functions return, also on error.

Grad-CAM target
---------------
The score differentiated is the model's positive-class score before any squashing: the logit
(``"logit"``), the logit difference ``z1 - z0`` (``"logits2"``) or the rating (``"rating"``).
With ``target="predicted"`` its sign is flipped for samples predicted negative, so the map always
shows evidence *for the predicted class* (``"positive"``/``"negative"`` or a ``(N,)`` tensor of
labels fix the class instead). ``cam = ReLU(Σ_c mean(∂s/∂A_c) · A_c)``, up-sampled (bilinear /
trilinear) to the input size and divided by its per-sample maximum, so it lies in ``[0, 1]``
(all zeros where no location supports the class). Gradients are taken with
:func:`torch.autograd.grad` with respect to the activations only: no parameter ``.grad`` is
written. The model runs in eval mode; every submodule's mode is restored afterwards.

Figures
-------
:func:`save_attention_figure` draws one sample (``index``) as a PNG with rows *clean* and
*attacked* — image, Grad-CAM overlay, ``n_features`` first-layer feature maps — and a third row
with the difference image ``x_attacked - x_clean``. For 3D cubes (axes ``(z, y, x)``) every panel
shows the **central axial slice** (``z = D // 2`` of the input; the matching central slice of the
lower-resolution feature maps). Drawing follows :mod:`ctharden.reporting.plots`: an explicit Agg
canvas (no pyplot), atomic write, no metadata stamp.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from ctharden.core.io import atomic_write_bytes
from ctharden.models.wrapper import positive_score, predicted_label

__all__ = ["first_layer_features", "grad_cam", "save_attention_figure"]

_CONVS = (nn.Conv2d, nn.Conv3d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_ACTS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh)


# ---------------------------------------------------------------------------- helpers
def _backbone(model: nn.Module) -> nn.Module:
    for name in ("backbone", "net"):
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module):
            return sub
    return model


def has_conv_layers(model: nn.Module) -> bool:
    """Whether attention maps can be drawn: the backbone has ``nn.Conv2d``/``nn.Conv3d`` layers
    (a TorchScript or exported network hides them)."""
    return any(isinstance(m, _CONVS) for m in _backbone(model).modules())


def _convs(model: nn.Module) -> list[nn.Module]:
    convs: list[nn.Module] = [m for m in _backbone(model).modules() if isinstance(m, _CONVS)]
    if not convs:
        raise ValueError(f"{type(model).__name__}: no Conv2d/Conv3d layer found in its backbone")
    return convs


def _spatial_dims(model: nn.Module, x: Tensor) -> int:
    sd = getattr(model, "spatial_dims", None)
    if sd is None:
        sd = 3 if isinstance(_convs(model)[-1], nn.Conv3d) else 2
    if x.dim() not in (sd + 1, sd + 2):
        raise ValueError(
            f"expected input (N, *spatial) or (N, 1, *spatial) with {sd} spatial dims, got shape {tuple(x.shape)}"
        )
    return int(sd)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every submodule's own ``training`` flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class _ChainTracer:
    """Capture the output of ``conv`` followed by its directly chained norm/activation modules.

    Hooks every leaf module of ``root``. Each chain link's output is captured and a clone is handed
    on to the network, so later in-place ops never touch the captured tensor; the clone's identity
    and version tell whether the next module consumes it unmodified.
    """

    def __init__(self, root: nn.Module, conv: nn.Module) -> None:
        self.conv = conv
        self.captured: Tensor | None = None
        self.module: nn.Module | None = None  # the last link of the chain
        self._handed: Tensor | None = None
        self._version = -1
        self._open = False
        self._pending: nn.Module | None = None
        self._handles: list[Any] = []
        for m in root.modules():
            if next(m.children(), None) is None:  # leaf
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if not self._open:
            return
        x = inputs[0] if inputs else None
        if (
            isinstance(module, _NORMS + _ACTS)
            and isinstance(x, Tensor)
            and x is self._handed
            and x._version == self._version
        ):
            self._pending = module
        else:
            self._open = False

    def _post(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Tensor | None:
        if module is self.conv and self.captured is None:
            self._open = True
        elif not (self._open and module is self._pending):
            return None
        self._pending = None
        self.captured, self.module = output, module
        self._handed = output.clone()
        self._version = self._handed._version
        return self._handed

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> _ChainTracer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _run_traced(model: nn.Module, x: Tensor, conv: nn.Module) -> tuple[Tensor, Tensor]:
    with _ChainTracer(_backbone(model), conv) as tracer:
        out = model(x)
    if tracer.captured is None:
        raise RuntimeError(f"{type(model).__name__}: the layer {conv} was not called in the forward pass")
    return out, tracer.captured


# ---------------------------------------------------------------------------- API
def first_layer_features(model: nn.Module, x: Tensor) -> Tensor:
    """Activations after the first conv layer (and its directly following norm/activation).

    Args:
        model: a :class:`~ctharden.models.CTClassifier` (or any module with a conv backbone).
        x: model-input units ``[0, 1]``, ``(N, *spatial)`` or ``(N, 1, *spatial)``.

    Returns:
        ``(N, C, *spatial')`` float tensor, detached (``spatial'`` is the first layer's output
        resolution, e.g. 16³ for 32³ cubes with the stride-2 stem). Eval mode, no grad; the
        model's modes are restored.
    """
    _spatial_dims(model, x)
    conv = _convs(model)[0]
    with _eval_mode(model), torch.no_grad():
        _, feats = _run_traced(model, x, conv)
    return feats.detach().float()


def _signed_score(out: Tensor, output: str) -> Tensor:
    if output == "logits2":
        return out[:, 1] - out[:, 0]
    return out.reshape(out.shape[0])


def grad_cam(model: nn.Module, x: Tensor, target: str | Tensor = "predicted") -> Tensor:
    """Grad-CAM on the last conv layer, up-sampled to the input resolution, in ``[0, 1]``.

    Args:
        model: a :class:`~ctharden.models.CTClassifier` (``output`` decides the score; see the
            module docstring).
        x: model-input units, ``(N, *spatial)`` or ``(N, 1, *spatial)``.
        target: ``"predicted"`` (evidence for each sample's predicted class), ``"positive"``,
            ``"negative"``, or an ``(N,)`` tensor of 0/1 class labels.

    Returns:
        ``(N, *spatial)`` float32 maps in ``[0, 1]`` (per-sample max-normalised; zeros where the
        rectified map is zero everywhere).
    """
    sd = _spatial_dims(model, x)
    spatial = tuple(x.shape[-sd:])
    n = x.shape[0]
    output = getattr(model, "output", "logit")
    conv = _convs(model)[-1]
    x = x.detach()
    with _eval_mode(model), torch.enable_grad():
        out, acts = _run_traced(model, x, conv)
        score = _signed_score(out, output).float()
        if isinstance(target, Tensor):
            labels = target.to(device=score.device).reshape(-1).long()
            if labels.shape[0] != n:
                raise ValueError(f"target has {labels.shape[0]} labels for {n} samples")
        elif target == "predicted":
            labels = predicted_label(out.detach(), output)
        elif target in ("positive", "negative"):
            labels = torch.full((n,), int(target == "positive"), dtype=torch.long, device=score.device)
        else:
            raise ValueError(f"target must be 'predicted', 'positive', 'negative' or a label tensor, got {target!r}")
        sign = labels.to(score.dtype) * 2.0 - 1.0
        (grads,) = torch.autograd.grad((score * sign).sum(), acts)
    acts, grads = acts.detach().float(), grads.detach().float()
    dims = tuple(range(2, acts.dim()))
    weights = grads.mean(dim=dims, keepdim=True)
    cam = F.relu((weights * acts).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=spatial, mode="trilinear" if sd == 3 else "bilinear", align_corners=False)
    cam = cam.clamp_min(0.0).squeeze(1)
    peak = cam.flatten(1).amax(dim=1).reshape((n,) + (1,) * sd)
    cam = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
    return cam.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------- figure
_PNG_METADATA = {"Software": None}
_DPI = 110


def _one_sample(x: Tensor, sd: int, index: int, name: str) -> Tensor:
    """``(1, *spatial)`` float tensor of sample ``index`` from a single sample or a batch."""
    x = torch.as_tensor(x).detach()
    if x.dim() == sd:
        x = x.unsqueeze(0)
    elif x.dim() == sd + 2:
        x = x[:, 0]
    elif x.dim() != sd + 1:
        raise ValueError(f"{name}: expected {sd} spatial dims (optionally with batch/channel axes), "
                         f"got {tuple(x.shape)}")
    if not 0 <= index < x.shape[0]:
        raise ValueError(f"{name}: sample index {index} out of range for a batch of {x.shape[0]}")
    return x[index : index + 1].float()


def _central(a: np.ndarray, sd: int) -> np.ndarray:
    """2D panel: the array itself (2D) or its central axial slice ``a[D // 2]`` (3D, axes z, y, x)."""
    return a[a.shape[0] // 2] if sd == 3 else a


def save_attention_figure(
    model: nn.Module,
    x_clean: Tensor,
    x_attacked: Tensor,
    path: str | Path,
    *,
    titles: Sequence[str] = ("clean", "attacked"),
    n_features: int = 8,
    index: int = 0,
) -> Path:
    """Save one PNG comparing the model's attention on a clean and an attacked sample.

    Rows: ``titles[0]`` and ``titles[1]`` — the image, its Grad-CAM overlay (evidence for the
    predicted class; the title gives the positive score and label) and ``n_features`` first-layer
    feature maps (the channels most active on the clean sample, the same channels and colour
    scale in both rows); a third row shows ``x_attacked - x_clean``. 3D cubes show the central
    axial slice. ``x_*`` are model-input units, a single sample or a batch (``index`` picks one).

    Returns:
        ``path``, written atomically.
    """
    if len(titles) != 2:
        raise ValueError(f"titles must name the 2 rows, got {titles!r}")
    sd = int(getattr(model, "spatial_dims", 3 if isinstance(_convs(model)[-1], nn.Conv3d) else 2))
    xc = _one_sample(x_clean, sd, index, "x_clean")
    xa = _one_sample(x_attacked, sd, index, "x_attacked")
    if xc.shape != xa.shape:
        raise ValueError(f"x_clean {tuple(xc.shape)} and x_attacked {tuple(xa.shape)} differ in shape")
    batch = torch.cat([xc, xa])
    output = getattr(model, "output", "logit")
    with _eval_mode(model), torch.no_grad():
        scores = positive_score(model(batch), output).cpu().numpy()
    cams = grad_cam(model, batch).cpu().numpy()
    feats = first_layer_features(model, batch).cpu().numpy()
    k = max(0, min(int(n_features), feats.shape[1]))
    order = np.argsort(-feats[0].reshape(feats.shape[1], -1).mean(axis=1), kind="stable")[:k]
    images = batch.cpu().numpy()

    ncols = 2 + k
    fig = Figure(figsize=(1.9 * ncols, 1.9 * 3 + 0.4), dpi=_DPI, layout="constrained")
    axes = fig.subplots(3, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    vmin, vmax = float(images.min()), float(images.max())
    for r in range(2):
        img = _central(images[r], sd)
        ax = axes[r, 0]
        ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax)
        ax.set_title(f"{titles[r]}\np={scores[r]:.3f} (pred {int(scores[r] > 0.5)})", fontsize=8)
        ax = axes[r, 1]
        ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax)
        ax.imshow(_central(cams[r], sd), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        ax.set_title("Grad-CAM", fontsize=8)
        for j, c in enumerate(order):
            fmin = float(feats[:, c].min())
            fmax = max(float(feats[:, c].max()), fmin + 1e-12)
            ax = axes[r, 2 + j]
            ax.imshow(_central(feats[r, c], sd), cmap="viridis", vmin=fmin, vmax=fmax)
            ax.set_title(f"layer-1 ch {int(c)}", fontsize=8)
    diff = _central(images[1] - images[0], sd)
    lim = max(float(np.abs(diff).max()), 1e-12)
    ax = axes[2, 0]
    ax.set_axis_on()
    ax.set_xticks([])
    ax.set_yticks([])
    im = ax.imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_title(f"{titles[1]} - {titles[0]}", fontsize=8)
    cax = ax.inset_axes((1.04, 0.0, 0.06, 1.0))
    cax.set_in_layout(False)  # drawn over the empty cell to its right: columns keep their width
    fig.colorbar(im, cax=cax)
    where = f"central axial slice z={images.shape[1] // 2}" if sd == 3 else "2D"
    fig.suptitle(f"{getattr(model, 'arch', type(model).__name__)}: attention ({where})", fontsize=9)

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf, metadata=_PNG_METADATA)  # type: ignore[no-untyped-call]
    return atomic_write_bytes(Path(path), buf.getvalue())

