"""``ctharden check``: a team's own model on a team's own dataset, judged like a pipeline model.

>>> rec = check_model("team/model.pt2", "artifacts/datasets/team", params, contract_file="contract.yaml",
...                   policy="nodule2d", out_dir="reports/check")
>>> rec["verdict"]   # pass | fail | inconclusive; EXIT_CODES[rec["verdict"]] is the command's exit

In order, each step refusing bad input with one line (:class:`DataError` / :class:`ConfigError`):

1. the model through :func:`ctharden.models.sources.load_any` with its contract (a YAML file
   validated as :class:`~ctharden.config.schema.ModelContract`; ctharden's own model files need
   none);
2. the dataset's Great Expectations validation (its record, or a fresh run into a temp dir);
3. the contract against the data: spatial dims and shape, and units (a ``display`` model needs
   [0, 1] data, a HU model HU data);
4. the dry run (:func:`ctharden.models.dry_run.dry_run`): output shape, finite outputs,
   deterministic forward, input gradients (a model without them, ONNX, gets the black-box
   evaluation: random NPS noise, Square, clean metrics; its white-box rows and criteria say "not
   applicable: no gradients", see :mod:`ctharden.gate.criteria`);
5. the robustness evaluation with the policy's settings (``robustness.jobs.<policy>``, sample caps
   from the gate's planner; attacks in fp32, since a foreign model need not support bf16
   autocast) and the gate with the policy's thresholds (``gate.jobs.<policy>``; ``default``:
   ``gate.defaults`` alone);
6. writes ``out_dir/gate.json`` (the gate record, the dry run, the model and dataset),
   ``out_dir/robustness.json`` (the evaluation, per-sample outcomes included) and the HTML report
   ``out_dir/index.html`` whose first screen is the verdict;
7. with ``register=NAME``: registers the model in the MLflow registry only if the verdict is
   ``pass`` (:mod:`ctharden.tracking.checked`), and adds what happened to ``gate.json``
   (``registration``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

from ctharden.config.params import section
from ctharden.core.errors import ConfigError, DataError
from ctharden.core.io import atomic_write_json
from ctharden.data.arrays import load_arrayset
from ctharden.evaluation.headline import headline_metrics
from ctharden.evaluation.units import evaluate_robustness
from ctharden.gate.criteria import check, gate_settings
from ctharden.models import CTClassifier
from ctharden.models.dry_run import dry_run
from ctharden.models.sources import MLFLOW_PREFIXES, load_any, load_contract
from ctharden.noise.config import noise_model
from ctharden.stages.evaluate import evaluation_settings, write_job_figures, write_report
from ctharden.stages.evaluate_external import ensure_dataset_valid
from ctharden.tracking.checked import register_checked
from ctharden.tracking.runs import configure, tracking_from_params

#: The exit code of ``ctharden check`` per verdict (1 is an error, 2 a usage error).
EXIT_CODES = {"pass": 0, "inconclusive": 3, "fail": 4}
DRY_RUN_SAMPLES = 8


def policy_job(params: dict[str, Any], policy: str) -> str:
    """The job whose settings a ``--policy`` names (``""`` for ``default``: the defaults alone);
    :class:`ConfigError` for a policy that is not a gate job of ``params.yaml``."""
    gate_jobs = (params.get("gate") or {}).get("jobs") or {}
    if policy != "default" and policy not in gate_jobs:
        raise ConfigError(f"--policy {policy!r}: not a gate policy of params.yaml (default, {', '.join(gate_jobs)})")
    return "" if policy == "default" else policy


def check_contract_fits(model: Any, info: dict[str, Any], dataset_dir: Path) -> None:
    """:class:`DataError` unless the model's contract fits the dataset's arrays and units."""
    contract = getattr(model, "contract", None)
    shape = list(info["shape"])
    if contract is None:
        return
    if contract.spatial_dims != len(shape):
        raise DataError(f"the contract says {contract.spatial_dims}-D inputs; dataset {dataset_dir} holds "
                        f"{len(shape)}-D arrays {shape}")
    if list(contract.input_shape) != shape:
        raise DataError(f"the contract's input_shape {list(contract.input_shape)} does not match dataset "
                        f"{dataset_dir}'s arrays {shape} (ingest with --size to crop or pad)")
    hu_data = info.get("units") == "HU"
    if contract.input.kind == "display" and hu_data:
        raise DataError(f"the contract's input is display values in [0, 1], but dataset {dataset_dir} is in HU "
                        "(give the model's HU window: input.kind window)")
    if contract.input.kind != "display" and not hu_data:
        raise DataError(f"the contract's input is {contract.input.kind} of HU, but dataset {dataset_dir} holds "
                        f"{info.get('units')} (input.kind display)")


def check_model(
    model_ref: str,
    dataset_dir: str | Path,
    params: dict[str, Any],
    *,
    out_dir: str | Path,
    contract_file: str | Path | None = None,
    policy: str = "default",
    factory: str | None = None,
    trust_code: bool = False,
    validation_dir: str | Path | None = None,
    register: str | None = None,
) -> dict[str, Any]:
    """Steps 1-7 of the module docstring; returns the gate record (``verdict``, ``criteria``, ...)
    with ``dry_run``, ``model``, ``dataset``, ``report`` and, with ``register``, ``registration``
    (:func:`ctharden.tracking.checked.register_checked`) added."""
    if register is not None and (not register or "/" in register or "@" in register):
        raise ConfigError(f"--register {register!r} is not a valid registered-model name")
    dataset_dir, out = Path(dataset_dir), Path(out_dir)
    job = policy_job(params, policy)
    if str(model_ref).startswith(MLFLOW_PREFIXES):  # fetched from the tracking store of params.yaml
        configure(tracking_from_params(params))
    model = load_any(model_ref, load_contract(contract_file), factory=factory, trust_code=trust_code)
    validation = ensure_dataset_valid(dataset_dir, Path(validation_dir) if validation_dir else None)
    data = load_arrayset(dataset_dir, model)
    check_contract_fits(model, data.info, dataset_dir)
    probe = dry_run(model, data.x[:DRY_RUN_SAMPLES], name=str(model_ref))
    white_box = bool(getattr(model, "gradients", True))
    settings = evaluation_settings(params, job, int(data.raw.shape[-1]))
    # fp32 attacks: a model from elsewhere need not support bf16 autocast (TorchScript backward fails);
    # a model without gradients (ONNX) gets the black-box evaluation
    settings = dataclasses.replace(settings, models="selected", white_box=white_box,
                                   pgd=dataclasses.replace(settings.pgd, autocast=False),
                                   optimized=dataclasses.replace(settings.optimized, autocast=False))
    result, visuals = evaluate_robustness(model, data, settings, seed=int(section(params, "seed")),
                                          nps=noise_model(params))
    name = Path(str(model_ref).rstrip("/")).name or str(model_ref)
    config = cast(CTClassifier, model).config()
    result.update({"job": name, "dataset": dataset_dir.name, "dataset_dir": str(dataset_dir),
                   "dataset_hash": data.info["content_hash"], "validated": validation.get("success"),
                   "model": {"file": str(model_ref), "arch": getattr(model, "arch", "?"), "config": config}})
    result["headline"] = headline_metrics(result)
    verdict = check(result["headline"], gate_settings(params, policy), result["intervals"], white_box=white_box)
    figures = write_job_figures(result, visuals, cast(CTClassifier, model), out / "plots", out / "figures")
    report = write_report(out, {name: result}, {name: figures}, params.get("profile"), verdicts={name: verdict})
    record = {**verdict, "policy": policy, "dry_run": probe, "model": result["model"],
              "dataset": {"dir": str(dataset_dir), "hash": data.info["content_hash"], "task": data.info["task"]},
              "report": str(report["html"])}
    atomic_write_json(out / "robustness.json", result)
    atomic_write_json(out / "gate.json", record)
    if register is not None:
        record["registration"] = register_checked(params, record, result, register, out_dir=out,
                                                  contract_file=contract_file, factory=factory)
        atomic_write_json(out / "gate.json", record)
    return record
