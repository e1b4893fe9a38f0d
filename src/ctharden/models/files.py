"""Model files and resumable training state, written atomically.

A *model file* (``model.pt``) is ``{"format": "ctharden-model/1", "config": model.config(),
"state_dict": ..., "meta": {...}}``: everything needed to rebuild the
:class:`~ctharden.models.CTClassifier` without pickled code (loaded with ``weights_only=True``).
A *training state* (``last.pt``) adds the optimizer, epoch, best weights and history so that a
killed run resumes where it stopped and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, cast

import torch

from ctharden.core.errors import DataError
from ctharden.core.io import atomic_write_bytes
from ctharden.models import CTClassifier, model_from_config

MODEL_FORMAT = "ctharden-model/1"


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to ``path`` atomically (a reader never sees a partial file)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_file(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` with ``weights_only=True``; :class:`DataError` names a missing or corrupt file."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{path}: corrupt or not a torch file ({exc})") from None


def save_model(path: str | os.PathLike[str], model: torch.nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write a model file for ``model`` (a CTClassifier) with JSON-like ``meta``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = cast(CTClassifier, model).config()
    return save_atomic({"format": MODEL_FORMAT, "config": config, "state_dict": state, "meta": meta or {}}, path)


def load_model(path: str | os.PathLike[str]) -> tuple[CTClassifier, dict[str, Any]]:
    """Rebuild the model saved by :func:`save_model`; returns ``(model in eval mode, meta)``."""
    return model_from_blob(load_file(path), path)


def model_from_blob(blob: Any, path: str | os.PathLike[str]) -> tuple[CTClassifier, dict[str, Any]]:
    """The model of an already loaded model file ``blob`` (``path`` names it in errors)."""
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise DataError(f"{path}: not a ctharden model file (expected format {MODEL_FORMAT})")
    model = model_from_config(blob["config"])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, blob.get("meta", {})
