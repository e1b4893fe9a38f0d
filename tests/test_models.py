"""Model checks: every architecture trains and attacks (fwd/bwd, eval mode), and the wrapper's
units, output conventions, config round-trip and torch.export work."""

from __future__ import annotations

import json

import pytest
import torch

from ctharden.core.errors import ConfigError
from ctharden.models import (
    ARCHITECTURES,
    CTClassifier,
    build_model,
    model_from_config,
    positive_score,
    predicted_label,
)

# Small but real configurations: (arch, spatial_dims, build kwargs, input shape without channel)
CUBE = (32, 32, 32)
IMAGE = (64, 64)
NODULES = [name for name in ARCHITECTURES if name.startswith("nodule3d")]
CASES = (
    [pytest.param(name, 3, {"width": 8}, CUBE, id=f"{name}-3d") for name in NODULES]
    + [pytest.param("nodule3d", 2, {"width": 8}, IMAGE, id="nodule3d-2d")]
    + [pytest.param("nodule3d_bn", 2, {"width": 8}, IMAGE, id="nodule3d_bn-2d")]
    + [pytest.param("nodule3d", 3, {"width": 8, "stem_stride": 1}, CUBE, id="nodule3d-3d-stem1")]
    + [pytest.param("nodule2d", 2, {"width": 8}, (45, 45), id="nodule2d")]
    + [pytest.param("resnet18_2d", 2, {}, IMAGE, id="resnet18_2d")]
    + [pytest.param("resnet18_3d", 3, {"widen_factor": 0.25}, CUBE, id="resnet18_3d")]
)
EXPECTED_OUTPUT = {name: spec.output for name, spec in ARCHITECTURES.items()}


def _model(arch: str, dims: int, kwargs: dict, seed: int = 0) -> CTClassifier:
    torch.manual_seed(seed)
    return build_model(arch, spatial_dims=dims, **kwargs)


def _expected_shape(output: str, n: int) -> tuple[int, ...]:
    return (n, 2) if output == "logits2" else (n,)


def _first_weight(model: CTClassifier) -> torch.Tensor:
    return next(p for name, p in model.named_parameters() if p.dim() == model.spatial_dims + 2)


def test_every_architecture_is_covered() -> None:
    assert {c.values[0] for c in CASES} == set(ARCHITECTURES)


def test_stem_stride_keeps_the_weights() -> None:
    """stem_stride only changes how the first layer downsamples: same parameters, same 2³ end."""
    a, b = build_model("nodule3d", width=8), build_model("nodule3d", width=8, stem_stride=1)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    b.load_state_dict(a.state_dict())
    with pytest.raises(ConfigError, match="stem_stride"):
        build_model("nodule3d", stem_stride=3)


@pytest.mark.parametrize(("arch", "dims", "kwargs", "shape"), CASES)
def test_forward_backward(arch: str, dims: int, kwargs: dict, shape: tuple[int, ...]) -> None:
    model = _model(arch, dims, kwargs).train()
    assert model.output == EXPECTED_OUTPUT[arch] and model.spatial_dims == dims
    x = torch.rand(3, *shape, requires_grad=True)
    out = model(x)
    assert out.shape == _expected_shape(model.output, 3)
    assert torch.isfinite(out).all()
    out.float().square().sum().backward()
    w = _first_weight(model)
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(("arch", "dims", "kwargs", "shape"), CASES)
def test_eval_mode_is_deterministic_and_per_sample(arch: str, dims: int, kwargs: dict, shape: tuple) -> None:
    """What attacks need: in eval mode the output is a fixed function of each sample alone."""
    model = _model(arch, dims, kwargs)
    x = torch.rand(4, *shape)
    model.train()
    model(x)  # moves BatchNorm running statistics away from their initial values
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
        with_channel = model(x.unsqueeze(1))
        alone = model(x[:1])
    assert torch.equal(a, b)
    assert torch.equal(a, with_channel)
    torch.testing.assert_close(alone, a[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("arch", "dims", "kwargs", "shape"), CASES)
def test_config_round_trip(arch: str, dims: int, kwargs: dict, shape: tuple) -> None:
    model = _model(arch, dims, kwargs, seed=1)
    model.train()
    model(torch.rand(2, *shape))  # non-trivial BatchNorm buffers, if any
    config = json.loads(json.dumps(model.config()))
    assert config == model.config()
    assert set(config) == {"arch", "arch_kwargs", "spatial_dims", "window_hu", "output"}
    rebuilt = model_from_config(config)
    assert rebuilt.config() == config
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, *shape)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_nodule_cnn_accepts_other_sizes() -> None:
    model = _model("nodule3d", 3, {"width": 4}).eval()
    for shape in [(16, 16, 16), (48, 40, 32)]:
        assert model(torch.rand(2, *shape)).shape == (2,)
    model2d = _model("nodule3d", 2, {"width": 4}).eval()
    assert model2d(torch.rand(2, 224, 224)).shape == (2,)


