"""``ctharden`` command line: a thin front door over the library (no logic lives here).

Errors a user can cause (:class:`~ctharden.core.errors.CthardenError`) are printed as one line and
exit with status 1; ``--help`` works on every command.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup
from typer.exceptions import TyperException

from ctharden.config.params import load_params
from ctharden.config.schema import ingest_defaults
from ctharden.core.errors import CthardenError, GateFailed
from ctharden.stages.result import EvaluateResult, TrainResult

app = typer.Typer(
    help="ctharden: version, validate, train, attack and harden CT classifiers; register only robust ones.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
ingest_app = typer.Typer(help="Build a dataset (the one ctharden format) from a source.", no_args_is_help=True)
stage_app = typer.Typer(help="Pipeline stages configured by params.yaml (what dvc.yaml and the flows run).",
                        no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
app.add_typer(stage_app, name="stage")
study_app = typer.Typer(help="Studies that reproduce the papers' protocols on the configured data.",
                        no_args_is_help=True)
app.add_typer(study_app, name="study")

out_console = Console()
err_console = Console(stderr=True)

# The ingest commands' defaults: params.yaml's top level (the default profile), as `ctharden stage ingest`
# uses them; the schema's field defaults where there is no params.yaml (ctharden.config.schema.ingest_defaults).
LIDC_DEFAULTS = ingest_defaults("lidc")
LIDC2D_DEFAULTS = ingest_defaults("lidc2d")
COVID_DEFAULTS = ingest_defaults("covid")
SYNTHETIC_DEFAULTS = ingest_defaults("synthetic")
# `ingest table` has no params.yaml dataset kind: its split defaults are params.yaml's top-level split and seed.
SPLIT_DEFAULTS = {k: SYNTHETIC_DEFAULTS[k] for k in ("seed", "test_fraction", "n_folds")}
_SEED_HELP = "default: params.yaml seed"
_TEST_HELP = "Held-out test share (default: params.yaml split.test_fraction)."
_FOLDS_HELP = "Cross-validation folds over the rest (default: params.yaml split.n_folds)."


class _State:
    params_path: Path = Path("params.yaml")
    profile: str | None = None
    overrides: list[str] = []

    def params(self) -> dict[str, Any]:
        return load_params(self.params_path, self.profile, self.overrides)


state = _State()


@app.callback()
def _root(
    params: Annotated[Path, typer.Option("--params", help="Parameters file.")] = Path("params.yaml"),
    profile: Annotated[
        str | None, typer.Option("--profile", help="Profile from params.yaml (default, paper, smoke, ...).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a parameter: key.path=value (repeatable).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    state.params_path, state.profile, state.overrides = params, profile, list(set_ or [])


def _print_report(report: dict[str, Any], title: str) -> None:
    funnel = report.get("funnel")
    if funnel:
        table = Table(title=title)
        table.add_column("filter")
        table.add_column("count", justify="right")
        for key, value in funnel.items():
            table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
        out_console.print(table)
        ref = report.get("paper_reference")
        if ref:
            out_console.print(
                f"paper (full LIDC-IDRI, shen 2020): {ref['nodules']} nodules, "
                f"{ref['malignant']} malignant, {ref['benign']} benign; counted here: "
                f"{funnel['malignant'] + funnel['benign']} nodules, {funnel['malignant']} malignant, "
                f"{funnel['benign']} benign"
            )
    rest = {k: v for k, v in report.items() if k not in ("funnel", "paper_reference")}
    out_console.print_json(json.dumps(rest, default=str))


@ingest_app.command("lidc")
def ingest_lidc_cmd(
    root: Annotated[Path, typer.Option(help="LIDC-IDRI tree (TCIA layout or any tree of DICOM + XML).")],
    out: Annotated[Path | None, typer.Option(help="Dataset directory to write.")] = None,
    count_only: Annotated[bool, typer.Option(help="Only count nodules per filter from the XML.")] = False,
    mode: Annotated[Literal["3d", "2d"], typer.Option(help=(
        "3d: nodule3d cubes per nodule; 2d: nodule2d patches per reader mark, on its largest contour slice "
        "(default: params.yaml's lidc dataset mode)."))] = LIDC_DEFAULTS["mode"],
    cube_size: Annotated[int, typer.Option(
        help="3d: cube side in voxels (default: params.yaml's lidc dataset cube_size).")] = LIDC_DEFAULTS["cube_size"],
    spacing_mm: Annotated[float | None, typer.Option(
        help="Voxel (3d) or pixel (2d) size in mm (default: params.yaml's lidc dataset spacing_mm, else 1.0 / 0.7)."
    )] = LIDC_DEFAULTS["spacing_mm"],
    size: Annotated[int, typer.Option(
        help="2d: patch side in pixels (default: params.yaml's lidc dataset size).")] = LIDC_DEFAULTS["size"],
    centroid_tol_mm: Annotated[float, typer.Option(
        help="Grouping: max centroid distance in mm (default: params.yaml's lidc dataset centroid_tol_mm)."
    )] = LIDC_DEFAULTS["centroid_tol_mm"],
    strict: Annotated[bool, typer.Option(
        help="An XML whose DICOM series is absent is an error (default: params.yaml's lidc dataset strict)."
    )] = LIDC_DEFAULTS["strict"],
    seed: Annotated[int, typer.Option(help=f"Split seed ({_SEED_HELP}).")] = LIDC_DEFAULTS["seed"],
    test_fraction: Annotated[float, typer.Option(help=_TEST_HELP)] = LIDC_DEFAULTS["test_fraction"],
    n_folds: Annotated[int, typer.Option(help=_FOLDS_HELP)] = LIDC_DEFAULTS["n_folds"],
) -> None:
    """LIDC-IDRI (DICOM + reader XML) -> 32³ 1 mm nodule cubes (or, --mode 2d, 2D patches) in HU, mean-rating labels."""
    from ctharden.data.lidc import count_lidc, ingest_lidc

    if count_only:
        _print_report(count_lidc(root, centroid_tol_mm=centroid_tol_mm), "LIDC-IDRI nodules per filter (XML)")
        return
    if out is None:
        raise typer.BadParameter("--out is required unless --count-only", param_hint="--out")
    report = ingest_lidc(
        root, out, mode=mode, cube_size=cube_size, spacing_mm=spacing_mm, size=size,
        centroid_tol_mm=centroid_tol_mm,
        strict=strict, seed=seed, test_fraction=test_fraction, n_folds=n_folds,
    )
    _print_report(report, "LIDC-IDRI nodules per filter")


@ingest_app.command("lidc2d")
def ingest_lidc2d_cmd(
    root: Annotated[Path, typer.Option(help="LIDC-IDRI crop release: crops.npz + annotations.csv.")],
    out: Annotated[Path, typer.Option(help="Dataset directory to write.")],
    spacing_mm: Annotated[float, typer.Option(
        help="Resampled pixel spacing in mm (default: params.yaml's lidc2d dataset spacing_mm)."
    )] = LIDC2D_DEFAULTS["spacing_mm"],
    size: Annotated[int, typer.Option(
        help="Patch side in pixels (default: params.yaml's lidc2d dataset size).")] = LIDC2D_DEFAULTS["size"],
    limit: Annotated[int | None, typer.Option(help="Keep only the first N patients (small datasets).")] = None,
    seed: Annotated[int, typer.Option(help=f"Split seed ({_SEED_HELP}).")] = LIDC2D_DEFAULTS["seed"],
    test_fraction: Annotated[float, typer.Option(help=_TEST_HELP)] = LIDC2D_DEFAULTS["test_fraction"],
    n_folds: Annotated[int, typer.Option(help=_FOLDS_HELP)] = LIDC2D_DEFAULTS["n_folds"],
) -> None:
    """LIDC-IDRI nodule crops (one per reader annotation) -> 2D HU patches at one spacing, mean-rating labels."""
    from ctharden.data.lidc2d import ingest_lidc2d

    report = ingest_lidc2d(root, out, spacing_mm=spacing_mm, size=size, limit=limit, seed=seed,
                           test_fraction=test_fraction, n_folds=n_folds)
    _print_report(report, "LIDC-IDRI crops")


@ingest_app.command("covid")
def ingest_covid_cmd(
    root: Annotated[Path, typer.Option(help="COVID/ + non-COVID/ (Soares) or CT_COVID/ + CT_NonCOVID/ (UCSD).")],
    out: Annotated[Path, typer.Option(help="Dataset directory to write.")],
    size: Annotated[int, typer.Option(
        help="Output size in pixels, square (default: params.yaml's covid dataset size).")] = COVID_DEFAULTS["size"],
    block_size: Annotated[int, typer.Option(
        help="Soares: neighbouring file numbers per pseudo-patient (default: params.yaml's covid dataset block_size)."
    )] = COVID_DEFAULTS["block_size"],
    skip_bad: Annotated[bool, typer.Option(
        help="Skip undecodable images (counted) instead of failing (default: params.yaml's covid dataset skip_bad)."
    )] = COVID_DEFAULTS["skip_bad"],
    seed: Annotated[int, typer.Option(help=f"Split seed ({_SEED_HELP}).")] = COVID_DEFAULTS["seed"],
    test_fraction: Annotated[float, typer.Option(help=_TEST_HELP)] = COVID_DEFAULTS["test_fraction"],
    n_folds: Annotated[int, typer.Option(help=_FOLDS_HELP)] = COVID_DEFAULTS["n_folds"],
) -> None:
    """COVID-CT slices -> single-channel [0,1] images with patient-safe splits."""
    from ctharden.data.covid import ingest_covid

    report = ingest_covid(
        root, out, size=size, block_size=block_size, skip_bad=skip_bad,
        seed=seed, test_fraction=test_fraction, n_folds=n_folds,
    )
    _print_report(report, "COVID-CT")


@ingest_app.command("table")
def ingest_table_cmd(
    manifest: Annotated[Path, typer.Option(
        help="CSV, one row per sample: path, label (0/1), patient_id [, spacing, split, sample_id].")],
    root: Annotated[Path, typer.Option(help="Folder the manifest's paths are relative to.")],
    task: Annotated[Literal["nodule2d", "nodule3d", "covid2d"], typer.Option(
        help="nodule3d: 3-D HU volumes; nodule2d: 2-D HU images; covid2d: 2-D [0,1] display images.")],
    out: Annotated[Path, typer.Option(help="Dataset directory to write.")],
    spacing_mm: Annotated[float | None, typer.Option(
        help="Resample to this pixel/voxel size in mm (needs each row's spacing: manifest or file header).")] = None,
    size: Annotated[int | None, typer.Option(
        help="Centre-crop/pad every axis to N (air -1024 HU, or 0 for covid2d); without it all shapes must match."
    )] = None,
    seed: Annotated[int, typer.Option(help=f"Split seed ({_SEED_HELP}).")] = SPLIT_DEFAULTS["seed"],
    test_fraction: Annotated[float, typer.Option(
        help=_TEST_HELP + " Unused when the manifest has a split column.")] = SPLIT_DEFAULTS["test_fraction"],
    n_folds: Annotated[int, typer.Option(help=_FOLDS_HELP)] = SPLIT_DEFAULTS["n_folds"],
) -> None:
    """Your own labelled CT (NIfTI, DICOM, PNG/JPEG, .npy) listed in a manifest CSV -> a dataset."""
    from ctharden.data.table import ingest_table

    report = ingest_table(
        manifest, root, out, task=task, spacing_mm=spacing_mm, size=size,
        seed=seed, test_fraction=test_fraction, n_folds=n_folds,
    )
    _print_report(report, "table")


@ingest_app.command("synthetic")
def ingest_synthetic_cmd(
    task: Annotated[str, typer.Option(help="nodule3d (HU cubes) or covid2d ([0,1] slices).")],
    out: Annotated[Path, typer.Option(help="Dataset directory to write.")],
    n: Annotated[int, typer.Option(
        help="Number of phantoms (default: params.yaml's synthetic dataset n).")] = SYNTHETIC_DEFAULTS["n"],
    seed: Annotated[int, typer.Option(help=f"Generator and split seed ({_SEED_HELP}).")] = SYNTHETIC_DEFAULTS["seed"],
    size: Annotated[int, typer.Option(
        help="covid2d image size in pixels (default: params.yaml's synthetic dataset size)."
    )] = SYNTHETIC_DEFAULTS["size"],
    malignant_fraction: Annotated[float, typer.Option(
        help="Share of positive samples (default: params.yaml's synthetic dataset malignant_fraction)."
    )] = SYNTHETIC_DEFAULTS["malignant_fraction"],
    test_fraction: Annotated[float, typer.Option(help=_TEST_HELP)] = SYNTHETIC_DEFAULTS["test_fraction"],
    n_folds: Annotated[int, typer.Option(help=_FOLDS_HELP)] = SYNTHETIC_DEFAULTS["n_folds"],
) -> None:
    """Synthetic CT-like phantoms (labelled source=synthetic) for running without LIDC."""
    from ctharden.data.synthetic import generate_synthetic

    report = generate_synthetic(
        task, out, n=n, seed=seed, size=size, malignant_fraction=malignant_fraction,
        test_fraction=test_fraction, n_folds=n_folds,
    )
    _print_report(report, "synthetic")


@app.command("validate")
def validate_cmd(
    dataset: Annotated[Path, typer.Argument(help="Dataset directory.")],
    report: Annotated[
        Path | None, typer.Option(help="Where Data Docs and validation.json go (default: DATASET-validation).")
    ] = None,
) -> None:
    """Run the Great Expectations checkpoint on a dataset; exit non-zero naming failed expectations and samples."""
    from ctharden.data.validation import ensure_valid, format_failures, validate_dataset

    result = validate_dataset(dataset, report or dataset.with_name(dataset.name + "-validation"))
    if result.success:
        out_console.print(f"[green]valid[/]: {result.n_samples} samples, content hash {result.content_hash[:12]}")
        if result.data_docs_index:
            out_console.print(f"Data Docs: {result.data_docs_index}")
        return
    err_console.print(format_failures(result))
    ensure_valid(result)


@app.command("train")
def train_cmd(
    jobs: Annotated[
        list[str] | None, typer.Argument(help="Training jobs from params.yaml `train.jobs` (default: all).")
    ] = None,
) -> None:
    """Train configured jobs: k-fold CV, model selection on validation, test metrics, MLflow runs
    (``ctharden stage train`` for each job)."""
    from ctharden.config.jobs import job_names
    from ctharden.stages import train

    params = state.params()
    for job in jobs or job_names(params):
        _print_training(train.run(params, job))


def _print_training(result: TrainResult) -> None:
    summary = result.record
    agg = result.test_mean_std
    parts = [f"{k} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in agg.items() if v.get("mean") is not None]
    out_console.print(f"[bold]{summary['job']}[/] on {summary['dataset']} ({summary['runtime']}, "
                      f"{summary['seconds']} s): test {', '.join(parts)} over {len(summary['folds'])} fold(s)")
    out_console.print(f"model: {result.model_file}  MLflow run: {result.run_id}")


@app.command("evaluate")
def evaluate_cmd(
    jobs: Annotated[
        list[str] | None, typer.Argument(help="Trained jobs to evaluate for robustness (default: all in train.jobs).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Instead of jobs: model file, MLflow run id, runs:/ID or models:/NAME/VERSION|@ALIAS."),
    ] = None,
    data: Annotated[Path | None, typer.Option(help="With --model: dataset directory (any source).")] = None,
    split: Annotated[str, typer.Option(help="With --model --clean-only: all | train | test")] = "all",
    validation: Annotated[
        Path | None, typer.Option(help="With --model: the dataset's validation dir; default: validate now.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="With --model: write the metrics JSON here.")] = None,
    plots: Annotated[
        Path | None, typer.Option(help="With --model --clean-only: write ROC/confusion plots here.")
    ] = None,
    clean_only: Annotated[bool, typer.Option(help="With --model: clean metrics only (no attacks).")] = False,
    settings_of: Annotated[
        str | None, typer.Option("--settings-of", help="With --model: use this job's robustness settings.")
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="With --model: write the robustness report here (a directory).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Robustness evaluation: random/optimised NPS attacks (SAN/SAR), 100-PGD with sanity checks, report.

    Without --model: the configured jobs, writing metrics/robustness.json, plots/robustness/,
    reports/robustness/index.html and logging to each job's MLflow run (what `dvc repro` runs).
    With --model and --data: any model on any dataset (clean metrics with --clean-only).
    """
    from ctharden.core.io import atomic_write_json
    from ctharden.tracking.runs import configure, tracking_from_params

    if model is None:
        if data is not None:
            raise typer.BadParameter("--data needs --model", param_hint="--data")
        from ctharden.stages import evaluate

        _print_robustness(evaluate.run(state.params(), "baseline", jobs or None))
        return
    if data is None:
        raise typer.BadParameter("--model needs --data", param_hint="--data")
    if jobs:
        raise typer.BadParameter("give either jobs or --model, not both", param_hint="JOBS")
    if not Path(model).is_file():
        configure(tracking_from_params(state.params()))
    if clean_only:
        from ctharden.stages.evaluate_external import evaluate_model

        result = evaluate_model(model, data, split=split, validation_dir=validation, device=device, plots_dir=plots)
    else:
        from ctharden.stages.evaluate_external import evaluate_model_robustness

        result = evaluate_model_robustness(
            model, data, state.params(), validation_dir=validation, settings_of=settings_of,
            report_dir=report or Path("reports") / "robustness" / "external",
        )
    if out is not None:
        atomic_write_json(out, result)
    out_console.print_json(json.dumps(result, default=str))


