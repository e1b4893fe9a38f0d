"""``params.yaml`` loading with explicit profiles and ``key.path=value`` overrides.

``params.yaml`` holds the embedded default (runs on a 2-core CPU in minutes) at the top level and
named profiles under ``profiles:``. The active profile is chosen, in order of precedence, by the
``--profile`` CLI option, the ``CTHARDEN_PROFILE`` environment variable, or the ``profile:`` key
(which ``dvc exp run -S profile=paper`` sets). A profile is deep-merged over the top level.

The merged result is validated against the one settings schema (:mod:`ctharden.config.schema`):
a wrong key, type or value is a :class:`ConfigError` naming the key path. The returned mapping
is the plain merged dict (the schema only checks it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ctharden.config.merge import deep_merge
from ctharden.config.schema import validate_params
from ctharden.core.errors import ConfigError

__all__ = ["DEFAULT_PARAMS", "PROFILE_ENV", "apply_override", "deep_merge", "load_params", "section"]

DEFAULT_PARAMS = Path("params.yaml")
PROFILE_ENV = "CTHARDEN_PROFILE"


def apply_override(params: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key.path=value")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {assignment!r} has an empty key")
    node: dict[str, Any] = params
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


def load_params(
    path: str | os.PathLike[str] = DEFAULT_PARAMS,
    profile: str | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Load ``params.yaml``, apply the active profile then ``overrides``, validate; return a plain dict.

    The result carries ``profile`` (the name applied) and drops the ``profiles`` table.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    profiles = raw.pop("profiles", {}) or {}
    name = profile or os.environ.get(PROFILE_ENV) or raw.get("profile") or "default"
    if name != "default":
        if name not in profiles:
            known = ", ".join(["default", *sorted(profiles)])
            raise ConfigError(f"{path}: unknown profile {name!r} (known: {known})")
        raw = deep_merge(raw, profiles[name])
    raw["profile"] = name
    for assignment in overrides:
        apply_override(raw, assignment)
    validate_params(raw, where=f"{path.name} (profile {name})")
    return raw


def section(params: Mapping[str, Any], dotted: str) -> Any:
    """Return ``params[a][b]...`` for ``dotted='a.b'``, with a clear error if it is missing."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"params: missing key {dotted!r}")
        node = node[part]
    return node
