"""Shared fixtures: paths to the embedded real CT samples and small helpers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
LIDC_SAMPLE = DATA / "lidc_idri_sample"
COVID_SAMPLE = DATA / "covid_ct_soares"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: run `dvc pull` (the Makefile's test target does)")
    return path


@pytest.fixture(scope="session")
def lidc_sample() -> Path:
    """The real LIDC-IDRI sample: 32 DICOM slices of LIDC-IDRI-0001 plus three reader XMLs."""
    return _require(LIDC_SAMPLE)


@pytest.fixture(scope="session")
def covid_sample() -> Path:
    """The real SARS-CoV-2 CT sample (Soares et al.): 100 COVID + 100 non-COVID PNGs."""
    return _require(COVID_SAMPLE)


def stage_overrides(tmp: Path) -> list[str]:
    """Overrides that send every stage output under ``tmp`` and point data roots at the samples."""
    return [
        f"paths.datasets={tmp / 'datasets'}",
        f"paths.validation={tmp / 'validation'}",
        f"paths.metrics={tmp / 'metrics'}",
        f"paths.artifacts={tmp / 'artifacts'}",
        f"paths.reports={tmp / 'reports'}",
        f"paths.plots={tmp / 'plots'}",
        f"mlflow.db={tmp / 'mlflow.db'}",
        f"mlflow.artifacts={tmp / 'mlruns'}",
        f"datasets.lidc.root={LIDC_SAMPLE}",
        f"datasets.covid.root={COVID_SAMPLE}",
    ]


@pytest.fixture(scope="session", autouse=True)
def _isolated_prefect_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Prefect state (its SQLite DB, logs) goes to a temp dir, never the user's ~/.prefect."""
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # its heartbeat races the test DB


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, name: str, timeout: float = 120) -> None:
    """Wait until ``GET url`` answers 200; fail with the end of ``log`` if ``proc`` exits or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{name} not healthy after {timeout:.0f} s:\n{log.read_text()[-4000:]}")
