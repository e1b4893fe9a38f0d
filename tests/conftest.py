"""Shared fixtures: paths to the embedded real CT samples, small helpers, and one smoke-profile
pipeline tree per session (``smoke_datasets``, ``smoke_tree``, ``smoke_tree_covid2d``)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
LIDC_SAMPLE = DATA / "lidc_idri_sample"
COVID_SAMPLE = DATA / "covid_ct_soares"
LIDC_CROPS = DATA / "lidc_maxslice"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: run `dvc pull` (the Makefile's test target does)")
    return path


@pytest.fixture(scope="session")
def lidc_sample() -> Path:
    """The real LIDC-IDRI sample: 32 DICOM slices of LIDC-IDRI-0001 plus three reader XMLs."""
    return _require(LIDC_SAMPLE)


@pytest.fixture(scope="session")
def lidc_crops() -> Path:
    """The real LIDC-IDRI crop release: 2105 71x71 crops of 677 patients + annotations.csv."""
    return _require(LIDC_CROPS)


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
        f"datasets.lidc2d.root={LIDC_CROPS}",
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


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, name: str, timeout: float = 300) -> None:
    """Wait until ``GET url`` answers 200; fail with the end of ``log`` if ``proc`` exits or time runs out.

    ``timeout`` is a hang guard: a Prefect server was measured healthy after 11-17 s, an MLflow
    server after 19-47 s, on a loaded 2-core machine."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # one poll: a slow answer is polled again
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{name} not healthy after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


# --- one smoke-profile tree per session ------------------------------------------------------------
#
# Building the smoke pipeline (ingest + validate every dataset, train, evaluate the baseline) is the
# costliest setup of the suite; it is done once per session here. Modules that only read a tree use
# ``smoke_tree`` as it is; modules that write into a tree (tune, harden, gate, register, anything
# that changes files other tests read) take ``smoke_tree.copy_to(their_tmp)``: a copy whose JSON
# records, text files and MLflow database point into the copy, never at the session's tree. A
# session tree that a test changed anyway fails the session's last teardown, naming the files.

SMOKE_JOB = "nodule3d"
SMOKE_TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".md", ".csv", ".txt", ".html", ""}  # "": MLmodel, MLproject


def smoke_params(tmp: Path, *extra: str) -> dict[str, Any]:
    """The smoke profile with every output under ``tmp`` (``extra``: further overrides)."""
    from ctharden.config.params import load_params

    return load_params(REPO / "params.yaml", "smoke", [*stage_overrides(tmp), *extra])


def _repoint(x: Any, old: str, new: str) -> Any:
    """``x`` (JSON-like, or a stage result's fields) with every ``old`` in strings and paths replaced by ``new``."""
    if isinstance(x, Mapping):
        return {k: _repoint(v, old, new) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_repoint(v, old, new) for v in x)
    if isinstance(x, Path):
        return Path(str(x).replace(old, new))
    return x.replace(old, new) if isinstance(x, str) else x


