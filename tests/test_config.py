"""params.yaml profiles and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctharden.config.params import load_params
from ctharden.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def test_default_profile_runs_small() -> None:
    p = load_params(PARAMS)
    assert p["profile"] == "default"
    assert "profiles" not in p
    assert p["split"]["n_folds"] == 5 and p["robustness"]["defaults"]["random"]["k"] < 50


def test_paper_profile_has_the_papers_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CTHARDEN_PROFILE", raising=False)
    p = load_params(PARAMS, profile="paper")
    assert p["profile"] == "paper"
    assert p["split"]["n_folds"] == 10 and p["split"]["test_fraction"] == 0.2
    d = p["train"]["defaults"]
    assert (d["epochs"], d["batch_size"], d["lr"], d["folds"]) == (500, 64, 1e-5, "all")
    assert p["train"]["jobs"]["nodule3d"]["arch_kwargs"]["width"] == 64 and d["loss"] == "mse"
    rob = p["robustness"]["defaults"]
    assert rob["random"]["k"] == rob["optimized"]["restarts"] == 50 and rob["models"] == "folds"
    assert p["datasets"]["covid"]["size"] == 224
    assert p["datasets"]["lidc"]["cube_size"] == 32, "untouched keys survive the deep merge"


def test_env_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTHARDEN_PROFILE", "smoke")
    # an override may add keys where the schema has room for them (a new dataset); unknown keys are
    # refused (tests/test_settings_schema.py)
    p = load_params(PARAMS, overrides=["split.n_folds=3", "datasets.covid.size=64",
                                       "datasets.extra={kind: synthetic, task: covid2d, n: 8}"])
    assert p["profile"] == "smoke"
    assert p["split"]["n_folds"] == 3 and p["datasets"]["covid"]["size"] == 64
    assert p["datasets"]["extra"] == {"kind": "synthetic", "task": "covid2d", "n": 8}
    assert load_params(PARAMS, profile="default")["profile"] == "default", "explicit beats env"


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        load_params(PARAMS, profile="nope")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_params(PARAMS, overrides=["split.n_folds"])
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
