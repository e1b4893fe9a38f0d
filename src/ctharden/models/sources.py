"""One loader for every model source: :func:`load_any`.

==========================  =========================================================================
reference                   loaded as
==========================  =========================================================================
ctharden model file         :func:`ctharden.models.files.load_model` (its own contract: no file needed)
TorchScript (``jit.save``)  ``torch.jit.load`` (no Python code runs)
``.pt2`` export program     ``torch.export.load(...).module()`` (no Python code runs)
MLflow ``pytorch`` model    ``runs:/…``, ``models:/…`` or a local directory with ``MLmodel``: its
                            ``pt2`` (or TorchScript) file as above; a *pickled* MLflow model runs
                            code when loaded and needs ``trust_code=True``
``state_dict`` + factory    ``factory="package.module:function"`` builds the network, the file
                            (``torch.load(weights_only=True)``) fills it; imports and runs user code,
                            so it needs ``trust_code=True``
ONNX (``.onnx``)            onnxruntime; black-box only (``gradients=False``): no input gradients
model bundle                a directory (local, ``runs:/…``, ``models:/…``) that :func:`write_bundle`
                            wrote: one of the above plus its ``contract.yaml`` (what ``ctharden check
                            --register`` puts in the registry, so a registered version loads as is)
==========================  =========================================================================

A pickled whole module (``torch.save(model)``) is refused: unpickling it runs arbitrary code. The
message says how to export it instead. Everything but a ctharden model file needs a
:class:`~ctharden.config.schema.ModelContract` (a directory that holds ``contract.yaml`` brings its
own). Every failure is a :class:`DataError` with one line.
"""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml
from torch import nn

from ctharden.config.schema import ModelContract, validate_section
from ctharden.core.errors import ConfigError, DataError
from ctharden.models.external import ExternalClassifier
from ctharden.models.files import MODEL_FORMAT, model_from_blob

EXPORT_HINT = ("export it instead: torch.jit.save(torch.jit.script(model), 'model.ts'), "
               "torch.export.save(torch.export.export(model, (example,)), 'model.pt2'), "
               "or save model.state_dict() and pass --factory package.module:function --trust-code")
MLFLOW_PREFIXES = ("runs:/", "models:/")
CONTRACT_FILE = "contract.yaml"  # a model directory's own contract
BUNDLE_FILE = "ctharden-model.yaml"  # a bundle's index: {file: the model file's name, factory: spec or null}