def _repoint_mlflow_db(db: Path, old: str, new: str) -> None:
    """Every text value of every table of the MLflow SQLite store (experiment artifact locations,
    run artifact URIs, logged-model and model-version locations, tags) with ``old`` replaced."""
    import sqlite3

    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for col in [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')]:
                con.execute(f'UPDATE "{table}" SET "{col}" = replace("{col}", ?, ?) '
                            f'WHERE typeof("{col}") = \'text\' AND instr("{col}", ?) > 0', (old, new, old))
        con.commit()
    finally:
        con.close()


@dataclass(frozen=True)
class SmokeTree:
    """A smoke-profile pipeline tree: ``root`` (every output under it, see :func:`stage_overrides`)
    and the results of the stages that built it (``ingest``/``validate`` per dataset, ``train`` per
    job, ``evaluate``: the baseline evaluation, ``None`` for a datasets-only tree)."""

    root: Path
    ingest: Mapping[str, Any]
    validate: Mapping[str, Any]
    train: Mapping[str, Any] = field(default_factory=dict)
    evaluate: Any = None

    @property
    def params(self) -> dict[str, Any]:
        """The tree's params (a fresh dict: change it freely)."""
        return smoke_params(self.root)

    def params_with(self, *extra: str) -> dict[str, Any]:
        return smoke_params(self.root, *extra)

    def copy_to(self, dst: Path) -> SmokeTree:
        """A copy of the tree at ``dst`` (which may exist, e.g. a test's ``tmp_path``), every record
        re-pointed at the copy: the JSON and text files under it, the MLflow store (artifact
        locations of experiments, runs and models) and the returned results."""
        import dataclasses

        shutil.copytree(self.root, dst, dirs_exist_ok=True, symlinks=True)
        old, new = str(self.root), str(dst)
        for f in dst.rglob("*"):
            if f.is_file() and not f.is_symlink() and f.suffix in SMOKE_TEXT_SUFFIXES and f.stat().st_size < 8 << 20:
                try:
                    text = f.read_text()
                except UnicodeDecodeError:
                    continue
                if old in text:
                    f.write_text(text.replace(old, new))
        if (dst / "mlflow.db").is_file():
            _repoint_mlflow_db(dst / "mlflow.db", old, new)

        def moved(result: Any) -> Any:
            fields = {f.name: _repoint(getattr(result, f.name), old, new) for f in dataclasses.fields(result)}
            return dataclasses.replace(result, **fields)

        copy = SmokeTree(
            dst,
            {k: moved(v) for k, v in self.ingest.items()},
            {k: moved(v) for k, v in self.validate.items()},
            {k: moved(v) for k, v in self.train.items()},
            None if self.evaluate is None else moved(self.evaluate),
        )
        copy.assert_self_contained()
        return copy

    def assert_self_contained(self) -> None:
        """Every trained job's record on disk (``metrics/train/<job>.json``) names a model file and
        an MLflow run (store, artifacts) inside ``root``, and they resolve."""
        import json

        import mlflow

        root = self.root
        for job, result in self.train.items():
            rec = json.loads((root / "metrics" / "train" / f"{job}.json").read_text())
            assert rec == json.loads(json.dumps(result.record)), f"{job}: the result is the record on disk"
            model = Path(rec["model_file"])
            assert model.is_file() and model.resolve().is_relative_to(root.resolve()), model
            assert rec["mlflow"]["tracking_uri"] == f"sqlite:///{root / 'mlflow.db'}", rec["mlflow"]
            client = mlflow.MlflowClient(tracking_uri=rec["mlflow"]["tracking_uri"])
            run = client.get_run(rec["mlflow"]["run_id"])
            assert run.info.artifact_uri.removeprefix("file://").startswith(str(root / "mlruns")), run.info.artifact_uri
            assert "model_file/model.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "model_file")}


def _fingerprint(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file under ``root``."""
    return {str(f.relative_to(root)): (f.stat().st_size, f.stat().st_mtime_ns) for f in root.rglob("*") if f.is_file()}


@contextlib.contextmanager
def _read_only(tree: SmokeTree) -> Iterator[SmokeTree]:
    """Yields ``tree``; afterwards (the session's end) fails if any file under it was added, changed
    or removed: a test that writes must take a copy."""
    before = _fingerprint(tree.root)
    yield tree
    after = _fingerprint(tree.root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test wrote into the session's tree {tree.root} (take a copy: copy_to): {changed[:20]}"


@contextlib.contextmanager
def _own_mlflow_store() -> Iterator[None]:
    """While a session tree is built: the params' SQLite store, whatever a test set MLFLOW_TRACKING_URI to."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


def _train_and_evaluate(tree: SmokeTree, jobs: list[str]) -> SmokeTree:
    """``tree`` after training ``jobs`` and evaluating their baselines (other jobs' metrics kept)."""
    import dataclasses

    from ctharden.stages import evaluate as evaluate_stage
    from ctharden.stages import train as train_stage

    params = tree.params
    with _own_mlflow_store():
        train = {**tree.train, **{job: train_stage.run(params, job, progress=False) for job in jobs}}
        evaluated = evaluate_stage.run(params, "baseline", jobs)
    return dataclasses.replace(tree, train=train, evaluate=evaluated)


@pytest.fixture(scope="session")
def smoke_datasets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmokeTree]:
    """Every dataset of the smoke profile ingested and validated (nothing trained), once per session.
    Read-only: a test that trains or writes takes ``smoke_datasets.copy_to(tmp_path)``."""
    from ctharden.config.paths import dataset_names
    from ctharden.stages import ingest as ingest_stage
    from ctharden.stages import validate as validate_stage

    _require(LIDC_SAMPLE)
    _require(COVID_SAMPLE)
    root = tmp_path_factory.mktemp("smoke_datasets")
    params = smoke_params(root)
    names = dataset_names(params)
    ingest = {name: ingest_stage.run(params, name) for name in names}
    validate = {name: validate_stage.run(params, name) for name in names}
    assert all(v.success for v in validate.values()), {k: v.record for k, v in validate.items()}
    with _read_only(SmokeTree(root, ingest, validate)) as tree:
        yield tree


@pytest.fixture(scope="session")
def smoke_tree(smoke_datasets: SmokeTree, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmokeTree]:
    """The smoke pipeline up to the baseline evaluation for ``nodule3d``: every dataset ingested and
    validated, nodule3d trained (``train["nodule3d"]``) and evaluated (``evaluate``), once per
    session. Read-only: a test that writes into it takes ``smoke_tree.copy_to(tmp_path)``."""
    tree = smoke_datasets.copy_to(tmp_path_factory.mktemp("smoke_tree"))
    with _read_only(_train_and_evaluate(tree, [SMOKE_JOB])) as tree:
        yield tree


@pytest.fixture(scope="session")
def smoke_tree_covid2d(smoke_tree: SmokeTree, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmokeTree]:
    """``smoke_tree`` plus covid2d trained and evaluated (both jobs in ``train``; ``evaluate``'s
    metrics hold both), once per session and only for the sessions that ask for it. Read-only, like
    ``smoke_tree``."""
    tree = smoke_tree.copy_to(tmp_path_factory.mktemp("smoke_tree_covid2d"))
    with _read_only(_train_and_evaluate(tree, ["covid2d"])) as tree:
        yield tree
