"""The CLI front door: --help everywhere, one-line errors with non-zero exits, validation gating."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, stage_overrides

CLI = [str(Path(sys.executable).parent / "ctharden")]
COMMANDS = [[], ["ingest"], ["ingest", "lidc"], ["ingest", "covid"], ["ingest", "synthetic"], ["ingest", "table"],
            ["validate"], ["check"],
            ["stage"], ["stage", "ingest"], ["stage", "validate"], ["stage", "data-version"], ["stage", "train"],
            ["stage", "evaluate"], ["stage", "tune"], ["stage", "harden"], ["evaluate"], ["train"], ["study"],
            ["study", "architectures"], ["study", "moons"], ["gate"], ["register"], ["ci-gate"]]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    # a hang guard: one command took at most 8.5 s (14 s on a loaded machine) on a 2-core CPU
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "ctharden")
def test_help_on_every_command(cmd: list[str]) -> None:
    r = run(*cmd, "--help")
    assert r.returncode == 0 and "Usage" in r.stdout, r.stderr


def test_bad_input_is_one_line_and_non_zero(tmp_path: Path) -> None:
    r = run("ingest", "covid", "--root", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and r.stderr.strip().startswith("error:")
    r = run("--profile", "nope", "stage", "ingest", "lidc")
    assert r.returncode == 1 and "unknown profile 'nope'" in r.stderr
    for args in (["evaluate", "--nope"], ["stage", "nope"]):  # usage errors: typer's message, no traceback
        r = run(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "Try 'ctharden" in r.stderr, r.stderr


@pytest.mark.slow  # three CLI runs that import the whole stack: 24 s on a 2-core CPU
def test_validate_gates_a_corrupted_dataset(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    r = run("ingest", "synthetic", "--task", "nodule3d", "--out", str(out), "--n", "12", "--seed", "3")
    assert r.returncode == 0, r.stderr
    ok = run("validate", str(out), "--report", str(tmp_path / "rep"))
    assert ok.returncode == 0 and "valid" in ok.stdout
    victim = sorted((out / "arrays").glob("*.npy"))[4]
    cube = np.load(victim)
    cube[3, 3, 3] = np.nan
    np.save(victim, cube)
    bad = run("validate", str(out), "--report", str(tmp_path / "rep"))
    assert bad.returncode == 1
    assert victim.stem in bad.stderr and "nan_count" in bad.stderr


@pytest.mark.slow  # three CLI runs that import the whole stack: 13 s on a 2-core CPU
def test_stage_commands_use_params_and_profiles(tmp_path: Path) -> None:
    sets = [a for o in stage_overrides(tmp_path) for a in ("--set", o)]
    r = run("--profile", "smoke", *sets, "stage", "ingest", "synthetic_nodule3d")
    assert r.returncode == 0, r.stderr
    r = run("--profile", "smoke", *sets, "stage", "validate", "synthetic_nodule3d")
    assert r.returncode == 0 and "passed" in r.stdout, r.stderr
    r = run("--profile", "smoke", *sets, "stage", "data-version")
    assert r.returncode == 0 and "synthetic_nodule3d" in r.stdout and "data_dvc_md5" in r.stdout


def test_lidc_count_only_prints_the_funnel() -> None:
    r = run("ingest", "lidc", "--root", "data/lidc_idri_sample", "--count-only")
    assert r.returncode == 0, r.stderr
    assert "nodules_ge3mm" in r.stdout and "1226" in r.stdout and "counted here: 6 nodules" in r.stdout


@pytest.mark.slow  # three CLI runs that import the whole stack: 41 s on a 2-core CPU
def test_evaluate_refuses_untrained_jobs_and_half_given_options(tmp_path: Path) -> None:
    over = [a for o in stage_overrides(tmp_path) for a in ("--set", o)]
    r = run("--profile", "smoke", *over, "evaluate", "nodule3d")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "has not been validated" in r.stderr or "has not been trained" in r.stderr, r.stderr
    assert not (tmp_path / "metrics" / "robustness.json").exists(), "nothing written on failure"
    r = run("evaluate", "--model", str(tmp_path / "m.pt"))
    assert r.returncode != 0 and "--data" in r.stderr
    r = run("--set", "robustness.defaults.random.k=0", "--profile", "smoke", *over, "stage", "evaluate")
    assert r.returncode == 1 and "robustness.random.k" in r.stderr, r.stderr
