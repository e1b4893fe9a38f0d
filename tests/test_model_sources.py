"""Models ctharden did not build: every source behind ``load_any`` (TorchScript, ``torch.export``,
MLflow pytorch models — local directory, ``runs:/`` and ``models:/`` — ``state_dict`` + factory,
ONNX), the model contract and its output conventions, the dry run's refusals, and pickled modules
refused. The networks are trained here, outside ctharden, on blobs the test draws (seconds)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import mlflow
import pytest
import torch
from monai.networks.nets import DenseNet
from torch import Tensor, nn

from ctharden.config.schema import ModelContract, validate_section
from ctharden.core.errors import ConfigError, DataError
from ctharden.models.dry_run import dry_run
from ctharden.models.external import ExternalClassifier
from ctharden.models.sources import BUNDLE_FILE, archive_kind, load_any, write_bundle

SIDE = 16


class PlainNet(nn.Module):
    """A plain PyTorch CNN on HU z-scores: ``(N, 1, 16, 16)`` -> one logit ``(N, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(16, 1))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return out


def blobs_hu(n: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(N, 1, 16, 16)`` HU images: class 1 has a bright (+300 HU) disc on lung (-800 HU)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    yy, xx = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    disc = (((yy - 8) ** 2 + (xx - 8) ** 2) < 16).float()
    x = -800.0 + 30.0 * torch.randn(n, 1, SIDE, SIDE, generator=g)
    x = x + 1100.0 * y.view(-1, 1, 1, 1) * disc
    return x, y


MEAN, STD = -700.0, 300.0
BATCH = ({0: torch.export.Dim.DYNAMIC},)  # export with a free batch size


def _fit(net: nn.Module, x_in: Tensor, y: Tensor, two: bool, steps: int = 60) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        z = net(x_in)
        loss = nn.functional.cross_entropy(z, y) if two else nn.functional.binary_cross_entropy_with_logits(
            z.reshape(-1), y.float())
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def data() -> tuple[Tensor, Tensor]:
    return blobs_hu()


@pytest.fixture(scope="module")
def plain(data: tuple[Tensor, Tensor]) -> nn.Module:
    x, y = data
    return _fit(PlainNet(), (x - MEAN) / STD, y, two=False)


@pytest.fixture(scope="module")
def monai_net(data: tuple[Tensor, Tensor]) -> nn.Module:
    """A MONAI DenseNet (2D, two logits) on a [-1000, 400] HU window."""
    x, y = data
    net = DenseNet(spatial_dims=2, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                   block_config=(2, 2), bn_size=2)
    return _fit(net, ((x + 1000) / 1400).clamp(0, 1), y, two=True, steps=40)


ZSCORE = {"spatial_dims": 2, "input_shape": [SIDE, SIDE],
          "input": {"kind": "zscore", "mean_hu": MEAN, "std_hu": STD}, "output": {"kind": "logit"}}
WINDOW2 = {"spatial_dims": 2, "input_shape": [SIDE, SIDE],
           "input": {"kind": "window", "window_hu": [-1000, 400]}, "output": {"kind": "logits2"}}


def contract(cfg: dict) -> ModelContract:
    return validate_section(ModelContract, cfg, ("contract",))


def _accuracy(model: nn.Module, x_hu: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        z = model(model.to_input(x_hu))
    return float(((z > 0).long() == y).float().mean())


def _same_logits(model: nn.Module, reference: nn.Module, x_hu: Tensor) -> None:
    with torch.no_grad():
        assert torch.allclose(model(model.to_input(x_hu)), reference(reference.to_input(x_hu)), atol=1e-4)


def test_torchscript_and_export_load_with_their_contract(plain: nn.Module, data: tuple[Tensor, Tensor],
                                                         tmp_path: Path) -> None:
    x, y = data
    ts, pt2 = tmp_path / "net.ts", tmp_path / "net.pt2"
    torch.jit.save(torch.jit.script(plain), str(ts))
    torch.export.save(torch.export.export(plain, ((x[:2] - MEAN) / STD,), dynamic_shapes=BATCH), str(pt2))
    assert archive_kind(ts) == "torchscript" and archive_kind(pt2) == "export"
    reference = ExternalClassifier(plain, contract(ZSCORE), "memory")
    for path, source in ((ts, "torchscript"), (pt2, "export")):
        model = load_any(path, contract(ZSCORE))
        assert isinstance(model, ExternalClassifier) and model.source == source and model.output == "logit"
        _same_logits(model, reference, x)
        assert _accuracy(model, x, y) >= 0.9
        # ε in attack units, in HU and in the model's own (z-score) units
        assert model.window_hu == (-1024.0, 3071.0)
        assert model.eps_to_hu(0.001) == pytest.approx(4.095)
        assert model.eps_to_model_units(0.001) == pytest.approx(4.095 / STD)
        report = dry_run(model, model.to_input(x[:4]))
        assert report["deterministic"] and report["gradients"] and report["output_shape"] == [4, 1]


def test_monai_network_two_logits_and_class_conventions(monai_net: nn.Module, data: tuple[Tensor, Tensor],
                                                        tmp_path: Path) -> None:
    x, y = data
    path = tmp_path / "densenet.pt2"
    torch.export.save(torch.export.export(monai_net, (((x[:2] + 1000) / 1400).clamp(0, 1),), dynamic_shapes=BATCH),
                      str(path))
    model = load_any(path, contract(WINDOW2))
    assert _accuracy(model, x, y) >= 0.9
    with torch.no_grad():
        raw = monai_net(model.to_input(x[:6]))
        logit = model(model.to_input(x[:6]))
        assert torch.allclose(logit, raw[:, 1] - raw[:, 0], atol=1e-5)
        # the same network read as 2-class "classes" and as a probability gives the same log-odds
        as_classes = ExternalClassifier(monai_net, contract({**WINDOW2, "output": {"kind": "classes", "classes": 2}}),
                                        "memory")
        assert torch.allclose(as_classes(model.to_input(x[:6])), logit, atol=1e-5)
    dry_run(model, model.to_input(x[:4]))


def test_state_dict_with_a_factory_needs_trust_code(plain: nn.Module, data: tuple[Tensor, Tensor], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    x, _ = data
    weights = tmp_path / "weights.pt"
    torch.save(plain.state_dict(), weights)
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "team_models.py").write_text(textwrap.dedent('''
        from torch import nn
        def build():
            return nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                               nn.Flatten(), nn.Linear(16, 1)))
        def wrong():
            return nn.Linear(3, 1)
    '''))
    monkeypatch.syspath_prepend(str(pkg))
    # the state_dict keys are body.*: the factory's outer Sequential is "0": rename to fit
    state = {k.replace("body.", "0."): v for k, v in plain.state_dict().items()}
    torch.save(state, weights)
    with pytest.raises(DataError, match="--trust-code"):
        load_any(weights, contract(ZSCORE), factory="team_models:build")
    model = load_any(weights, contract(ZSCORE), factory="team_models:build", trust_code=True)
    assert model.source == "factory" and model.trainable
    _same_logits(model, ExternalClassifier(plain, contract(ZSCORE), "memory"), x)
    with pytest.raises(DataError, match="does not fit the network"):
        load_any(weights, contract(ZSCORE), factory="team_models:wrong", trust_code=True)
    with pytest.raises(DataError, match="cannot import"):
        load_any(weights, contract(ZSCORE), factory="team_models:nope", trust_code=True)
    with pytest.raises(DataError, match="state_dict without the network"):
        load_any(weights, contract(ZSCORE))


def test_a_bundle_brings_its_own_contract(plain: nn.Module, data: tuple[Tensor, Tensor], tmp_path: Path) -> None:
    """write_bundle (what check --register logs): the model file and its contract in one directory
    that load_any loads without a contract; a bundle index pointing outside itself is refused."""
    x, _ = data
    ts = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(plain), str(ts))
    spec = tmp_path / "contract.yaml"
    spec.write_text(__import__("yaml").safe_dump(ZSCORE))
    bundle = write_bundle(ts, tmp_path / "bundle", contract_file=spec)
    assert sorted(p.name for p in bundle.iterdir()) == sorted([BUNDLE_FILE, "contract.yaml", "net.ts"])
    model = load_any(bundle)
    assert model.source == "torchscript" and model.contract == contract(ZSCORE)
    _same_logits(model, ExternalClassifier(plain, contract(ZSCORE), "memory"), x)
    (bundle / BUNDLE_FILE).write_text("file: ../net.ts\n")
    with pytest.raises(DataError, match="not a model file inside the bundle"):
        load_any(bundle)


def test_a_pickled_module_is_refused_with_how_to_export(plain: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(plain, path)
    with pytest.raises(DataError, match=r"pickled.*arbitrary code.*torch.jit.save.*torch.export.save") as err:
        load_any(path, contract(ZSCORE))
    assert "\n" not in str(err.value)


def test_onnx_is_black_box(plain: nn.Module, data: tuple[Tensor, Tensor], tmp_path: Path) -> None:
    x, y = data
    path = tmp_path / "net.onnx"
    torch.onnx.export(plain, ((x[:2] - MEAN) / STD,), str(path), input_names=["x"], output_names=["z"],
                      dynamic_axes={"x": {0: "n"}, "z": {0: "n"}}, dynamo=False)
    model = load_any(path, contract(ZSCORE))
    assert model.source == "onnx" and not model.gradients and not model.trainable
    _same_logits(model, ExternalClassifier(plain, contract(ZSCORE), "memory"), x)
    report = dry_run(model, model.to_input(x[:4]))
    assert report["gradients"] is False and "zero_gradient_share" not in report


def test_mlflow_pytorch_models_local_runs_and_registry(plain: nn.Module, data: tuple[Tensor, Tensor],
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, _ = data
    example = ((x[:2] - MEAN) / STD).numpy()
    local = tmp_path / "mlflow_model"
    mlflow.pytorch.save_model(plain, str(local), serialization_format="pt2", input_example=example)
    reference = ExternalClassifier(plain, contract(ZSCORE), "memory")
    model = load_any(local, contract(ZSCORE))
    assert model.source == "mlflow"
    _same_logits(model, reference, x)
    pickled = tmp_path / "mlflow_pickled"
    mlflow.pytorch.save_model(plain, str(pickled), serialization_format="pickle")
    with pytest.raises(DataError, match="pickled MLflow pytorch model.*--trust-code"):
        load_any(pickled, contract(ZSCORE))
    _same_logits(load_any(pickled, contract(ZSCORE), trust_code=True), reference, x)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        mlflow.set_experiment("external")
        with mlflow.start_run() as run:
            mlflow.pytorch.log_model(plain, name="model", serialization_format="pt2", input_example=example,
                                     registered_model_name="team-nodule")
        _same_logits(load_any(f"runs:/{run.info.run_id}/model", contract(ZSCORE)), reference, x)
        _same_logits(load_any("models:/team-nodule/1", contract(ZSCORE)), reference, x)
        with pytest.raises(DataError, match="cannot fetch"):
            load_any("models:/no-such-model/1", contract(ZSCORE))
    finally:
        mlflow.set_tracking_uri(None)


class Noisy(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x) + 0.1 * torch.randn(x.shape[0], 1)
        return out


class NaNs(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.full((x.shape[0], 1), float("nan"))


@pytest.mark.parametrize(("net", "cfg", "message"), [
    (lambda p: p, {**ZSCORE, "output": {"kind": "logits2"}}, r"wrong output shape: a logits2 output .* got \(4, 1\)"),
    (lambda p: NaNs(), ZSCORE, "non-finite outputs"),
    (lambda p: Noisy(p), ZSCORE, "not deterministic in eval mode"),
    (lambda p: p, {**ZSCORE, "input_shape": [SIDE, 8]}, r"does not match the contract's input_shape \[16, 8\]"),
    (lambda p: p, {**ZSCORE, "output": {"kind": "probability"}}, "outputs leave"),
])
def test_the_dry_run_refuses_bad_models_and_contracts(plain: nn.Module, data: tuple[Tensor, Tensor], net, cfg,  # type: ignore[no-untyped-def]
                                                      message: str) -> None:
    x, _ = data
    model = ExternalClassifier(net(plain), contract(cfg), "memory").eval()
    with pytest.raises(DataError, match=message) as err:
        dry_run(model, model.to_input(x[:4]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("cfg", "message"), [
    ({"spatial_dims": 3, "input_shape": [16, 16]}, "has 2 axes; spatial_dims is 3"),
    ({**ZSCORE, "input": {"kind": "zscore", "mean_hu": 0.0}}, "needs mean_hu and std_hu"),
    ({**WINDOW2, "input": {"kind": "display", "window_hu": [0, 1]}}, "window_hu must be null"),
    ({**WINDOW2, "output": {"kind": "classes", "classes": 3, "positive_index": 3}}, "not a class of 3"),
    ({**WINDOW2, "output": {"kind": "softmax"}}, "output.kind"),
])
def test_bad_contracts_are_config_errors(cfg: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        contract(cfg)


def test_missing_contract_and_reference(plain: nn.Module, tmp_path: Path) -> None:
    ts = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(plain), str(ts))
    with pytest.raises(DataError, match="needs a contract"):
        load_any(ts)
    with pytest.raises(DataError, match="no such model file"):
        load_any(tmp_path / "absent.pt2", contract(ZSCORE))


def test_channels_display_inputs_and_ctharden_files(tmp_path: Path) -> None:
    from ctharden.models import CTClassifier, build_model
    from ctharden.models.files import save_model

    seen: list[Tensor] = []

    class ThreeChannel(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            seen.append(x)
            return x.mean(dim=(1, 2, 3)) - 0.5

    rgb = ExternalClassifier(ThreeChannel(), contract({"spatial_dims": 2, "input_shape": [SIDE, SIDE], "channels": 3,
                                                       "input": {"kind": "display"}}), "memory")
    x = torch.rand(4, SIDE, SIDE)  # channel-less, as the datasets store it
    assert torch.equal(rgb.to_input(x), x) and rgb.window_hu is None
    rgb(x)
    assert seen[-1].shape == (4, 3, SIDE, SIDE) and torch.equal(seen[-1][:, 0], seen[-1][:, 2])
    with pytest.raises(ValueError, match="no HU equivalent"):
        rgb.eps_to_hu(0.01)
    own = build_model("nodule3d", spatial_dims=3, window_hu=(-1000.0, 400.0), width=2)
    path = save_model(tmp_path / "model.pt", own)
    loaded = load_any(path)
    assert isinstance(loaded, CTClassifier) and not isinstance(loaded, ExternalClassifier)