def test_bad_inputs_and_configs_raise() -> None:
    model = _model("nodule3d", 3, {"width": 4})
    with pytest.raises(ValueError, match="expected input"):
        model(torch.rand(2, 32, 32))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.rand(2, 3, 32, 32, 32))
    with pytest.raises(ConfigError, match="unknown architecture 'vgg'.*nodule3d_bn.*resnet18_2d"):
        build_model("vgg")
    with pytest.raises(ConfigError, match="unknown option"):
        build_model("nodule3d", depth=3)
    with pytest.raises(ConfigError, match="width"):
        build_model("nodule3d", width=0)
    with pytest.raises(ConfigError, match="spatial_dims"):
        build_model("resnet18_2d", spatial_dims=3)
    with pytest.raises(ConfigError, match="window_hu"):
        build_model("nodule3d", width=4, window_hu=(400, -1000))
    with pytest.raises(ConfigError, match="cannot build"):
        build_model("resnet18_2d", no_such_monai_option=1)
    config = model.config() | {"output": "logits2"}
    with pytest.raises(ConfigError, match="output"):
        model_from_config(config)
    with pytest.raises(ConfigError, match="unknown architecture"):
        model_from_config(model.config() | {"arch": "nope"})


def test_defaults_per_architecture() -> None:
    nodule = build_model("nodule3d", width=4)
    assert nodule.spatial_dims == 3 and nodule.window_hu == (-1000.0, 400.0) and nodule.output == "logit"
    assert nodule.arch_kwargs == {"width": 4, "stem_stride": 2}
    assert build_model("nodule3d").arch_kwargs == {"width": 64, "stem_stride": 2}
    covid = build_model("resnet18_2d")
    assert covid.spatial_dims == 2 and covid.window_hu is None and covid.output == "logits2"
    assert build_model("resnet18_3d", widen_factor=0.25).window_hu == (-1000.0, 400.0)
    assert build_model("nodule3d_fiveclass", width=4).output == "rating"
    assert build_model("nodule3d", width=4, spatial_dims=2, window_hu=None).window_hu is None


def test_resnet_is_instance_normalised_throughout() -> None:
    """MONAI 1.6.1 leaves BatchNorm in the residual blocks; the builder must replace all of them."""
    for arch, kwargs in [("resnet18_2d", {}), ("resnet18_3d", {"widen_factor": 0.25})]:
        model = build_model(arch, **kwargs)
        norms = [type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__]
        assert len(norms) == 20 and all(n.startswith("InstanceNorm") for n in norms), norms
        assert not any("running" in k for k in model.state_dict())
    # per-sample in train mode too (the IMA reference code attacks in train mode)
    model = _model("resnet18_2d", 2, {}).train()
    x = torch.rand(3, *IMAGE)
    torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-4, atol=1e-5)