@app.command("check")
def check_cmd(
    model: Annotated[str, typer.Option(help="TorchScript, .pt2, MLflow model (dir, runs:/, models:/), "
                                            "state_dict (with --factory), .onnx, or a ctharden model file.")],
    data: Annotated[Path, typer.Option(help="Dataset directory (e.g. from `ctharden ingest table`).")],
    out: Annotated[Path, typer.Option(help="Write gate.json, robustness.json and the HTML report here.")],
    contract: Annotated[Path | None, typer.Option(
        help="Model contract YAML: spatial_dims, input_shape, channels, input scaling, output kind.")] = None,
    policy: Annotated[str, typer.Option(
        help="Robustness policy: a gate job of params.yaml (e.g. nodule2d) or default.")] = "default",
    factory: Annotated[str | None, typer.Option(
        help="package.module:function that builds the network for a state_dict (needs --trust-code).")] = None,
    trust_code: Annotated[bool, typer.Option(
        "--trust-code", help="Allow importing and running your code (--factory, pickled MLflow models).")] = False,
    validation: Annotated[Path | None, typer.Option(
        help="The dataset's validation dir; default: validate now.")] = None,
    register: Annotated[str | None, typer.Option(
        help="Register the model under this name in the MLflow registry if (and only if) the gate passes.")] = None,
) -> None:
    """Check a model ctharden did not build: dry run, clean metrics, NPS noise, the attack
    ensemble with its self-checks, the gate and a report. Exit code = verdict: 0 pass,
    3 inconclusive, 4 fail (1: bad input)."""
    from ctharden.gate.criteria import reasons
    from ctharden.stages.check import EXIT_CODES, check_model

    rec = check_model(model, data, state.params(), out_dir=out, contract_file=contract, policy=policy,
                      factory=factory, trust_code=trust_code, validation_dir=validation, register=register)
    out_console.print(f"{model}: [bold]{rec['verdict'].upper()}[/] under policy {policy}  {reasons(rec)}")
    reg = rec.get("registration")
    if reg is not None and reg["status"] == "rejected":
        out_console.print(f"not registered as {reg['name']}: the gate did not pass")
    elif reg is not None:
        out_console.print(f"{reg['status']}: models:/{reg['name']}/{reg['version']} (aliases: "
                          f"{', '.join(reg['aliases']) or 'none'}; {reg.get('champion_decision', '')})")
    out_console.print(f"report: {rec['report']}")
    raise typer.Exit(EXIT_CODES[rec["verdict"]])


