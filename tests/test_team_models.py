"""A team's own models on a team's own CT, end to end through ``ctharden check``.

Everything a team would bring is made here, outside ctharden: CT written as NIfTI volumes, as one
DICOM series folder per patient and as single DICOM slices, listed in manifest CSVs and ingested with
``ctharden ingest table``; networks trained on those HU arrays in plain PyTorch (a MONAI DenseNet in
2D and 3D, a plain ``nn.Module``) and exported to ``.pt2`` (torch.export), an MLflow pytorch model
directory, TorchScript and ONNX. Each export is checked on its dataset under the smoke profile: the
report, ``gate.json`` and a verdict come out, and the exit code is the verdict; the ONNX model gets
the black-box evaluation with its white-box rows marked not applicable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import yaml
from ct_files import write_dicom, write_manifest, write_nifti
from monai.networks.nets import DenseNet
from pydicom.uid import generate_uid
from torch import Tensor, nn

CLI = [sys.executable, "-m", "ctharden.cli"]
EXIT = {"pass": 0, "inconclusive": 3, "fail": 4}
SIDE, PATIENTS = 16, 20
WINDOW = {"kind": "window", "window_hu": [-1000.0, 400.0]}
ZSCORE = {"kind": "zscore", "mean_hu": -700.0, "std_hu": 300.0}
pytestmark = pytest.mark.slow


def nodule_hu(i: int, dims: int) -> np.ndarray:
    """``(16,) * dims`` HU: lung (-800 ± 30 HU); odd ``i`` (label 1) adds a +100 HU nodule of radius
    4 px near the centre."""
    rng = np.random.default_rng(i)
    hu = -800.0 + 30.0 * rng.standard_normal((SIDE,) * dims)
    if i % 2:
        centre = SIDE / 2 + rng.uniform(-2, 2, dims)
        grid = np.stack(np.meshgrid(*[np.arange(SIDE)] * dims, indexing="ij"))
        inside = ((grid - centre.reshape(-1, *[1] * dims)) ** 2).sum(0) < 16
        hu[inside] = 100.0 + 30.0 * rng.standard_normal(int(inside.sum()))
    return hu.astype(np.float32)


class PlainNet3d(nn.Module):
    """A team's plain 3D CNN on HU z-scores: ``(N, 1, 16, 16, 16)`` -> one logit ``(N, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(2), nn.Flatten(),
                                  nn.Linear(32, 1))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return out


def _fit(net: nn.Module, x: Tensor, y: Tensor, steps: int = 40) -> nn.Module:
    """Adam on the whole (tiny) set: cross-entropy for two logits, BCE for one."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        z = net(x)
        loss = nn.functional.cross_entropy(z, y) if z.shape[1] == 2 else \
            nn.functional.binary_cross_entropy_with_logits(z.reshape(-1), y.float())
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return net.eval()


def _scaled(hu: Tensor, scaling: dict[str, Any]) -> Tensor:
    """The team's own input scaling (what the contract declares), applied outside ctharden."""
    if scaling["kind"] == "window":
        lo, hi = scaling["window_hu"]
        return ((hu - lo) / (hi - lo)).clamp(0, 1)
    return (hu - scaling["mean_hu"]) / scaling["std_hu"]


def _densenet(dims: int) -> nn.Module:
    return DenseNet(spatial_dims=dims, in_channels=1, out_channels=2, init_features=4, growth_rate=4,
                    block_config=(2, 2), bn_size=2)