def test_to_input_and_eps_units() -> None:
    model = build_model("nodule3d", width=4)
    hu = torch.tensor([-3000.0, -1000.0, -300.0, 400.0, 2000.0])
    torch.testing.assert_close(model.to_input(hu), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    cube = torch.full((2, *CUBE), -1000.0)
    assert model.to_input(cube).shape == cube.shape
    assert model.eps_to_hu(1 / 1400) == pytest.approx(1.0)
    assert model.eps_to_hu(8 / 255) == pytest.approx(1400 * 8 / 255)
    assert model.hu_to_eps(14.0) == pytest.approx(0.01)
    torch.testing.assert_close(model.eps_to_hu(torch.tensor([0.01, 0.1])), torch.tensor([14.0, 140.0]))
    custom = build_model("nodule3d", width=4, window_hu=(-1350, 150))
    assert custom.to_input(torch.tensor(-600.0)).item() == pytest.approx(0.5)
    assert custom.eps_to_hu(0.1) == pytest.approx(150.0)

    covid = build_model("resnet18_2d")
    x = torch.rand(2, *IMAGE)
    assert covid.to_input(x) is x
    with pytest.raises(ConfigError, match="no HU equivalent"):
        covid.eps_to_hu(0.03)
    with pytest.raises(ConfigError, match="no HU equivalent"):
        covid.hu_to_eps(10.0)


def test_positive_score_and_predicted_label() -> None:
    logit = torch.tensor([-2.0, 0.0, 0.5])
    torch.testing.assert_close(positive_score(logit, "logit"), torch.sigmoid(logit))
    assert predicted_label(logit, "logit").tolist() == [0, 0, 1]

    logits2 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    torch.testing.assert_close(positive_score(logits2, "logits2"), torch.softmax(logits2, 1)[:, 1])
    assert predicted_label(logits2, "logits2").tolist() == [0, 1, 0]

    rating = torch.tensor([0.0, 1.0, 2.5, 3.0, 3.01, 4.75, 5.0, 7.0])
    torch.testing.assert_close(
        positive_score(rating, "rating"), torch.tensor([0.0, 0.0, 0.375, 0.5, 0.5025, 0.9375, 1.0, 1.0])
    )
    assert predicted_label(rating, "rating").tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    for out, kind in [(logit, "logit"), (logits2, "logits2"), (rating, "rating")]:
        assert predicted_label(out, kind).dtype == torch.long
    # bf16 outputs (autocast) give float32 scores
    assert positive_score(logit.bfloat16(), "logit").dtype == torch.float32
    with pytest.raises(ConfigError, match="output"):
        positive_score(logit, "probability")


def test_parameter_counts_follow_the_variants() -> None:
    def count(arch: str) -> int:
        return sum(p.numel() for p in build_model(arch, width=16).parameters())

    base = count("nodule3d")
    assert count("nodule3d_wider") > base > count("nodule3d_narrower")
    assert count("nodule3d_deeper") > base > count("nodule3d_shallower")
    assert count("nodule3d_dropout0.1") == count("nodule3d_dropout0.2") == count("nodule3d_fiveclass") == base
    assert count("nodule3d_wider") == sum(p.numel() for p in build_model("nodule3d", width=32).parameters())
    # the paper's deeper variant: an extra conv of 1024 kernels and an FC of 1024 at width 64
    deeper = build_model("nodule3d_deeper")
    convs = [m for m in deeper.modules() if isinstance(m, torch.nn.Conv3d)]
    fcs = [m for m in deeper.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) == 5 and convs[-1].out_channels == 1024 and convs[0].out_channels == 64
    assert len(fcs) == 5 and fcs[0].out_features == 1024
    shallower = build_model("nodule3d_shallower", width=8)
    assert len([m for m in shallower.modules() if isinstance(m, torch.nn.Conv3d)]) == 3
    assert len([m for m in shallower.modules() if isinstance(m, torch.nn.Linear)]) == 3


@pytest.mark.parametrize(
    ("arch", "kwargs", "shape"),
    [("nodule3d", {"width": 8}, CUBE), ("resnet18_2d", {}, IMAGE)],
)
def test_torch_export(arch: str, kwargs: dict, shape: tuple) -> None:
    """MLflow logs models in pt2 (torch.export) format with a batch-of-2 input example."""
    model = build_model(arch, **kwargs).eval()
    x = torch.rand(2, *shape)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize(("arch", "shape"), [("nodule3d", CUBE), ("nodule3d", IMAGE)])
def test_channels_last_and_bf16_autocast(arch: str, shape: tuple) -> None:
    dims = len(shape)
    model = _model(arch, dims, {"width": 8}).eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        ref = model(x)
        model.to_channels_last()
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)
    assert model.config() == _model(arch, dims, {"width": 8}).config()  # a runtime setting only


@pytest.mark.parametrize(
    ("arch", "kwargs", "shape"),
    [
        ("nodule3d_deeper", {"width": 8}, CUBE),  # extra 3×3×3 conv on 2³
        ("nodule3d", {"width": 8}, (16, 16, 16)),  # last conv on 2³
        ("resnet18_3d", {"widen_factor": 0.25}, CUBE),  # layer4 on 2³
    ],
)
def test_bf16_weight_gradients_match_fp32(arch: str, kwargs: dict, shape: tuple) -> None:
    """oneDNN's bf16 Conv3d weight gradient is garbage for input depth < kernel depth (see
    ctharden.models.bf16_guard); the models must give bf16 gradients close to fp32 ones anyway."""
    model = _model(arch, 3, kwargs).train()
    x = torch.rand(4, *shape)
    grads = {}
    for amp in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        out.float().square().sum().backward()
        grads[amp] = {n: p.grad.clone() for n, p in model.named_parameters() if p.dim() == 5}
    for name, ref in grads[False].items():  # unguarded, the broken layers give cosine ~0 or NaN
        low = grads[True][name]
        cos = torch.nn.functional.cosine_similarity(low.flatten(), ref.flatten(), dim=0)
        assert torch.isfinite(low).all() and cos > 0.8, f"{name}: cosine(bf16 grad, fp32 grad) = {cos:.3f}"


def test_bf16_autocast_training_learns() -> None:
    """bf16 autocast on CPU (the training default where supported) still fits a separable toy task."""
    torch.manual_seed(0)
    model = build_model("nodule3d", width=8)
    x = torch.rand(32, 16, 16, 16) * 0.2
    y = torch.arange(32) % 2
    x[y == 1, 6:10, 6:10, 6:10] += 0.6  # a bright "nodule" in the positives
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), y.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < 0.3 * losses[0]
    with torch.no_grad():
        assert (predicted_label(model.eval()(x), "logit") == y).float().mean() == 1.0