@app.command("summary")
def summary_cmd() -> None:
    """What the last pipeline run decided: per job and model the verdict, the primary criterion with
    its bound, the clean AUC with its interval, the registry outcome and the reports (`make run` ends with it)."""
    from ctharden.stages.summary import pipeline_summary, summary_markdown

    typer.echo(summary_markdown(pipeline_summary(state.params())))


@app.command("harden")
def harden_cmd(
    model: Annotated[str, typer.Option(help="A trainable model: TorchScript, or a state_dict with --factory.")],
    data: Annotated[Path, typer.Option(help="Dataset directory (e.g. from `ctharden ingest table`).")],
    out: Annotated[Path, typer.Option(help="Write the hardened model, harden.json and both checks here.")],
    contract: Annotated[Path | None, typer.Option(help="Model contract YAML (see `ctharden check`).")] = None,
    policy: Annotated[str, typer.Option(
        help="Robustness policy: a gate job of params.yaml (e.g. nodule2d) or default.")] = "default",
    method: Annotated[str | None, typer.Option(
        help="adv | ima | rand | trades | nps | adaptive (default: the policy's harden.method).")] = None,
    eps: Annotated[float | None, typer.Option(
        help="Training ε in model-input units (adv, rand, trades; IMA: its ε_max).")] = None,
    factory: Annotated[str | None, typer.Option(
        help="package.module:function that builds the network for a state_dict (needs --trust-code).")] = None,
    trust_code: Annotated[bool, typer.Option("--trust-code", help="Allow importing and running your code.")] = False,
    validation: Annotated[Path | None, typer.Option(
        help="The dataset's validation dir; default: validate now.")] = None,
    register: Annotated[str | None, typer.Option(
        help="Register the hardened model under this name if (and only if) its check passes.")] = None,
    compare: Annotated[bool, typer.Option(help="Also check the original model, for before/after.")] = True,
) -> None:
    """Fine-tune a team's own model with a hardening method and ε, then check it (and the original).
    Exit code = the hardened model's verdict: 0 pass, 3 inconclusive, 4 fail (1: bad input)."""
    from ctharden.stages.check import EXIT_CODES
    from ctharden.stages.harden_external import harden_external_model

    rec = harden_external_model(model, data, state.params(), out_dir=out, contract_file=contract, policy=policy,
                                method=method, eps=eps, factory=factory, trust_code=trust_code,
                                validation_dir=validation, register=register, compare=compare)
    eps_text = f" ε={rec['eps']:.4g} ({rec['norm']})" if rec["eps"] is not None else ""
    out_console.print(f"{model}: hardened with {rec['method']}{eps_text} -> {rec['hardened_model']}")
    for name in ("baseline", "hardened"):
        r = rec[name]
        if r is not None:
            p = r["primary"]
            value = "n/a" if p["value"] is None else f"{p['value']:.4g}"
            out_console.print(f"  {name}: [bold]{r['verdict'].upper()}[/] ({p['criterion']} {value}); {r['report']}")
    reg = rec["hardened"].get("registration")
    if reg is not None:
        out_console.print(f"  registration: {reg['status']}" + (f" models:/{reg['name']}/{reg['version']}"
                                                                 if reg.get("version") else ""))
    raise typer.Exit(EXIT_CODES[rec["hardened"]["verdict"]])


