"""Compare every key of ``metrics/**/*.json`` between two pipeline runs, timings and run ids aside.

    python tools/compare_metrics.py REV [DIR]     # REV: a git revision of this repository (its
                                                  # committed metrics); DIR: a checkout whose
                                                  # metrics/ to compare (default: this one)

Prints each differing key (file, JSON path, before, after) and exits 1 if any differs. What is
ignored: wall-clock times (keys named ``seconds``/``*_seconds``/``*_s``), MLflow run, experiment and
model-version identifiers, tracking URIs, timestamps, and absolute paths (compared relative to
their checkout). Used to show that a refactor leaves every number of the default run unchanged.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

IGNORED_KEYS = re.compile(r"^(seconds|.*_seconds|.*_s|run_id|mlflow_run_id|experiment_id|tracking_uri|"
                          r"baseline_run_id|reevaluated_at|registered_at|timestamp)$")


def committed(rev: str, repo: Path) -> dict[str, Any]:
    """``{path: parsed JSON}`` of every ``metrics/**/*.json`` at ``rev``."""
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "metrics"], cwd=repo, check=True,
                           capture_output=True, text=True).stdout.split()
    out = {}
    for name in names:
        if name.endswith(".json"):
            text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=repo, check=True, capture_output=True,
                                  text=True).stdout
            out[name] = json.loads(text)
    return out


def on_disk(root: Path) -> dict[str, Any]:
    files = sorted((root / "metrics").rglob("*.json"))
    return {p.relative_to(root).as_posix(): json.loads(p.read_text()) for p in files}


def _norm(value: Any, root: str) -> Any:
    if isinstance(value, str) and root and value.startswith(root):
        return value[len(root):].lstrip("/")
    return value


def diff(a: Any, b: Any, where: str, roots: tuple[str, str], out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if IGNORED_KEYS.match(str(k)):
                continue
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'after' if k not in a else 'before'}")
                continue
            diff(a[k], b[k], f"{where}.{k}", roots, out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} items before, {len(b)} after")
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diff(x, y, f"{where}[{i}]", roots, out)
    elif _norm(a, roots[0]) != _norm(b, roots[1]):
        out.append(f"{where}: {a!r} -> {b!r}")


def main(argv: list[str]) -> int:
    repo = Path(__file__).resolve().parents[1]
    rev = argv[0]
    root = Path(argv[1]).resolve() if len(argv) > 1 else repo
    before, after = committed(rev, repo), on_disk(root)
    out: list[str] = []
    for name in sorted(set(before) | set(after)):
        if name not in before or name not in after:
            out.append(f"{name}: only {'after' if name not in before else 'before'}")
            continue
        diff(before[name], after[name], name, (str(repo), str(root)), out)
    for line in out:
        print(line)
    print(f"{len(before)} metric files at {rev}, {len(after)} in {root}: {len(out)} difference(s)")
    return 1 if out else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
