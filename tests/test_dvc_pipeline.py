"""`dvc pull` + `dvc repro` on a copy of the tracked tree: what a fresh clone does.

The module's clone (git-tracked files only, no data/) pulls data.dvc from the in-repo remote and
reproduces the smoke profile up to training (`dvc repro train`: ingest, validate and train every
job); one test checks that, the other reproduces the rest of the pipeline (evaluate, tune, harden,
evaluate_hardened, gate, register) in the same clone. Neither writes what the other reads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

# Hang guards, never time limits: each is far above the time the command was measured to take on a
# loaded 2-core machine (the suite and other jobs running alongside), so only a hang reaches it.
PULL_TIMEOUT = 300  # `dvc pull data.dvc` from the in-repo remote: measured 3 s
STATUS_TIMEOUT = 300  # `git init`, `dvc status`: measured 2 s
REPRO_TRAIN_TIMEOUT = 1500  # `dvc repro train` (8 stages): measured 310 s
REPRO_REST_TIMEOUT = 5400  # `dvc repro` of the other 8 stages: measured 1320 s (evaluate alone 625 s)

JOBS = {"nodule2d", "nodule3d", "covid2d"}
# `dvc repro train` runs the train stages and what they depend on; no job trains on lidc
UP_TO_TRAIN = ["ingest_lidc2d", "ingest_covid", "ingest_synthetic_nodule3d", "validate@lidc2d", "validate@covid",
               "validate@synthetic_nodule3d", "train@nodule2d", "train@nodule3d", "train@covid2d"]
AFTER_TRAIN = ["ingest_lidc", "validate@lidc", "evaluate", "tune@nodule2d", "tune@nodule3d", "tune@covid2d",
               "harden@nodule2d", "harden@nodule3d", "harden@covid2d", "evaluate_hardened", "gate", "register"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _stages(status_stdout: str) -> list[str]:
    """The stage names `dvc status` reports as changed (its unindented ``name:`` lines)."""
    return [line.rstrip(":") for line in status_stdout.splitlines() if line and not line[0].isspace()]


def _ran(repro_stdout: str) -> list[str]:
    """The stages `dvc repro` ran, in order."""
    return re.findall(r"^Running stage '([^']+)'", repro_stdout, flags=re.M)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A copy of the git-tracked files, ``dvc pull data.dvc``, ``dvc repro train`` on the smoke
    profile, and what ``dvc status`` said right after."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    root = tmp_path_factory.mktemp("dvc") / "clone"
    for rel in files:
        if (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    had_data = (root / "data").exists()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", CTHARDEN_PROFILE="smoke")
    assert _run(["git", "init", "-q"], root, env, STATUS_TIMEOUT).returncode == 0
    pull = _run(["dvc", "pull", "-q", "data.dvc"], root, env, PULL_TIMEOUT)
    repro = _run(["dvc", "repro", "train"], root, env, REPRO_TRAIN_TIMEOUT) if pull.returncode == 0 else None
    status = _run(["dvc", "status"], root, env, STATUS_TIMEOUT) if repro and repro.returncode == 0 else None
    return {"root": root, "env": env, "had_data": had_data, "pull": pull, "repro": repro, "status": status}


@pytest.mark.slow
def test_fresh_copy_pulls_data_and_reproduces(clone: dict[str, Any]) -> None:
    root, pull, repro, status = clone["root"], clone["pull"], clone["repro"], clone["status"]
    assert not clone["had_data"], "data/ comes from DVC, not git"
    assert pull.returncode == 0, pull.stderr
    assert len(list((root / "data" / "lidc_idri_sample" / "LIDC-IDRI-0001_dicom_slab").glob("*.dcm"))) == 32

    assert repro is not None and repro.returncode == 0, repro and repro.stdout + repro.stderr
    assert sorted(_ran(repro.stdout)) == sorted(UP_TO_TRAIN), repro.stdout
    for name in ("lidc2d", "covid", "synthetic_nodule3d"):  # what train depends on (lidc: below)
        ingest = json.loads((root / "metrics" / "ingest" / f"{name}.json").read_text())
        valid = json.loads((root / "metrics" / "validate" / f"{name}.json").read_text())
        assert ingest["profile"] == "smoke"
        assert valid["success"] and valid["content_hash"] == ingest["content_hash"]
        assert (root / "reports" / "validation" / name / "data_docs" / "index.html").is_file()
    synth = json.loads((root / "metrics" / "ingest" / "synthetic_nodule3d.json").read_text())
    assert synth["n_samples"] == 24, "the smoke profile's size"
    for job in JOBS:
        trained = json.loads((root / "metrics" / "train" / f"{job}.json").read_text())
        assert trained["profile"] == "smoke" and (root / trained["model_file"]).is_file()

    # right after: the stages up to train are up to date, exactly the later ones are pending
    assert status is not None and status.returncode == 0, status and status.stderr
    assert sorted(_stages(status.stdout)) == sorted(AFTER_TRAIN), status.stdout


@pytest.mark.slow
def test_fresh_copy_reproduces_evaluation_hardening_gate_and_registry(clone: dict[str, Any]) -> None:
    """`dvc repro` after the module's `dvc repro train`: only the later stages run."""
    root, env = clone["root"], clone["env"]
    assert clone["repro"] is not None and clone["repro"].returncode == 0, "the module's clone reproduced to train"
    repro = _run(["dvc", "repro"], root, env, REPRO_REST_TIMEOUT)
    assert repro.returncode == 0, repro.stdout + repro.stderr
    assert sorted(_ran(repro.stdout)) == sorted(AFTER_TRAIN), repro.stdout
    lidc = json.loads((root / "metrics" / "validate" / "lidc.json").read_text())
    assert lidc["success"] and json.loads((root / "metrics" / "ingest" / "lidc.json").read_text())["profile"] == "smoke"

    baseline = json.loads((root / "metrics" / "robustness.json").read_text())
    assert set(baseline) == JOBS and all(r.get("variant", "baseline") == "baseline" for r in baseline.values())

    hardened = json.loads((root / "metrics" / "robustness_hardened.json").read_text())
    assert set(hardened) == JOBS and all(r["variant"] == "hardened" for r in hardened.values())
    for job in hardened:
        assert json.loads((root / "metrics" / "tune" / f"{job}.json").read_text())["eps"] > 0

    gate = json.loads((root / "metrics" / "gate.json").read_text())
    assert set(gate) == {"baseline", "hardened"} and set(gate["hardened"]) == JOBS
    registered = json.loads((root / "metrics" / "register.json").read_text())
    assert {o["variant"] for o in registered["jobs"]["nodule3d"]} == {"baseline", "hardened"}

    # everything up to date except `register`, which always runs (the registry is state outside DVC)
    status = _run(["dvc", "status"], root, env, STATUS_TIMEOUT)
    stages = [line for line in status.stdout.splitlines() if line and not line[0].isspace()]
    assert stages == ["register:"] and "always changed" in status.stdout, status.stdout
