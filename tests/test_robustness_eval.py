"""The robustness evaluation as a whole: settings, the result, the report files (they exist and
parse), the stage outputs and MLflow logging, and a gradient-masking model failing the sanity
verdict of the evaluation."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from torch import Tensor, nn

from ctharden.config.params import load_params
from ctharden.config.robustness import job_settings, parse_settings
from ctharden.core.errors import ConfigError
from ctharden.data.arrays import ArraySet, load_arrayset
from ctharden.data.synthetic import generate_synthetic
from ctharden.evaluation.headline import headline_metrics
from ctharden.evaluation.robustness import stratified_subset
from ctharden.evaluation.units import evaluate_robustness
from ctharden.gate.criteria import check, gate_settings
from ctharden.models import build_model
from ctharden.stages.evaluate import write_job_figures, write_report
from ctharden.training.loop import TrainConfig, train_fold

SETTINGS = {
    "mas_levels": [10, 100, 500],
    "splits": ["train", "test"],
    "max_samples": None,
    "spacing_mm": 1.0,
    "examples": 1,
    "random": {"k": 3},
    "optimized": {"restarts": 1, "n_iter": 3, "max_samples": 6},
    "pgd": {"steps": 20, "linf": [0.003, 0.02], "l2": [0.3], "max_samples": 8, "n_random": 2},
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("robust") / "synth"
    generate_synthetic("nodule3d", out, n=32, seed=3, n_folds=2, test_fraction=0.25)
    return out


def _trained(dataset: Path, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    m = build_model("nodule3d", spatial_dims=3, window_hu=(-1000.0, 400.0), width=4)
    data = load_arrayset(dataset, m)
    train = data.subset(data.split == "train")
    cfg = TrainConfig(seed=0, epochs=epochs, batch_size=8, lr=3e-3, shift_vox=0, rotate_deg=0, select_on="last")
    from ctharden.core.device import select_runtime

    result = train_fold(m, train, None, cfg, select_runtime("cpu", "fp32"), dataset.parent / "ckpt" / "last.pt",
                        fold=0, data_hash="x", progress=False)
    m.load_state_dict(result.best_state)
    return m.eval()


@pytest.fixture(scope="module")
def model(dataset: Path) -> nn.Module:
    return _trained(dataset, 4)


@pytest.fixture(scope="module")
def accurate_model(dataset: Path) -> nn.Module:
    """Trained longer: 6 of the 8 test phantoms right (measured), so masking has something to hide."""
    return _trained(dataset, 12)


@pytest.fixture(scope="module")
def evaluated(model: nn.Module, dataset: Path) -> tuple[dict, dict, ArraySet]:
    data = load_arrayset(dataset, model)
    # the gate judges L∞ at 0.02 only: the whole ensemble runs there (and at the one L2 ε, the
    # sanity checks' check_eps of a norm the gate does not judge), 20-PGD alone at 0.003
    settings = parse_settings(SETTINGS).with_gated_eps({"linf": [0.02]})
    result, visuals = evaluate_robustness(model, data, settings, seed=7)
    return result, visuals, data


def test_the_ensemble_runs_at_the_gated_eps_and_pgd_alone_elsewhere(evaluated: tuple[dict, dict, ArraySet]) -> None:
    result, _, _ = evaluated
    linf, l2 = result["pgd"]["linf"], result["pgd"]["l2"]
    assert linf["eps"] == [0.0, 0.003, 0.02] and linf["ensemble"]["eps"] == [0.0, 0.02]
    assert linf["ensemble"]["scope"] == "gated" and linf["ensemble"]["auc"] is None
    assert l2["ensemble"]["eps"] == [0.0, 0.3] and l2["ensemble"]["scope"] == "all"
    assert all(len(v["attacked"]) == 1 for v in linf["ensemble"]["per_attack"].values())
    flat = headline_metrics(result)
    assert "robust_ensemble_linf_acc_eps0.02" in flat and "robust_ensemble_linf_acc_eps0.003" not in flat
    assert flat["robust_ensemble_linf_acc_eps0.02"] <= flat["robust_pgd_linf_acc_eps0.02"]
    assert set(result["outcomes"]["ensemble_linf"]["broken"]) == {"0", "0.02"}
    assert "robust_ensemble_linf_acc_eps0.02" in result["intervals"]
    assert "robust_ensemble_linf_acc_eps0.003" not in result["intervals"]


def test_result_has_every_part_and_is_json(evaluated: tuple[dict, dict, ArraySet]) -> None:
    result, visuals, data = evaluated
    result = json.loads(json.dumps(result))
    n = {s: len(data.indices(s)) for s in ("train", "test")}
    for key in ("random_nps", "optimized_nps"):
        assert set(result[key]) == {"train", "test"}
        for split, block in result[key].items():
            assert [lv["mas"] for lv in block["levels"].values()] == [10.0, 100.0, 500.0]
            assert block["n"] == (n[split] if key == "random_nps" else min(6, n[split]))
            for lv in block["levels"].values():
                assert 0 <= lv["san_rate"] <= 100
                curve = lv["sar_above"]["percent_of_samples_with_sar_above_level"]
                assert curve[0] == pytest.approx(lv["san_rate"])
    # random: one noise draw scaled per level, so lower dose never flips fewer samples here
    rates = [lv["san_rate"] for lv in result["random_nps"]["test"]["levels"].values()]
    assert rates == sorted(rates, reverse=True)
    for norm in ("linf", "l2"):
        c = result["pgd"][norm]
        assert c["eps"][0] == 0.0 and c["n"] == 8
        assert all(a >= b - 1e-9 for a, b in zip(c["accuracy"], c["accuracy"][1:], strict=False))
        assert c["eps_hu"] == pytest.approx([1400.0 * e for e in c["eps"]])
        assert 0.0 <= c["auc"] <= 1.0
    assert set(result["sanity"]) == {"linf", "l2"}
    assert result["sanity_passed"] == all(s["passed"] for s in result["sanity"].values())
    assert result["clean"]["test"]["auc"] is not None
    ex = visuals["examples"]
    assert len(ex) == 1 and ex[0]["clean"].shape == data.x.shape[1:]
    flat = headline_metrics(result)
    assert flat["robust_random_test_san_rate_mas10"] == rates[0]
    assert all(isinstance(v, float) for v in flat.values())


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.images = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img" and dict(attrs).get("src", "").startswith("data:image/png;base64,"):
            self.images += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_report_files_exist_and_parse(evaluated: tuple[dict, dict, ArraySet], model: nn.Module, tmp_path: Path) -> None:
    result, visuals, _ = evaluated
    result = {**result, "job": "tiny", "model": {"file": "tiny.pt", "arch": "nodule3d", "config": model.config()}}
    figs = write_job_figures(result, visuals, model, tmp_path / "plots", tmp_path / "report" / "tiny")
    out = write_report(tmp_path / "report", {"tiny": result}, {"tiny": figs}, "test")
    for p in [*figs.values(), out["SAN/N vs mAs"], out["Robust accuracy vs ε"]]:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100
    parser = _Collector()
    parser.feed(Path(out["html"]).read_text())
    text = " ".join(parser.text)
    assert parser.tags.count("table") >= 4 and parser.images >= 5
    for needle in ("10 mAs", "500 mAs", "random", "optimized", "large_eps_chance", "Clean metrics", "ε (HU)",
                   "Per-attack breakdown", "gradient_masking", "apgd-margin: broke / attacked", "100-PGD alone"):
        assert needle in text, needle
    md = Path(out["summary"]).read_text()
    assert md.count("|---|") >= 2 and "## tiny" in md
    with open(tmp_path / "plots" / "san_vs_mas.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["mas"]) for r in rows] == [10.0, 100.0, 500.0]
    assert set(rows[0]) == {"mas", "random_train", "random_test", "optimized_train", "optimized_test"}
    with open(tmp_path / "plots" / "robust_accuracy_linf.csv", newline="") as f:
        acc = list(csv.DictReader(f))
    assert float(acc[0]["eps"]) == 0.0 and float(acc[-1]["eps_hu"]) == pytest.approx(28.0)
    assert float(acc[-1]["ensemble_accuracy"]) <= float(acc[-1]["accuracy"]) + 1e-9  # the worst case
    assert acc[1]["ensemble_accuracy"] == ""  # ε 0.003: PGD alone
    assert "PGD only (ensemble at the gated ε)" in text
    with open(tmp_path / "plots" / "sar_above_random_test.csv", newline="") as f:
        sar = list(csv.DictReader(f))
    assert len(sar) == 21 and set(sar[0]) == {"sar_level", "mas10", "mas100", "mas500"}


class MaskedFront(nn.Module):
    """Gradient masking in front of a trained classifier: ``round`` quantises the input to 8 levels
    (zero gradient almost everywhere); ``saturate`` binarises it with a steep hard-tanh around the
    mid-grey, 0.5 + 0.15·hardtanh(1000(x − 0.5)) (zero gradient outside |x − 0.5| < 0.001)."""

    def __init__(self, net: nn.Module, kind: str = "round") -> None:
        super().__init__()
        self.net, self.kind = net, kind
        self.window_hu, self.spatial_dims, self.output, self.arch = net.window_hu, 3, net.output, kind

    def to_input(self, raw: Tensor) -> Tensor:
        return self.net.to_input(raw)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "round":
            return self.net(torch.round(x * 8) / 8)
        return self.net(0.5 + 0.15 * nn.functional.hardtanh(1000 * (x - 0.5)))


def test_evaluation_flags_a_gradient_masking_model(model: nn.Module, dataset: Path) -> None:
    masked = MaskedFront(model)
    data = load_arrayset(dataset, masked)
    cfg = {**SETTINGS, "pgd": {**SETTINGS["pgd"], "linf": [0.01, 0.05], "l2": []}, "examples": 0}
    result, _ = evaluate_robustness(masked, data, parse_settings(cfg), seed=1)
    assert result["sanity_passed"] is False
    assert "zero_gradient" in result["sanity"]["linf"]["flags"]


MASK_GATE = {"gate": {"defaults": {
    "min_clean_auc": None, "max_san_rate": {"random": {}, "optimized": {}},
    "min_robust_accuracy": {"linf": {0.2: 0.10}, "l2": {}}, "sanity": True,
    "primary": "robust_linf_acc_eps0.2"}, "jobs": {"masked": {}}}}


@pytest.mark.parametrize("kind", ["round", "saturate"])
def test_pgd_alone_calls_a_masked_model_robust_the_ensemble_does_not_and_the_gate_fails_it(
    accurate_model: nn.Module, dataset: Path, kind: str
) -> None:
    masked = MaskedFront(accurate_model, kind).eval()
    data = load_arrayset(dataset, masked)
    cfg = {**SETTINGS, "pgd": {**SETTINGS["pgd"], "linf": [0.2], "l2": [], "square_queries": 1000}, "examples": 0,
           "splits": ["test"], "mas_levels": [500], "random": {"k": 1}, "optimized": {"restarts": 1, "n_iter": 1,
                                                                                     "max_samples": 2}}
    result, _ = evaluate_robustness(masked, data, parse_settings(cfg), seed=1)
    c = result["pgd"]["linf"]
    ens = c["ensemble"]
    assert ens["attacks"] == ["pgd", "apgd-ce", "apgd-margin", "square"]
    clean_ok = c["survived"][0]
    assert clean_ok >= 5, c  # the masked model still classifies most of the 8 attacked samples
    # PGD and APGD see no gradient: PGD alone reports the model (nearly) as robust as it is accurate
    assert c["survived"][1] >= clean_ok - 1, c
    assert ens["per_attack"]["apgd-ce"]["broken"][0] + ens["per_attack"]["apgd-margin"]["broken"][0] <= 1
    # the black-box member breaks what the gradients could not (measured at ε 0.2 on 8 samples:
    # rounded, PGD 5 of 6 survive, ensemble 0; saturated, PGD 6 of 6, ensemble 2): far lower
    assert ens["masked"][0] == ens["per_attack"]["square"]["broken"][0] >= 3, ens
    assert ens["survived"][1] <= c["survived"][1] - 3, ens
    check_row = next(ch for ch in result["sanity"]["linf"]["checks"] if ch["name"] == "gradient_masking")
    assert check_row["passed"] is False and "gradient masking suspected" in check_row["detail"]["message"]
    headline = headline_metrics(result)
    assert headline["robust_pgd_linf_acc_eps0.2"] > headline["robust_ensemble_linf_acc_eps0.2"]
    verdict = check(headline, gate_settings(MASK_GATE, "masked"), result["intervals"])
    assert verdict["verdict"] == "fail" and "sanity" in verdict["failed"]
    row = verdict["criteria"]["robust_linf_acc_eps0.2"]
    assert row["metric"] == "robust_ensemble_linf_acc_eps0.2" and row["n"] == 8
    assert row["k"] == ens["survived"][1]


def test_stratified_subset_keeps_class_shares() -> None:
    y = np.array([0] * 30 + [1] * 10)
    idx = stratified_subset(y, 8, seed=1)
    assert len(idx) == 8 and list(idx) == sorted(idx)
    assert (y[idx] == 1).sum() == 2
    assert np.array_equal(idx, stratified_subset(y, 8, seed=1))
    assert len(stratified_subset(y, None, 0)) == 40


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "unknown keys"),
        ({"mas_levels": [10, -5]}, "mas_levels"),
        ({"mas_levels": [10, 10]}, "duplicates"),
        ({"splits": ["val"]}, "splits"),
        ({"random": {"k": 0}}, "random.k"),
        ({"pgd": {"linf": [], "l2": []}}, "linf and/or l2"),
        ({"pgd": {"loss": "hinge", "linf": [0.1]}}, "pgd.loss"),
        ({"optimized": {"autocast": "yes"}}, "optimized.autocast"),
        ({"models": "best"}, "models"),
    ],
)
def test_bad_settings_are_config_errors(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings({**SETTINGS, **change})


def test_params_profiles_give_valid_settings() -> None:
    for profile in (None, "smoke", "paper"):
        params = load_params(REPO / "params.yaml", profile, [])
        for job in params["train"]["jobs"]:
            s = job_settings(params, job)
            assert s.mas_levels == [10, 50, 100, 200, 500]
    params = load_params(REPO / "params.yaml", None, [])
    assert job_settings(params, "covid2d").for_width(224).spacing_mm == pytest.approx(350 / 224)
    with pytest.raises(ConfigError, match="unknown job"):
        job_settings(params, "nope")