def _ingest(root: Path, manifest: Path, task: str, out: Path) -> Path:
    r = subprocess.run([*CLI, "ingest", "table", "--manifest", str(manifest), "--root", str(root), "--task", task,
                        "--out", str(out), "--n-folds", "2", "--seed", "0", "--test-fraction", "0.3"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three ingested datasets and five exported models with their contracts."""
    root = tmp_path_factory.mktemp("team_models")
    labels = [i % 2 for i in range(PATIENTS)]
    vols = [nodule_hu(i, 3) for i in range(PATIENTS)]
    slices = [nodule_hu(100 + i, 2) for i in range(PATIENTS)]
    rows: dict[str, list[dict[str, Any]]] = {"nifti": [], "series": [], "slices": []}
    for i, (vol, sl, y) in enumerate(zip(vols, slices, labels, strict=True)):
        (root / "nifti").mkdir(exist_ok=True)
        write_nifti(root / "nifti" / f"P{i:02d}.nii.gz", vol, slope=1.0, inter=-1024.0, zooms=(1.0, 1.0, 1.0))
        rows["nifti"].append({"path": f"nifti/P{i:02d}.nii.gz", "label": y, "patient_id": f"P{i:02d}"})
        folder = root / "series" / f"P{i:02d}"
        folder.mkdir(parents=True)
        uid = generate_uid()
        for k in range(SIDE):
            write_dicom(folder / f"{k:03d}.dcm", vol[k], z=float(k), spacing=1.0, slope=1.0, intercept=-1024.0,
                        series_uid=uid, patient=f"P{i:02d}", thickness=1.0)
        rows["series"].append({"path": f"series/P{i:02d}", "label": y, "patient_id": f"P{i:02d}"})
        (root / "slices").mkdir(exist_ok=True)
        write_dicom(root / "slices" / f"S{i:02d}.dcm", sl, z=0.0, spacing=0.7, slope=1.0, intercept=-1024.0,
                    series_uid=generate_uid(), patient=f"S{i:02d}")
        rows["slices"].append({"path": f"slices/S{i:02d}.dcm", "label": y, "patient_id": f"S{i:02d}"})
    data = {
        "nifti3d": _ingest(root, write_manifest(root / "nifti.csv", rows["nifti"]), "nodule3d", root / "ds_nifti"),
        "series3d": _ingest(root, write_manifest(root / "series.csv", rows["series"]), "nodule3d", root / "ds_series"),
        "slices2d": _ingest(root, write_manifest(root / "slices.csv", rows["slices"]), "nodule2d", root / "ds_slices"),
    }
    y = torch.tensor(labels)
    x3 = torch.from_numpy(np.stack(vols))[:, None]
    x2 = torch.from_numpy(np.stack(slices))[:, None]
    batch = ({0: torch.export.Dim.DYNAMIC},)

    def contract(name: str, dims: int, scaling: dict[str, Any], output: str) -> Path:
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"spatial_dims": dims, "input_shape": [SIDE] * dims, "input": scaling,
                                        "output": {"kind": output}}))
        return path

    monai3d = _fit(_densenet(3), _scaled(x3, WINDOW), y)
    torch.export.save(torch.export.export(monai3d, (_scaled(x3[:2], WINDOW),), dynamic_shapes=batch),
                      str(root / "monai3d.pt2"))
    mlflow.pytorch.save_model(monai3d, str(root / "monai3d_mlflow"), serialization_format="pt2",
                              input_example=_scaled(x3[:2], WINDOW).numpy())
    plain3d = _fit(PlainNet3d(), _scaled(x3, ZSCORE), y)
    torch.jit.save(torch.jit.script(plain3d), str(root / "plain3d.ts"))
    torch.onnx.export(plain3d, (_scaled(x3[:2], ZSCORE),), str(root / "plain3d.onnx"), input_names=["x"],
                      output_names=["z"], dynamic_axes={"x": {0: "n"}, "z": {0: "n"}}, dynamo=False)
    monai2d = _fit(_densenet(2), _scaled(x2, WINDOW), y)
    torch.export.save(torch.export.export(monai2d, (_scaled(x2[:2], WINDOW),), dynamic_shapes=batch),
                      str(root / "monai2d.pt2"))
    contracts = {"monai3d": contract("monai3d", 3, WINDOW, "logits2"),
                 "plain3d": contract("plain3d", 3, ZSCORE, "logit"),
                 "monai2d": contract("monai2d", 2, WINDOW, "logits2")}
    return {"root": root, "data": data, "contracts": contracts}


CASES = {  # model file, its contract, the dataset, the policy, the source ctharden must recognise
    "monai3d-pt2-nifti": ("monai3d.pt2", "monai3d", "nifti3d", "nodule3d", "export"),
    "monai3d-mlflow-nifti": ("monai3d_mlflow", "monai3d", "nifti3d", "nodule3d", "mlflow"),
    "plain3d-torchscript-dicom-series": ("plain3d.ts", "plain3d", "series3d", "nodule3d", "torchscript"),
    "plain3d-onnx-dicom-series": ("plain3d.onnx", "plain3d", "series3d", "nodule3d", "onnx"),
    "monai2d-pt2-dicom-slices": ("monai2d.pt2", "monai2d", "slices2d", "nodule2d", "export"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_team_model_is_checked_on_a_team_dataset(team: dict[str, Any], case: str) -> None:
    model, contract, dataset, policy, source = CASES[case]
    root, out = team["root"], team["root"] / f"check_{case}"
    r = subprocess.run(
        [*CLI, "--profile", "smoke", "--set", "gate.defaults.sanity=true", "check", "--model", str(root / model),
         "--contract", str(team["contracts"][contract]), "--data", str(team["data"][dataset]), "--policy", policy,
         "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert (out / "gate.json").is_file(), r.stdout + r.stderr
    gate = json.loads((out / "gate.json").read_text())
    assert r.returncode == EXIT[gate["verdict"]], r.stdout + r.stderr
    assert gate["model"]["arch"] == f"external:{source}" and gate["dataset"]["task"] == policy
    assert gate["verdict"].upper() in (out / "index.html").read_text()
    result = json.loads((out / "robustness.json").read_text())
    assert result["clean"]["test"]["auc"] > 0.8, "the contract's scaling reached the model: it separates the classes"
    if source == "onnx":
        assert gate["verdict"] in ("fail", "inconclusive") and result["pgd"] == {} and "blackbox" in result
        assert gate["criteria"]["sanity"]["note"] == "not applicable: no gradients"
        assert "not applicable: no gradients" in (out / "index.html").read_text()
    else:
        assert "ensemble" in result["pgd"]["linf"] and gate["dry_run"]["gradients"] is True
        assert gate["criteria"]["sanity"]["decision"] in ("pass", "fail")
