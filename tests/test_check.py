"""``ctharden check`` on a model trained outside ctharden: the dry run, the evaluation, the gate,
the report and ``gate.json``, and the exit code as the verdict; bad contracts refused in one line.
Small settings: the smoke profile (10-step attacks on a handful of samples)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn

from ctharden.data.arrays import load_arrayset
from ctharden.data.synthetic import generate_synthetic
from ctharden.data.validation import validate_dataset

CLI = [sys.executable, "-m", "ctharden.cli"]
WINDOW = (-1000.0, 400.0)
pytestmark = pytest.mark.slow


class TeamNet(nn.Module):
    """A team's plain 3D CNN on a [-1000, 400] HU window, two logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(2), nn.Flatten(),
                                  nn.Linear(32, 2))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return out


class Rounded(nn.Module):
    """The team's net behind an 8-level input quantiser: gradient masking."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(torch.round(x * 8) / 8)
        return out


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("team")
    ds = root / "data"
    generate_synthetic("nodule3d", ds, n=24, seed=5, n_folds=2, test_fraction=0.3)
    report = validate_dataset(ds, root / "validation")
    assert report.success
    arrays = load_arrayset(ds, nn.Identity())
    x = ((arrays.raw - WINDOW[0]) / (WINDOW[1] - WINDOW[0])).clamp(0, 1).unsqueeze(1)
    y = arrays.y
    torch.manual_seed(0)
    net = TeamNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(30):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    net.eval()
    torch.jit.save(torch.jit.script(net), str(root / "team.ts"))
    torch.jit.save(torch.jit.script(Rounded(net).eval()), str(root / "masked.ts"))
    torch.onnx.export(net, (x[:2],), str(root / "team.onnx"), input_names=["x"], output_names=["z"],
                      dynamic_axes={"x": {0: "n"}, "z": {0: "n"}}, dynamo=False)
    contract = {"spatial_dims": 3, "input_shape": [32, 32, 32],
                "input": {"kind": "window", "window_hu": list(WINDOW)}, "output": {"kind": "logits2"}}
    (root / "contract.yaml").write_text(yaml.safe_dump(contract))
    (root / "bad_contract.yaml").write_text(yaml.safe_dump({**contract, "input_shape": [16, 16, 16]}))
    (root / "wrong_output.yaml").write_text(yaml.safe_dump({**contract, "output": {"kind": "logit"}}))
    return {"root": root, "data": ds, "validation": root / "validation"}


def _check(team: dict[str, Path], model: str, out: str, *extra: str, contract: str = "contract.yaml",
           register: str | None = None) -> subprocess.CompletedProcess[str]:
    """``ctharden --profile smoke EXTRA... check`` of ``model`` on the team's data under the nodule3d policy."""
    root = team["root"]
    return subprocess.run(
        [*CLI, "--profile", "smoke", *extra, "check", "--model", str(root / model), "--data", str(team["data"]),
         "--contract", str(root / contract), "--policy", "nodule3d", "--out", str(root / out),
         "--validation", str(team["validation"]), *(["--register", register] if register else [])],
        capture_output=True, text=True, timeout=900)


def test_a_team_model_is_checked_and_the_exit_code_is_the_verdict(team: dict[str, Path]) -> None:
    r = _check(team, "team.ts", "out")
    gate = json.loads((team["root"] / "out" / "gate.json").read_text())
    assert r.returncode == {"pass": 0, "inconclusive": 3, "fail": 4}[gate["verdict"]], r.stderr
    assert gate["policy"] == "nodule3d" and gate["model"]["arch"] == "external:torchscript"
    assert gate["dry_run"]["deterministic"] and gate["dry_run"]["output_shape"] == [8, 2]
    assert gate["model"]["config"]["contract"]["output"]["kind"] == "logits2"
    for row in gate["criteria"].values():
        assert {"value", "threshold", "decision"} <= set(row)
    result = json.loads((team["root"] / "out" / "robustness.json").read_text())
    assert "ensemble" in result["pgd"]["linf"] and result["outcomes"]["ensemble_linf"]["ids"]
    html = (team["root"] / "out" / "index.html").read_text()
    assert "Per-attack breakdown" in html and gate["verdict"].upper() in html
    assert gate["verdict"].upper() in r.stdout and "report:" in r.stdout


