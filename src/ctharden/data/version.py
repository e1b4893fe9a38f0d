"""The data version later stages log to MLflow: the DVC hash of ``data/`` and each dataset's content hash."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ctharden.config.paths import dataset_dir, dataset_names
from ctharden.data.dataset import read_info


def data_version(params: Mapping[str, Any], repo: str | Path = ".") -> dict[str, Any]:
    """``{"data_dvc_md5": md5 of data/ in data.dvc or None, "datasets": {name: content hash}}``
    for every configured dataset that has been built."""
    repo = Path(repo)
    version: dict[str, Any] = {"data_dvc_md5": None, "datasets": {}}
    dvc_file = repo / "data.dvc"
    if dvc_file.is_file():
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [])
        version["data_dvc_md5"] = outs[0].get("md5") if outs else None
    for name in dataset_names(params):
        d = repo / dataset_dir(params, name)
        if (d / "dataset.json").is_file():
            version["datasets"][name] = read_info(d)["content_hash"]
    return version