def _print_robustness(result: EvaluateResult) -> None:
    from ctharden.reporting.report import markdown_table, pgd_rows, table2_rows

    for job, res in result.jobs.items():
        table = Table(title=f"{job}: SAN/N (%) under NPS noise")
        header, rows = table2_rows(res)
        for h in header:
            table.add_column(h, justify="right")
        for r in rows:
            table.add_row(*r)
        out_console.print(table)
        out_console.print(markdown_table(*pgd_rows(res)))
        verdict = "not applicable (no gradients)" if res["sanity_passed"] is None else "[green]pass[/]" if res[
            "sanity_passed"] else "[bold red]FAIL[/] " + ", ".join(
            f"{n}: {s['flags']}" for n, s in res["sanity"].items() if not s["passed"])
        out_console.print(f"sanity checks: {verdict}   ({res['seconds']['total']:.0f} s)")
    out_console.print(f"report: {result.html}")


@stage_app.command("train")
def stage_train(job: Annotated[str, typer.Argument(help="Training job from params.yaml `train.jobs`.")]) -> None:
    """Train one configured job (a dvc.yaml stage)."""
    from ctharden.stages import train

    _print_training(train.run(state.params(), job))


@study_app.command("architectures")
def study_architectures(
    job: Annotated[
        str, typer.Option(help="Base training job whose data and settings every variant uses.")
    ] = "nodule3d",
    variants: Annotated[
        str | None,
        typer.Option(help="Comma-separated architectures (default: the Table 3 variants of the job's arch)."),
    ] = None,
    mas: Annotated[float, typer.Option(help="mAs level of the random NPS attacks.")] = 100.0,
    k: Annotated[int | None, typer.Option(help="Perturbations per sample (default: robustness random.k).")] = None,
    out: Annotated[Path, typer.Option(help="Output directory (models, table.md, study.json).")] = Path(
        "reports/architecture_study"),
) -> None:
    """shen 2020 Table 3: train each architecture variant, random NPS attacks at one mAs, SAN/N per split."""
    from ctharden.studies.architectures import format_study, run_architecture_study

    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    study = run_architecture_study(state.params(), job=job, variants=names, mas=mas, k=k, out=out)
    out_console.print(format_study(study))
    out_console.print(f"written: {out / 'table.md'}, {out / 'study.json'} ({study['seconds']} s)")