def test_an_onnx_model_gets_the_black_box_check(team: dict[str, Path]) -> None:
    """No gradients: clean metrics, random NPS and Square run; every white-box row and criterion
    says "not applicable: no gradients", robust accuracy is Square's upper bound (fail or
    inconclusive, never pass), and the clean numbers equal the TorchScript export's."""
    r = _check(team, "team.onnx", "onnx", "--set", "gate.defaults.sanity=true")
    out = team["root"] / "onnx"
    gate = json.loads((out / "gate.json").read_text())
    assert r.returncode == {"pass": 0, "inconclusive": 3, "fail": 4}[gate["verdict"]], r.stderr
    assert gate["verdict"] in ("fail", "inconclusive") and gate["white_box"] is False
    assert gate["model"]["arch"] == "external:onnx" and gate["dry_run"]["gradients"] is False
    rows = gate["criteria"]
    robust = {n: row for n, row in rows.items() if n.startswith("robust_")}
    assert robust and all(row["decision"] in ("fail", "inconclusive") for row in robust.values())
    for row in robust.values():
        assert row["metric"].startswith("robust_blackbox_") and row["n"] and row["upper"] is not None
        if row["decision"] == "inconclusive":
            assert "upper bound" in row["note"] and row["samples_to_decide"] is None
    assert rows["sanity"]["decision"] == "inconclusive" and rows["sanity"]["note"] == "not applicable: no gradients"
    result = json.loads((out / "robustness.json").read_text())
    assert result["pgd"] == {} and result["optimized_nps"] == {} and result["sanity_passed"] is None
    assert result["white_box"] == {"applicable": False, "reason": "not applicable: no gradients",
                                   "not_run": ["optimized_nps", "pgd", "attack ensemble (gradient members)",
                                               "sanity checks"]}
    square = result["blackbox"]["linf"]
    assert square["attacks"] == ["square"] and square["bound"] == "upper" and square["eps"][0] == 0.0
    assert result["outcomes"]["blackbox_linf"]["ids"] and result["random_nps"]["test"]["n"] > 0
    ts = json.loads((team["root"] / "out" / "robustness.json").read_text())
    assert result["clean"]["test"]["auc"] == pytest.approx(ts["clean"]["test"]["auc"], abs=1e-6)
    assert square["accuracy"][0] == pytest.approx(ts["pgd"]["linf"]["accuracy"][0])
    html = (out / "index.html").read_text()
    assert html.count("not applicable: no gradients") >= 3 and "Square alone: an upper bound" in html


def test_register_puts_only_a_passing_model_into_the_registry(team: dict[str, Path]) -> None:
    """--register: the passing TorchScript model becomes version 1 (champion) tagged like a pipeline
    model; the inconclusive ONNX model is not registered; the registered version loads without a
    contract file (its bundle brings one) and checks the same; registering it again is a no-op."""
    from mlflow import MlflowClient

    from ctharden.core.io import sha256_file

    root = team["root"]
    store = root / "registry"
    ml = ["--set", f"mlflow.db={store / 'mlflow.db'}", "--set", f"mlflow.artifacts={store / 'mlruns'}"]
    r = _check(team, "team.ts", "reg_ts", *ml, register="team-model")
    gate = json.loads((root / "reg_ts" / "gate.json").read_text())
    assert gate["verdict"] == "pass" and r.returncode == 0, r.stdout + r.stderr
    reg = gate["registration"]
    assert reg["status"] == "registered" and reg["version"] == "1" and reg["aliases"] == ["challenger", "champion"]
    assert "registered: models:/team-model/1" in " ".join(r.stdout.split())
    r = _check(team, "team.onnx", "reg_onnx", *ml, "--set", "gate.defaults.sanity=true", register="team-model")
    assert r.returncode == 3 and "not registered as team-model" in r.stdout, r.stdout + r.stderr
    assert json.loads((root / "reg_onnx" / "gate.json").read_text())["registration"]["status"] == "rejected"
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (version,) = client.search_model_versions("name = 'team-model'")
    tags = version.tags
    assert tags["ctharden.gate"] == "passed" and tags["ctharden.policy"] == "nodule3d"
    assert tags["ctharden.model_sha256"] == sha256_file(root / "team.ts") and tags["ctharden.variant"] == "external"
    assert tags["ctharden.gate.robust_linf_acc_eps0.01"].endswith(": pass")
    assert "ctharden.data_dvc_md5" not in tags and tags["ctharden.registration"] == "complete"
    # the registered version checks again from the registry, with the contract it was registered with
    r = subprocess.run(
        [*CLI, "--profile", "smoke", *ml, "check", "--model", "models:/team-model@champion", "--data",
         str(team["data"]), "--policy", "nodule3d", "--out", str(root / "reg_again"),
         "--validation", str(team["validation"])], capture_output=True, text=True, timeout=900)
    again = json.loads((root / "reg_again" / "gate.json").read_text())
    assert r.returncode == 0 and again["model"]["arch"] == "external:torchscript", r.stdout + r.stderr
    assert again["criteria"] == gate["criteria"]
    r = _check(team, "team.ts", "reg_ts2", *ml, register="team-model")
    assert json.loads((root / "reg_ts2" / "gate.json").read_text())["registration"]["status"] == "already registered"
    assert len(client.search_model_versions("name = 'team-model'")) == 1


