"""The architecture study (shen 2020, Table 3 protocol) on the smoke profile: two variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, SmokeTree, stage_overrides

from ctharden.config.params import load_params
from ctharden.core.errors import ConfigError
from ctharden.studies.architectures import default_variants, format_study, run_architecture_study


@pytest.mark.slow
def test_study_trains_each_variant_and_attacks_it(smoke_datasets: SmokeTree, tmp_path: Path) -> None:
    smoke_datasets.copy_to(tmp_path)  # the smoke datasets, ingested and validated; the study writes next to them
    params = load_params(REPO / "params.yaml", "smoke", stage_overrides(tmp_path))
    out = tmp_path / "study"
    study = run_architecture_study(params, variants=["nodule3d", "nodule3d_fiveclass"], mas=10.0, k=3, out=out)
    assert [r["arch"] for r in study["rows"]] == ["nodule3d", "nodule3d_fiveclass"]
    assert [r["label"] for r in study["rows"]] == ["Original", "Five-class (scenario 4)"]
    for r in study["rows"]:
        assert len(r["train_san_rate"]) == r["n_folds"] == 1
        assert 0.0 <= r["train_mean"] <= 100.0 and 0.0 <= r["test_mean"] <= 100.0
        assert (out / "artifacts" / "models" / f"nodule3d@{r['arch']}" / "model.pt").is_file()
    assert json.loads((out / "study.json").read_text())["rows"][1]["paper"] == ["26.2±6.9", "86.5±15.3"]
    table = (out / "table.md").read_text()
    assert table == format_study(study) + "\n" and "| Five-class (scenario 4) |" in table
    assert not (tmp_path / "artifacts" / "models").exists(), "the pipeline's own models are untouched"


def test_variants_and_bad_names(tmp_path: Path) -> None:
    assert default_variants("nodule3d")[:2] == ["nodule3d", "nodule3d_bn"] and len(default_variants("nodule3d")) == 9
    params = load_params(REPO / "params.yaml", "smoke", stage_overrides(tmp_path))
    with pytest.raises(ConfigError, match="unknown architectures"):
        run_architecture_study(params, variants=["nodule3d_huge"], out=tmp_path / "s")