def load_contract(path: str | Path | None) -> ModelContract | None:
    """The model contract in ``path`` (YAML), validated; None without a path."""
    if path is None:
        return None
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: contract file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return validate_section(ModelContract, data, (path.name,))


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def archive_kind(path: Path) -> str:
    """What a torch zip archive holds: ``torchscript``, ``export`` (pt2), ``pickle`` (``torch.save``)
    or ``unknown`` (not a zip)."""
    names = _zip_names(path)
    if not names:
        return "unknown"
    if any(n.split("/", 2)[1:2] == ["models"] for n in names if n.count("/") >= 2) or any(
            n.endswith("archive_format") for n in names):
        return "export"
    if any("/code/__torch__" in n for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "pickle"
    return "unknown"


class OnnxModule(nn.Module):
    """An onnxruntime session as a forward-only module: ``(N, ...)`` float32 in, the first output
    out. No autograd (black-box attacks only)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise DataError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x.detach().cpu().float().numpy())})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)


def _import_factory(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise DataError(f"--factory must be package.module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"--factory {spec}: cannot import it ({exc})") from None
    if not callable(fn):
        raise DataError(f"--factory {spec}: {attr} is not callable")
    return fn


def _weights(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"{path}: a pickled Python object (e.g. a whole nn.Module saved with torch.save); "
                        f"loading it would run arbitrary code, so ctharden refuses it; {EXPORT_HINT}") from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{path}: corrupt or not a torch file ({str(exc).splitlines()[0]})") from None


def _from_factory(path: Path, factory: str, trust_code: bool) -> nn.Module:
    if not trust_code:
        raise DataError(f"--factory {factory} imports and runs your code to build the network; "
                        "pass --trust-code to allow it")
    state = _weights(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: not a state_dict (a mapping of parameter names to tensors)")
    net = _import_factory(factory)()
    if not isinstance(net, nn.Module):
        raise DataError(f"--factory {factory} returned {type(net).__name__}, not an nn.Module")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(f"{path}: does not fit the network of --factory {factory} "
                        f"({str(exc).splitlines()[0]})") from None
    return net


def _not_a_network(path: Path, blob: Any) -> DataError:
    """The error for a weights-only torch file that holds no loadable network."""
    if isinstance(blob, dict) and blob.get("format") == MODEL_FORMAT:
        return DataError(f"{path}: a ctharden model file (load it without a contract)")
    if isinstance(blob, dict):
        return DataError(f"{path}: a state_dict without the network; pass --factory package.module:function "
                         "--trust-code to build it")
    return DataError(f"{path}: not a TorchScript, torch.export or ctharden model file; {EXPORT_HINT}")


def _torch_file(path: Path, kind: str, *, trust_pickle: bool = False) -> nn.Module:
    """The network in a TorchScript or pt2 file (``kind`` from :func:`archive_kind`), or in a
    pickled file when ``trust_pickle``; anything else is a :class:`DataError`."""
    if kind == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call,no-any-return]
    if kind == "export":
        try:
            return torch.export.load(str(path)).module()
        except Exception as exc:  # torch.export raises several types on a bad archive
            raise DataError(f"{path}: not a loadable torch.export program ({str(exc).splitlines()[0]})") from None
    if kind == "pickle" and trust_pickle:
        return cast(nn.Module, torch.load(path, map_location="cpu", weights_only=False))
    raise _not_a_network(path, _weights(path))  # _weights refuses a pickled module itself


def _mlflow_dir(ref: str) -> Path:
    """A local MLflow model directory for ``ref`` (downloaded for ``runs:/`` and ``models:/``)."""
    if not ref.startswith(MLFLOW_PREFIXES):
        return Path(ref)
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
    except (MlflowException, OSError) as exc:
        raise DataError(f"{ref}: cannot fetch the MLflow model ({str(exc).splitlines()[0]})") from None


def _from_mlflow(root: Path, ref: str, trust_code: bool) -> tuple[nn.Module, str]:
    """The network of the MLflow model in the local directory ``root`` (fetched for ``ref``)."""
    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        if (root / "model.pt").is_file():  # a ctharden run's model-file artifact
            raise DataError(f"{ref}: a ctharden model file (load it without a contract)")
        raise DataError(f"{ref}: no MLmodel file: not an MLflow model")
    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
    flavor = flavors.get("pytorch")
    if flavor is None:
        raise DataError(f"{ref}: an MLflow model without the pytorch flavour (has: {', '.join(flavors)})")
    data = root / str(flavor.get("model_data", "data"))
    for name in ("model.pt2", "model.pth"):
        if (data / name).is_file():
            kind = archive_kind(data / name)
            if kind == "pickle" and not trust_code:
                raise DataError(f"{ref}: a pickled MLflow pytorch model; loading it runs arbitrary code: pass "
                                "--trust-code if you trust it, or log it with serialization_format='pt2'")
            return _torch_file(data / name, kind, trust_pickle=trust_code), "mlflow"
    raise DataError(f"{ref}: the pytorch flavour has no model.pt2 or model.pth under {data}")


def load_any(
    ref: str | os.PathLike[str],
    contract: ModelContract | None = None,
    *,
    factory: str | None = None,
    trust_code: bool = False,
) -> nn.Module:
    """Load the model ``ref`` (see the module docstring) in eval mode.

    Returns a :class:`~ctharden.models.CTClassifier` for a ctharden model file, else an
    :class:`ExternalClassifier` wrapping the network with ``contract`` (required).
    """
    path = Path(ref)
    text = str(ref)
    root = _mlflow_dir(text) if text.startswith(MLFLOW_PREFIXES) or path.is_dir() else None
    if root is not None and contract is None and (root / CONTRACT_FILE).is_file():
        contract = load_contract(root / CONTRACT_FILE)
    if root is not None and (root / BUNDLE_FILE).is_file():
        spec = yaml.safe_load((root / BUNDLE_FILE).read_text()) or {}
        name = str(spec.get("file"))
        if Path(name).name != name or not (root / name).is_file():
            raise DataError(f"{ref}: {BUNDLE_FILE} names {name!r}, not a model file inside the bundle")
        return load_any(root / name, contract, factory=factory or spec.get("factory"), trust_code=trust_code)
    is_mlflow = root is not None and (text.startswith(MLFLOW_PREFIXES) or (root / "MLmodel").is_file())
    if not is_mlflow and not path.exists():
        raise DataError(f"{ref}: no such model file or directory, and not a runs:/ or models:/ URI")
    kind = archive_kind(path) if path.is_file() else "unknown"
    if factory is None and kind == "pickle":
        blob = _weights(path)  # a pickled module is refused here
        if isinstance(blob, dict) and blob.get("format") == MODEL_FORMAT:
            own, _ = model_from_blob(blob, path)
            return own
        raise _not_a_network(path, blob)
    if contract is None:
        raise DataError(f"{ref}: a model ctharden did not build needs a contract (--contract FILE.yaml): "
                        "spatial dims, input shape, input scaling, output kind")
    gradients, trainable = True, True
    if factory is not None:
        net, source = _from_factory(path, factory, trust_code), "factory"
    elif is_mlflow and root is not None:
        net, source = _from_mlflow(root, text, trust_code)
    elif path.suffix.lower() == ".onnx":
        net, source, gradients, trainable = OnnxModule(path), "onnx", False, False
    elif path.is_file():
        net, source = _torch_file(path, kind), kind
    else:
        raise DataError(f"{ref}: a directory that is not an MLflow model (no MLmodel file)")
    if isinstance(net, torch.fx.GraphModule) and not isinstance(net, torch.jit.ScriptModule):
        trainable = False  # a torch.export program: frozen in the mode it was exported in
    external = ExternalClassifier(net, contract, source, gradients=gradients, trainable=trainable)
    return external.eval()


def write_bundle(ref: str | os.PathLike[str], out_dir: Path, *, contract_file: str | Path | None = None,
                 factory: str | None = None) -> Path:
    """Copy the model ``ref`` with its contract into ``out_dir`` so that :func:`load_any` loads the
    directory as is: an MLflow model or a bundle directory is copied whole, a file goes in beside
    ``ctharden-model.yaml`` (its name and ``factory``), and ``contract_file`` becomes
    ``contract.yaml``. Returns ``out_dir``; the model itself is not loaded here."""
    text, path = str(ref), Path(ref)
    out_dir.mkdir(parents=True, exist_ok=True)
    if text.startswith(MLFLOW_PREFIXES) or path.is_dir():
        shutil.copytree(_mlflow_dir(text), out_dir, dirs_exist_ok=True)
    elif path.is_file():
        shutil.copy2(path, out_dir / path.name)
        (out_dir / BUNDLE_FILE).write_text(yaml.safe_dump({"file": path.name, "factory": factory}))
    else:
        raise DataError(f"{ref}: no such model file or directory, and not a runs:/ or models:/ URI")
    if contract_file is not None:
        shutil.copy2(contract_file, out_dir / CONTRACT_FILE)
    return out_dir