def test_a_masked_team_model_fails_the_check(team: dict[str, Path]) -> None:
    r = _check(team, "masked.ts", "masked", "--set", "gate.defaults.sanity=true")
    gate = json.loads((team["root"] / "masked" / "gate.json").read_text())
    assert r.returncode == 4 and gate["verdict"] == "fail" and "sanity" in gate["failed"], r.stdout + r.stderr


def _harden(team: dict[str, Path], model: str, out: str, *extra: str) -> subprocess.CompletedProcess[str]:
    root = team["root"]
    return subprocess.run(
        [*CLI, "--profile", "smoke", "harden", "--model", str(root / model), "--data", str(team["data"]),
         "--contract", str(root / "contract.yaml"), "--policy", "nodule3d", "--out", str(root / out),
         "--validation", str(team["validation"]), *extra],
        capture_output=True, text=True, timeout=900)


def test_harden_fine_tunes_a_team_model_and_checks_before_and_after(team: dict[str, Path]) -> None:
    """`ctharden harden --model`: adversarial fine-tuning of the TorchScript model at the given ε,
    saved as TorchScript, both models checked; the original file untouched."""
    root = team["root"]
    before = (root / "team.ts").read_bytes()
    r = _harden(team, "team.ts", "hard", "--method", "adv", "--eps", "0.01")
    rec = json.loads((root / "hard" / "harden.json").read_text())
    assert r.returncode == {"pass": 0, "inconclusive": 3, "fail": 4}[rec["hardened"]["verdict"]], r.stdout + r.stderr
    assert rec["method"] == "adv" and rec["eps"] == 0.01 and rec["source"] == "torchscript" and rec["history"]
    assert rec["hardened_model"].endswith("hardened.ts")
    baseline = json.loads((root / "hard" / "baseline" / "gate.json").read_text())
    hardened = json.loads((root / "hard" / "hardened" / "gate.json").read_text())
    assert rec["baseline"]["verdict"] == baseline["verdict"] and rec["hardened"]["verdict"] == hardened["verdict"]
    assert baseline["model"]["file"] == str(root / "team.ts") and hardened["model"]["file"] == rec["hardened_model"]
    assert hardened["model"]["arch"] == "external:torchscript"
    old, new = torch.jit.load(str(root / "team.ts")), torch.jit.load(rec["hardened_model"])
    moved = [float((a - b).abs().max()) for a, b in zip(old.parameters(), new.parameters(), strict=True)]
    assert max(moved) > 0 and (root / "team.ts").read_bytes() == before
    assert "hardened with adv ε=0.01" in " ".join(r.stdout.split())


@pytest.mark.parametrize(("model", "extra", "message"), [
    ("team.onnx", ("--eps", "0.01"), "cannot be fine-tuned"),
    ("team.ts", ("--method", "adv"), "needs a training eps"),
    ("team.ts", ("--method", "dropout", "--eps", "0.01"), "not a hardening method"),
])
def test_harden_refuses_what_it_cannot_train_in_one_line(team: dict[str, Path], model: str, extra: tuple[str, ...],
                                                         message: str) -> None:
    r = _harden(team, model, "hard_bad", *extra)
    assert r.returncode == 1 and message in " ".join(r.stderr.split()), r.stdout + r.stderr
    assert not (team["root"] / "hard_bad" / "harden.json").exists()


@pytest.mark.parametrize(("contract", "message"), [
    ("bad_contract.yaml", r"input_shape \[16, 16, 16\] does not match"),
    ("wrong_output.yaml", "wrong output shape: a logit output must be"),
])
def test_a_contract_that_does_not_fit_is_refused_in_one_line(team: dict[str, Path], contract: str,
                                                             message: str) -> None:
    r = _check(team, "team.ts", "bad", contract=contract)
    assert r.returncode == 1
    err = " ".join(r.stderr.split())
    assert "error:" in err and __import__("re").search(message, err), r.stderr
    assert not (team["root"] / "bad" / "gate.json").exists()