@study_app.command("moons")
def study_moons(
    n_train: Annotated[int, typer.Option(help="Training points (the paper: 20000).")] = 20000,
    n_test: Annotated[int, typer.Option(help="Test points (the paper: 2000).")] = 2000,
    epochs: Annotated[int, typer.Option(help="Training epochs per method (the paper: 30).")] = 30,
    methods: Annotated[str, typer.Option(help="Comma-separated: ce, adv, ima, trades, rand.")] = "ce,adv,ima",
    noise: Annotated[float, typer.Option(help="make_moons noise (not stated in the paper; ours 0.05).")] = 0.05,
    out: Annotated[Path, typer.Option(help="Output directory (results.json, table.md, PNGs).")] = Path("reports/moons"),
    seed: Annotated[int, typer.Option(help="Data, initial weights, batch order and attack seed.")] = 0,
) -> None:
    """ma 2020 Moons (section 3.1, Table 1): train each method, L∞ 100-PGD test accuracy per ε."""
    from ctharden.studies.moons import run_moons, table_rows

    res = run_moons(n_train=n_train, n_test=n_test, epochs=epochs, methods=methods, noise=noise, seed=seed,
                    out_dir=out)
    header, rows = table_rows(res)
    table = Table(title="Moons: L∞ 100-PGD test accuracy (\"paper:\" rows = ma 2020 Table 1, not measured here)")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r, style="dim" if r[0].startswith("paper:") else None)
    out_console.print(table)
    out_console.print(f"written: {', '.join(res['files'].values())} ({res['seconds']} s)")


