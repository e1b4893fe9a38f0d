"""`dvc pull` + `dvc repro` on a copy of the tracked tree: what a fresh clone does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_fresh_copy_pulls_data_and_reproduces(tmp_path: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    clone = tmp_path / "clone"
    for rel in files:
        if (REPO / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, clone / rel)
    assert not (clone / "data").exists(), "data/ comes from DVC, not git"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "CTHARDEN_PROFILE": "smoke"}
    assert _run(["git", "init", "-q"], clone, env).returncode == 0

    pull = _run(["dvc", "pull", "-q", "data.dvc"], clone, env)
    assert pull.returncode == 0, pull.stderr
    assert len(list((clone / "data" / "lidc_idri_sample" / "LIDC-IDRI-0001_dicom_slab").glob("*.dcm"))) == 32

    repro = _run(["dvc", "repro"], clone, env)
    assert repro.returncode == 0, repro.stdout + repro.stderr
    for name in ("lidc", "covid", "synthetic_nodule3d"):
        ingest = json.loads((clone / "metrics" / "ingest" / f"{name}.json").read_text())
        valid = json.loads((clone / "metrics" / "validate" / f"{name}.json").read_text())
        assert ingest["profile"] == "smoke"
        assert valid["success"] and valid["content_hash"] == ingest["content_hash"]
        assert (clone / "reports" / "validation" / name / "data_docs" / "index.html").is_file()
    synth = json.loads((clone / "metrics" / "ingest" / "synthetic_nodule3d.json").read_text())
    assert synth["n_samples"] == 24, "the smoke profile's size"

    hardened = json.loads((clone / "metrics" / "robustness_hardened.json").read_text())
    assert set(hardened) == {"nodule3d", "covid2d"} and all(r["variant"] == "hardened" for r in hardened.values())
    for job in hardened:
        assert json.loads((clone / "metrics" / "tune" / f"{job}.json").read_text())["eps"] > 0

    gate = json.loads((clone / "metrics" / "gate.json").read_text())
    assert set(gate) == {"baseline", "hardened"} and set(gate["hardened"]) == {"nodule3d", "covid2d"}
    registered = json.loads((clone / "metrics" / "register.json").read_text())
    assert {o["variant"] for o in registered["jobs"]["nodule3d"]} == {"baseline", "hardened"}

    # everything up to date except `register`, which always runs (the registry is state outside DVC)
    status = _run(["dvc", "status"], clone, env)
    stages = [line for line in status.stdout.splitlines() if line and not line[0].isspace()]
    assert stages == ["register:"] and "always changed" in status.stdout, status.stdout
