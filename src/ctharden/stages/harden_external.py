"""``ctharden harden --model``: fine-tune a team's own model with a hardening method, then check it.

>>> rec = harden_external_model("team/model.ts", "artifacts/datasets/team", params, out_dir="reports/harden-team",
...                             contract_file="contract.yaml", policy="nodule2d", method="adv", eps=0.004)
>>> rec["baseline"]["verdict"], rec["hardened"]["verdict"]

In order (bad input refused with one line before any training):

1. the model through :func:`~ctharden.models.sources.load_any`; it must be trainable: TorchScript,
   a ``state_dict`` with its factory (``--factory``, ``--trust-code``) or a pickled MLflow model the
   user trusts. A ``torch.export`` program is frozen in the mode it was exported in and an ONNX
   session has no parameters: both are refused with what to export instead;
2. the dataset's Great Expectations validation (into ``out_dir/validation`` unless a record is
   given: nothing unvalidated is trained on), the contract against the data and the dry run;
3. the method (``harden.method`` of the policy unless given) and its training ε: ``--eps``, else
   ``harden.eps`` (a model from outside has no tune stage); IMA falls back to its ``eps_max``;
4. :func:`ctharden.hardening.methods.harden_model` on the dataset's training folds (fold 0 held out
   as validation, the test split never seen), the same implementation as the pipeline's harden
   stage;
5. the hardened network saved the way it came (TorchScript -> ``hardened.ts``; a factory's
   network -> ``hardened.pt`` state_dict, loaded with the same ``--factory``; otherwise a
   ``torch.export`` program ``hardened.pt2``);
6. ``ctharden check`` of the original (``out_dir/baseline``, skipped with ``compare=False``) and of
   the hardened model (``out_dir/hardened``; ``register`` registers it only if it passes);
7. ``out_dir/harden.json``: the method, ε, training history, both verdicts and their primary values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

import torch

from ctharden.config import choices
from ctharden.config.hardening import harden_settings
from ctharden.config.params import section
from ctharden.config.robustness import job_settings
from ctharden.core.errors import ConfigError, DataError
from ctharden.core.io import atomic_write_json
from ctharden.data.arrays import load_arrayset
from ctharden.data.validation import ensure_valid, validate_dataset
from ctharden.hardening.methods import harden_model, hardening_data, method_eps, noise_context
from ctharden.models.dry_run import dry_run
from ctharden.models.external import ExternalClassifier
from ctharden.models.sources import load_any, load_contract
from ctharden.noise.config import noise_model
from ctharden.stages.check import DRY_RUN_SAMPLES, check_contract_fits, check_model, policy_job

#: The validation fold of a team dataset's hardening (the selected fold of a pipeline job).
VALIDATION_FOLD = 0


def save_hardened(model: ExternalClassifier, out_dir: Path, example: torch.Tensor) -> Path:
    """Write the hardened network the way its source can load it again (module docstring, step 5);
    ``example`` ``(N, ...)`` is a batch in model-input units (the export's example input)."""
    net = model.net.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(net, torch.jit.ScriptModule):
        path = out_dir / "hardened.ts"
        torch.jit.save(net, str(path))
    elif model.source == "factory":
        path = out_dir / "hardened.pt"
        torch.save(net.state_dict(), path)
    else:
        path = out_dir / "hardened.pt2"
        inputs = (model.model_input(example[:2]).detach(),)
        program = torch.export.export(net, inputs, dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
        torch.export.save(program, str(path))
    return path


def harden_external_model(
    model_ref: str,
    dataset_dir: str | Path,
    params: dict[str, Any],
    *,
    out_dir: str | Path,
    contract_file: str | Path | None = None,
    policy: str = "default",
    method: str | None = None,
    eps: float | None = None,
    factory: str | None = None,
    trust_code: bool = False,
    validation_dir: str | Path | None = None,
    register: str | None = None,
    compare: bool = True,
) -> dict[str, Any]:
    """Steps 1-7 of the module docstring; returns the ``harden.json`` record."""
    dataset_dir, out = Path(dataset_dir), Path(out_dir)
    job = policy_job(params, policy)
    model = load_any(model_ref, load_contract(contract_file), factory=factory, trust_code=trust_code)
    if not isinstance(model, ExternalClassifier):
        raise DataError(f"{model_ref}: a ctharden model; harden it with the pipeline (`ctharden stage harden JOB`)")
    if not model.trainable:
        raise DataError(f"{model_ref}: a {model.source} model cannot be fine-tuned ("
                        + ("an ONNX session has no trainable parameters" if model.source == "onnx" else
                           "a torch.export program is frozen in the mode it was exported in")
                        + "); give it as TorchScript, or as a state_dict with --factory --trust-code")
    hs = harden_settings(params, job)
    if method is not None and method not in choices.HARDEN_METHODS:
        raise ConfigError(f"--method {method!r}: not a hardening method ({', '.join(choices.HARDEN_METHODS)})")
    hs = dataclasses.replace(hs, method=method or hs.method)
    train_eps = method_eps(hs.method, hs, eps if eps is not None else hs.eps)  # refuses a missing ε
    if validation_dir is None:
        report = validate_dataset(dataset_dir, out / "validation")
        ensure_valid(report)
        validation_dir = out / "validation"
    full = load_arrayset(dataset_dir, model)
    check_contract_fits(model, full.info, dataset_dir)
    dry_run(model, full.x[:DRY_RUN_SAMPLES], name=str(model_ref))
    if not (full.fold == VALIDATION_FOLD).any():
        raise DataError(f"dataset {dataset_dir} has no fold {VALIDATION_FOLD} to hold out (ingest with --n-folds 2 "
                        "or more)")
    data = hardening_data(full, VALIDATION_FOLD)
    width = int(full.raw.shape[-1])
    noise = noise_context(params, job, model, width) if hs.method == "nps" else None
    adaptive = ({"data": full, "settings": job_settings(params, job).for_width(width), "nps": noise_model(params),
                 "loss": "mse"} if hs.method == "adaptive" else None)
    hardened, info = harden_model(model, hs.method, train_eps, data, hs, seed=int(section(params, "seed")),
                                  noise=noise, adaptive_context=adaptive)
    hardened_file = save_hardened(cast(ExternalClassifier, hardened), out, data.train.x)

    def checked(ref: str, where: str, name: str | None) -> dict[str, Any]:
        return check_model(ref, dataset_dir, params, out_dir=out / where, contract_file=contract_file, policy=policy,
                           factory=factory, trust_code=trust_code, validation_dir=validation_dir, register=name)

    before = checked(str(model_ref), "baseline", None) if compare else None
    after = checked(str(hardened_file), "hardened", register)

    def summary(rec: dict[str, Any] | None) -> dict[str, Any] | None:
        if rec is None:
            return None
        return {"verdict": rec["verdict"], "primary": rec["primary"], "report": rec["report"],
                "registration": rec.get("registration")}

    record = {"model": str(model_ref), "source": model.source, "hardened_model": str(hardened_file),
              "dataset": str(dataset_dir), "policy": policy, "method": hs.method, "eps": info.get("eps"),
              "norm": hs.norm, "epochs": hs.epochs, "lr": hs.lr, "n_train": info["n_train"],
              "validation_fold": VALIDATION_FOLD, "seconds": info["seconds"],
              "history": info.get("history"), "baseline": summary(before), "hardened": summary(after)}
    atomic_write_json(out / "harden.json", record)
    return record