@stage_app.command("evaluate")
def stage_evaluate(
    hardened: Annotated[
        bool, typer.Option("--hardened", help="Evaluate the harden stage's models, next to the baselines.")
    ] = False,
) -> None:
    """Robustness evaluation of every trained (or hardened) job and the report (a dvc.yaml stage)."""
    from ctharden.stages import evaluate

    _print_robustness(evaluate.run(state.params(), "hardened" if hardened else "baseline"))


@stage_app.command("tune")
def stage_tune(
    job: Annotated[str | None, typer.Argument(help="Training job (default: every job).")] = None,
) -> None:
    """Pick each job's hardening ε with Optuna, seeded by IMA's margins (a dvc.yaml stage)."""
    from ctharden.config.jobs import job_names
    from ctharden.stages import tune

    params = state.params()
    for name in [job] if job else job_names(params):
        out = tune.run(params, name)
        res = out.record
        if out.eps is None:
            out_console.print(f"{name}: {res.get('skipped', 'no ε')}")
            continue
        best = res["best_trial"]
        ok = "" if out.feasible else "  [bold red](no trial met the clean-AUC floor)[/]"
        out_console.print(f"{name}: {res['method']} ε = {out.eps:.4g} (robust acc {best['robust_accuracy']:.3f}, "
                          f"clean AUC {best['clean_auc']:.3f}; {len(res['trials'])} trials, "
                          f"{res['seconds']:.0f} s){ok}")


@stage_app.command("harden")
def stage_harden(
    job: Annotated[str | None, typer.Argument(help="Training job (default: every job).")] = None,
) -> None:
    """Harden each job's baseline with its method and ε; train the comparison methods (a dvc.yaml stage)."""
    from ctharden.config.jobs import job_names
    from ctharden.stages import harden

    params = state.params()
    for name in [job] if job else job_names(params):
        res = harden.run(params, name).record
        table = Table(title=f"{name}: 100-PGD accuracy ({res['norm']}) on {res['n_test_attacked']} test samples")
        eps = next(iter(res["curves"].values()))["eps"]
        for col in ("method", "test AUC", *[f"{e:g}" for e in eps], "area"):
            table.add_column(col)
        for label, c in res["curves"].items():
            table.add_row(label, f"{c['clean_auc']:.3f}", *[f"{a:.3f}" for a in c["accuracy"]], f"{c['auc']:.3f}")
        out_console.print(table)


