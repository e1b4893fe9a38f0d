"""The one settings schema of params.yaml: every profile validates, bad values are one-line errors
naming the key path and what is allowed, every enum has one definition, and the CLI's ingest
defaults are params.yaml's."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

from ctharden.config import choices
from ctharden.config.params import load_params
from ctharden.config.schema import (
    DATASET_MODELS,
    HardenJob,
    NoiseSettings,
    RobustnessJob,
    SplitSettings,
    TrainDefaults,
    TuneJob,
    ingest_defaults,
    validate_params,
)
from ctharden.core.errors import ConfigError

PARAMS = REPO / "params.yaml"
PROFILES = ["default", *yaml.safe_load(PARAMS.read_text())["profiles"]]


def _error(*overrides: str, profile: str = "default") -> str:
    with pytest.raises(ConfigError) as info:
        load_params(PARAMS, profile, list(overrides))
    message = str(info.value)
    assert "\n" not in message, "one line"
    return message


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_validates(profile: str) -> None:
    assert {"default", "paper", "smoke"} <= set(PROFILES)
    params = load_params(PARAMS, profile)
    settings = validate_params(params)
    assert settings.profile == profile and set(settings.train.jobs) == {"nodule2d", "nodule3d", "covid2d"}
    assert isinstance(params["seed"], int) and params["seed"] == settings.seed, "the dict is returned unchanged"


def test_a_wrong_key_names_its_path_and_the_known_keys() -> None:
    msg = _error("robustness.defaults.pgd.stepz=3")
    assert "robustness.defaults.pgd.stepz = 3: unknown key" in msg
    assert "known: linf, l2, steps, restarts, loss" in msg
    assert "new: unknown key" in _error("new.key=[1, 2]")


def test_a_wrong_type_names_its_path_and_the_type() -> None:
    msg = _error("train.defaults.lr=abc")
    assert "train.defaults.lr = 'abc': train.lr must be a number" in msg
    assert "seed = True: must be an integer, not true/false" in _error("seed=true")
    msg = _error("robustness.jobs.nodule3d.optimized.autocast=maybe")
    assert "optimized.autocast = 'maybe': robustness.optimized.autocast must be true or false" in msg


def test_a_wrong_enum_value_lists_the_choices() -> None:
    msg = _error("robustness.jobs.covid2d.pgd.loss=hinge")
    assert "robustness.jobs.covid2d.pgd.loss = 'hinge': robustness.pgd.loss must be one of ce, margin, both" in msg
    msg = _error("harden.jobs.nodule3d.compare=[adv, foo]")
    assert "harden.jobs.nodule3d.compare[1] = 'foo'" in msg and "one of adv, ima, rand, trades, nps, adaptive" in msg
    msg = _error("gate.jobs.nodule3d.min_robust_accuracy.linf2={0.1: 0.5}")
    assert "gate.jobs.nodule3d.min_robust_accuracy: unknown norms ['linf2'] (allowed: linf, l2)" in msg
    msg = _error("datasets.covid.kind=dicom")
    assert "datasets.covid.kind = 'dicom': must be one of lidc, lidc2d, covid, synthetic" in msg


def test_a_negative_count_or_value_names_the_range() -> None:
    assert "split.n_folds = -1: must be an integer > 0" in _error("split.n_folds=-1")
    msg = _error("robustness.jobs.covid2d.pgd.linf=[0.001, 0.002, -0.5]")
    assert "robustness.jobs.covid2d.pgd.linf[2] = -0.5: robustness.pgd.linf[2] must be a number > 0" in msg
    assert "datasets.synthetic_nodule3d.n = -4: must be an integer > 0" in _error("datasets.synthetic_nodule3d.n=-4")


def test_several_errors_name_the_first_and_count_the_rest() -> None:
    msg = _error("split.n_folds=0", "split.test_fraction=2", "seed=-1")
    assert msg.startswith("params.yaml (profile default): seed = -1") and msg.endswith("(and 2 more errors)")
    # a bad default is reported once, at train.defaults, not again for every job merged from it
    msg = _error("train.defaults.epochs=0")
    assert "train.defaults.epochs = 0: train.epochs must be an integer > 0" in msg and "more" not in msg


def test_combinations_are_refused_at_load_time() -> None:
    assert "eps_low must be below eps_high" in _error("tune.jobs.covid2d.eps_low=0.5")
    assert "anchors must lie in" in _error("tune.defaults.anchors=[0.9]")
    assert "clean-AUC floor" in _error("tune.defaults.max_auc_drop=null")
    assert "duplicates" in _error("robustness.defaults.mas_levels=[10, 10]")
    assert "linf and/or l2" in _error("robustness.defaults.pgd.linf=[]", "robustness.defaults.pgd.l2=null",
                                      "robustness.jobs.covid2d.pgd.linf=[]", "robustness.jobs.covid2d.pgd.l2=[]")
    assert "table is not set" in _error("robustness.noise.model=table")
    assert "must be a configured dataset" in _error("train.jobs.nodule3d.dataset=nope")


def test_an_override_with_a_bad_value_is_refused_by_the_cli(tmp_path: Path) -> None:
    cli = str(Path(sys.executable).parent / "ctharden")
    r = subprocess.run([cli, "--params", str(PARAMS), "--set", "robustness.defaults.models=best", "stage",
                        "data-version"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "robustness.defaults.models = 'best': robustness.models must be one of selected, folds" in r.stderr


def test_yaml_number_keys_and_null_thresholds_validate() -> None:
    params = load_params(PARAMS, "smoke", ["gate.jobs.nodule3d.max_san_rate.random={10: 5, 50.5: null}"])
    levels = validate_params(params).gate.jobs["nodule3d"].max_san_rate["random"]
    assert levels[10] == 5.0 and levels[50.5] is None and levels[500] is None  # merged over gate.defaults


@pytest.mark.parametrize(("owner", "name", "choice"), [
    ("ctharden.attacks.common", "NORMS", "NORMS"),
    ("ctharden.attacks.common", "ATTACK_LOSSES", "ATTACK_LOSSES"),
    ("ctharden.gate.criteria", "NORMS", "NORMS"),
    ("ctharden.gate.criteria", "NPS_ATTACKS", "NPS_ATTACKS"),
    ("ctharden.gate.criteria", "KINDS", "GATE_KINDS"),
    ("ctharden.evaluation.robustness", "PGD_NORMS", "NORMS"),
    ("ctharden.training.losses", "LOSSES", "TRAIN_LOSSES"),
    ("ctharden.noise.config", "MODELS", "NOISE_MODELS"),
    ("ctharden.noise.config", "POOLS", "PROJECTION_POOLS"),
    ("ctharden.config.hardening", "METHODS", "HARDEN_METHODS"),
    ("ctharden.config.hardening", "EPS_METHODS", "EPS_METHODS"),
    ("ctharden.config.paths", "VARIANTS", "VARIANTS"),
    ("ctharden.config.robustness", "MODEL_SETS", "MODEL_SETS"),
    ("ctharden.config.robustness", "SPLITS", "SPLITS"),
    ("ctharden.stages.ingest", "KINDS", "DATASET_KINDS"),
])
def test_every_enum_has_one_definition(owner: str, name: str, choice: str) -> None:
    import importlib

    assert getattr(importlib.import_module(owner), name) is getattr(choices, choice)


def test_choices_are_what_the_code_expects() -> None:
    assert choices.NORMS == ("linf", "l2") and choices.ATTACK_LOSSES == ("ce", "margin", "both")
    assert set(choices.EPS_METHODS) < set(choices.HARDEN_METHODS)
    assert tuple(DATASET_MODELS) == choices.DATASET_KINDS
    from ctharden.training.loop import SELECT_ON

    assert tuple(SELECT_ON) == choices.SELECT_ON


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def test_schema_defaults_are_the_settings_defaults() -> None:
    """A key absent from params.yaml means what it meant before the schema."""
    from ctharden.config.hardening import HardenSettings, TuneSettings
    from ctharden.config.robustness import OptimizedSettings, PGDSettings, RandomSettings
    from ctharden.noise.config import NoiseConfig
    from ctharden.training.loop import TrainConfig

    train = TrainDefaults()
    assert {k: getattr(train, k) for k in _defaults(TrainConfig) if k != "seed"} == {
        k: v for k, v in _defaults(TrainConfig).items() if k != "seed"}
    tune = TuneJob().model_dump()
    assert {**tune, "anchors": tuple(tune["anchors"])} == _defaults(TuneSettings)
    h = HardenJob()
    flat = {**h.model_dump(exclude={"ima", "adaptive"}), **{f"ima_{k}": v for k, v in h.ima.model_dump().items()},
            **{f"adaptive_{k}": v for k, v in h.adaptive.model_dump().items()}}
    assert {**flat, "nps_mas": tuple(flat["nps_mas"]), "compare": tuple(flat["compare"])} == _defaults(HardenSettings)
    rob = RobustnessJob(mas_levels=[10], pgd={"linf": [0.1]})
    assert rob.random.model_dump() == _defaults(RandomSettings)
    assert rob.optimized.model_dump() == _defaults(OptimizedSettings)
    # gated_eps is not a setting: the evaluation takes it from the gate's criteria
    pgd = {k: v for k, v in _defaults(PGDSettings).items() if k not in ("linf", "l2", "gated_eps")}
    dumped = rob.pgd.model_dump(exclude={"linf", "l2"})
    assert {**dumped, "attacks": tuple(dumped["attacks"])} == pgd
    assert NoiseSettings().model_dump() == _defaults(NoiseConfig)


@pytest.mark.parametrize("kind", list(DATASET_MODELS))
def test_dataset_keys_are_the_ingest_functions_keywords(kind: str) -> None:
    from ctharden.data.covid import ingest_covid
    from ctharden.data.lidc import ingest_lidc
    from ctharden.data.lidc2d import ingest_lidc2d
    from ctharden.data.synthetic import generate_synthetic

    fn = {"lidc": ingest_lidc, "lidc2d": ingest_lidc2d, "covid": ingest_covid, "synthetic": generate_synthetic}[kind]
    given_by_stage = {"out", "seed", "test_fraction", "n_folds"}
    accepted = set(inspect.signature(fn).parameters) - given_by_stage
    model = DATASET_MODELS[kind]
    assert set(model.model_fields) - {"kind"} == accepted
    for name, field in model.model_fields.items():
        param = inspect.signature(fn).parameters.get(name)
        if param is not None and param.default is not inspect.Parameter.empty:
            assert field.default == param.default, f"{kind}.{name}: schema and ingest function agree"


def _cli_defaults(kind: str) -> dict[str, Any]:
    import typer

    from ctharden import cli

    group = typer.main.get_command(cli.app)
    command = group.commands["ingest"].commands[kind]
    return {p.name: p.default for p in command.params if p.name not in ("root", "out", "task", "count_only")}


@pytest.mark.parametrize("kind", list(DATASET_MODELS))
def test_cli_ingest_defaults_are_params_yaml(kind: str) -> None:
    params = load_params(PARAMS, "default")
    spec = next(d for d in params["datasets"].values() if d["kind"] == kind)
    fields = DATASET_MODELS[kind].model_fields
    expected = {"seed": params["seed"], **params["split"]}
    cli = _cli_defaults(kind)
    for name in cli:
        if name not in expected:
            expected[name] = spec[name] if name in spec else fields[name].default
    assert cli == expected
    assert {k: ingest_defaults(kind)[k] for k in cli} == cli
    if kind == "covid":
        assert cli["size"] == 112 and cli["seed"] == 20201, "params.yaml's, not the ingest function's 224 / 0"


def test_ingest_defaults_without_params_fall_back_to_the_schema(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: -3\n")
    with pytest.warns(UserWarning, match="schema's defaults"):
        got = ingest_defaults("covid", bad)
    split = SplitSettings()
    assert got["size"] == 224 and got["block_size"] == 25
    assert (got["test_fraction"], got["n_folds"]) == (split.test_fraction, split.n_folds)
    with pytest.raises(ConfigError, match="unknown dataset kind"):
        ingest_defaults("dicom")
