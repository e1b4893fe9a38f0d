"""dvc.yaml's code dependencies cannot drift: every ctharden module a stage's command imports is
covered by one of that stage's ``deps`` (a file, or a package directory above it).

Each stage module is imported in a fresh interpreter together with the CLI (what ``ctharden stage
...`` loads), so the set of modules is exactly what the command runs; no function-level import of
ctharden code hides a dependency (those are hoisted to module level, see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

PKG = REPO / "src" / "ctharden"


def _stages() -> dict[str, tuple[str, list[str]]]:
    """``{dvc stage name: (ctharden.stages module, code deps)}``; ``foreach`` stages once (their
    deps do not depend on the item, except data paths, which are not code)."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in spec.items():
        body = stage.get("do", stage)
        m = re.match(r"ctharden (?:stage )?(\w+)", body["cmd"])
        assert m, f"{name}: cmd {body['cmd']!r} is not a ctharden stage command"
        deps = [d for d in body.get("deps", []) if str(d).startswith("src/")]
        out[name] = (f"ctharden.stages.{m.group(1)}", deps)
    return out


STAGES = _stages()


def _loaded_files(module: str) -> list[Path]:
    """Source files of every ctharden module loaded by importing the CLI and ``module``."""
    code = ("import json, sys, ctharden.cli, importlib; importlib.import_module(sys.argv[1]); "
            "print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items() "
            "if n.split('.')[0] == 'ctharden' and getattr(m, '__file__', None))))")
    r = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, cwd=REPO,
                       timeout=600)  # a hang guard: the import takes ~10 s on a 2-core machine
    assert r.returncode == 0, r.stderr[-3000:]
    return [Path(f).resolve() for f in json.loads(r.stdout)]


def test_every_stage_runs_a_stage_module() -> None:
    assert {mod for mod, _ in STAGES.values()} >= {f"ctharden.stages.{s}" for s in (
        "ingest", "validate", "train", "evaluate", "tune", "harden", "gate", "register")}
    for name, (mod, deps) in STAGES.items():
        assert (PKG / "stages" / f"{mod.rsplit('.', 1)[1]}.py").is_file(), f"{name}: {mod} does not exist"
        missing = [d for d in deps if not (REPO / d).exists()]
        assert not missing, f"{name}: deps that do not exist: {missing}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_cover_every_imported_module(stage: str) -> None:
    module, deps = STAGES[stage]
    roots = [(REPO / d).resolve() for d in deps]
    uncovered = [f.relative_to(REPO).as_posix() for f in _loaded_files(module)
                 if not any(f == r or r in f.parents for r in roots)]
    assert not uncovered, (f"dvc.yaml stage {stage!r} ({module}) imports modules that none of its deps covers: "
                           f"{uncovered}; add their package to the stage's deps")