@stage_app.command("ingest")
def stage_ingest(name: Annotated[str, typer.Argument(help="Dataset name from params.yaml `datasets:`.")]) -> None:
    """Ingest one configured dataset (a dvc.yaml stage)."""
    from ctharden.stages import ingest

    _print_report(ingest.run(state.params(), name).to_json(), f"ingest {name}")


@stage_app.command("validate")
def stage_validate(name: Annotated[str, typer.Argument(help="Dataset name from params.yaml `datasets:`.")]) -> None:
    """Validate one configured dataset with its GX checkpoint (a dvc.yaml stage)."""
    from ctharden.stages import validate

    out_console.print(validate.summarize({name: validate.run(state.params(), name).to_json()}))


_DECISION_STYLE = {"pass": "[green]pass[/]", "fail": "[bold red]FAIL[/]", "inconclusive": "[yellow]inconclusive[/]"}
_VERDICT_STYLE = {"pass": "[bold green]PASSED[/]", "fail": "[bold red]FAILED[/]",
                  "inconclusive": "[bold yellow]INCONCLUSIVE[/]"}


def _print_gate(gated: Mapping[str, Any]) -> None:
    """One table per job: every criterion, its threshold, and per gated variant the point value,
    the one-sided bound the decision rests on, k/n and the decision."""
    from ctharden.gate.criteria import verdict_of

    jobs = list(dict.fromkeys(job for entries in gated.values() for job in entries))
    for job in jobs:
        recs = {v: entries[job] for v, entries in gated.items() if job in entries}
        first = next(iter(recs.values()))
        conf = first.get("confidence")
        table = Table(title=f"robustness gate: {job}" + (f" ({int(100 * conf)} % one-sided bounds)" if conf else ""))
        table.add_column("criterion")
        table.add_column("threshold", justify="right")
        for v in recs:
            table.add_column(v, justify="right")
        for name, r in first["criteria"].items():
            cells = []
            for rec in recs.values():
                c = rec["criteria"][name]
                value = "n/a" if c["value"] is None else f"{c['value']:.4g}"
                if c.get("lower") is not None:
                    value += f" (bound {c['lower'] if c['op'] == '>=' else c['upper']:.4g}"
                    value += f", {c['k']}/{c['n']})" if c.get("k") is not None else f", n={c['n']})"
                decision = c.get("decision") or ("pass" if c["passed"] else "fail")
                more = f" ~{c['samples_to_decide']} needed" if c.get("samples_to_decide") else ""
                cells.append(f"{value} {_DECISION_STYLE[decision]}{more}")
            table.add_row(name, f"{r['op']} {r['threshold']:g}", *cells)
        table.add_row("[bold]gate[/]", "", *[_VERDICT_STYLE[verdict_of(rec)] for rec in recs.values()])
        out_console.print(table)


def gate_cmd(
    jobs: Annotated[list[str] | None, typer.Argument(help="Jobs to gate (default: every evaluated job).")] = None,
    variant: Annotated[str, typer.Option(
        help="baseline | hardened | all | auto (hardened when evaluated, else baseline).")] = "auto",
    no_fail: Annotated[bool, typer.Option(
        "--no-fail",
        help="Record the verdicts and exit 0 even when a model fails (the pipeline's gate stage).")] = False,
) -> None:
    """Robustness gate: check each evaluated model against params.yaml `gate`, write metrics/gate.json,
    print every criterion, and exit non-zero if a gated model fails (a dvc.yaml stage)."""
    from ctharden.stages import gate

    result = gate.run(state.params(), variant, jobs or None)
    _print_gate(result.record)
    out_console.print(f"written: {result.metrics}")
    if not result.passed and not no_fail:
        raise GateFailed("gate failed: " + " | ".join(result.failures))


def register_cmd(
    jobs: Annotated[list[str] | None, typer.Argument(help="Jobs to register (default: every gated job).")] = None,
    variant: Annotated[list[str] | None, typer.Option(
        help="Variants to consider, in order (default: baseline then hardened).")] = None,
    no_fail: Annotated[bool, typer.Option(
        "--no-fail",
        help="Report a job with no passing model and exit 0 (the main job: a failed gate is an outcome).")] = False,
) -> None:
    """Register each gated model in the MLflow registry only if its gate passed (tags, description,
    report link; `challenger` -> new version, `champion` only if it beats the current one). Exits
    non-zero when a job has no model that passed, unless ``--no-fail``."""
    from ctharden.stages import register
    from ctharden.tracking.promotion import ORDER, register_markdown

    params = state.params()
    results = [register.run(params, job, variant or ORDER) for job in jobs] if jobs else [
        register.run(params, "all", variant or ORDER)]
    summary = results[-1].record
    shown = jobs or list(summary["jobs"])
    out_console.print(register_markdown({**summary, "jobs": {j: summary["jobs"][j] for j in shown}}))
    missing = [job for r in results for job in r.unregistered]
    if missing:
        why = "; ".join(o["reason"] for j in missing for o in summary["jobs"][j])
        if not no_fail:
            raise GateFailed(f"nothing registered for {', '.join(missing)}: {why}")
        out_console.print(f"nothing registered for {', '.join(missing)} (the gate's verdict, reported): {why}")


class _DefaultCommandGroup(TyperGroup):
    """A group whose first argument, when it is not one of its commands, goes to ``check``: so
    ``ctharden gate --variant all`` gates and ``ctharden gate plan`` plans."""

    default = "check"

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:  # type: ignore[override]
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default, *args]
        elif not args:
            args = [self.default]
        return super().parse_args(ctx, args)


gate_app = typer.Typer(cls=_DefaultCommandGroup, help=(
    "Robustness gate: `ctharden gate [JOBS]` decides every evaluated model on confidence bounds "
    "(same as `ctharden gate check`); `ctharden gate plan` gives the samples each criterion needs."))
app.add_typer(gate_app, name="gate")


def gate_plan_cmd(
    jobs: Annotated[list[str] | None, typer.Argument(help="Jobs to plan (default: every gated training job).")] = None,
    expected: Annotated[list[str] | None, typer.Option(
        help="CRITERION=VALUE: the rate a model is expected to reach (metric units; repeatable). "
             "Default: the last evaluation's value, else the policy's margin (gate.plan.margin).")] = None,
    variant: Annotated[str, typer.Option(help="Whose last evaluation to read: baseline | hardened.")] = "baseline",
) -> None:
    """Samples needed per gate criterion to decide it at the gate's confidence for an expected rate
    (gate.confidence, gate.plan.power), next to the n the last evaluation used."""
    from ctharden.config.jobs import job_names
    from ctharden.config.paths import evaluation_paths
    from ctharden.core.errors import ConfigError
    from ctharden.core.io import load_json
    from ctharden.gate.criteria import gate_settings
    from ctharden.gate.plan import plan_job, plan_markdown

    params = state.params()
    given: dict[str, float] = {}
    for item in expected or []:
        name, sep, value = item.partition("=")
        try:
            given[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"--expected takes CRITERION=VALUE (a number), got {item!r}")
    path = evaluation_paths(params, variant)["metrics"]
    evaluated = load_json(path) if path.is_file() else {}
    plans = {job: gate_settings(params, job) for job in jobs or job_names(params)}
    known = {c.name for gs in plans.values() for c in gs.criteria}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"--expected names unknown criteria {unknown} (known: {', '.join(sorted(known))})")
    for job, gs in plans.items():
        rows = plan_job(gs, intervals=(evaluated.get(job) or {}).get("intervals"), expected=given)
        out_console.print(plan_markdown(job, rows), markup=False, highlight=False)


gate_app.command("check")(gate_cmd)
gate_app.command("plan")(gate_plan_cmd)
stage_app.command("gate")(gate_cmd)
for _group in (stage_app, app):  # `ctharden register`: short alias of `ctharden stage register`
    _group.command("register")(register_cmd)


@app.command("ci-gate")
def ci_gate_cmd(
    base: Annotated[str, typer.Option(help="Base git revision to compare with (e.g. origin/main).")],
    variant: Annotated[str, typer.Option(help="baseline | hardened | all | auto.")] = "auto",
    summary: Annotated[Path | None, typer.Option(
        help="Append the markdown summary to this file (e.g. $GITHUB_STEP_SUMMARY).")] = None,
) -> None:
    """Pull-request check: the robustness gate on this checkout's metrics plus a regression check of
    every gated metric against BASE, with `dvc metrics diff BASE`; exits non-zero on fail."""
    from ctharden.stages.ci_gate import ci_gate

    res = ci_gate(state.params(), base, variant=variant)
    out_console.print(res["markdown"], markup=False, highlight=False)
    if summary is not None:
        with open(summary, "a", encoding="utf-8") as fh:
            fh.write(res["markdown"])
    if not res["passed"]:
        raise GateFailed("ci-gate failed: " + " | ".join(res["failures"]))


@stage_app.command("data-version")
def stage_data_version() -> None:
    """Print the data version: the DVC hash of data/ and each dataset's content hash."""
    from ctharden.data.version import data_version

    out_console.print_json(json.dumps(data_version(state.params())))


def main() -> None:
    """Entry point: run the CLI, turning user errors into one line and a non-zero exit."""
    try:
        code = app(standalone_mode=False)  # click returns the code of a typer.Exit here
    except CthardenError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except TyperException as exc:  # a usage error (typer bundles its own click): its message, not a traceback
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", 2)
        if callable(show):
            show()
        else:
            err_console.print(f"error: {escape(str(exc))}")
        sys.exit(code)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
