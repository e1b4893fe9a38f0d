"""Where the main job's time goes: seconds per stage and job of the last run, and each one's share.

Two sources:

- the stages' own records (default): ``metrics/train/<job>.json`` (``seconds``: every fold),
  ``metrics/robustness.json`` and ``metrics/robustness_hardened.json`` (``<job>.seconds``: the
  evaluation units, by group), ``metrics/tune/<job>.json`` and ``metrics/harden/<job>.json``
  (``seconds``). Ingest, validate, gate and register keep no time (seconds at most);
- ``--log FILE``: a ``make run`` / ``dvc repro`` log whose lines start with a wall-clock time
  ``HH:MM:SS`` (``make run 2>&1 | ts '%H:%M:%S'``): the wall time between consecutive
  ``Running stage '...'`` lines, the last one ending at the log's last line. This one counts
  everything (loading, reports, MLflow) and is what a user waits for.

    python benchmarks/pipeline.py                      # the records of the run in this checkout
    python benchmarks/pipeline.py --log run.log        # wall time per DVC stage from a timestamped log

Run from the repository root after ``make run``. Absolute times drift on shared machines; shares
are what to compare between runs. Not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ctharden.config.jobs import job_names  # noqa: E402
from ctharden.config.params import load_params  # noqa: E402
from ctharden.config.paths import evaluation_paths, harden_paths, train_paths, tune_paths  # noqa: E402

STAGE_LINE = re.compile(r"^(\d\d:\d\d:\d\d) .*Running stage '([^']+)'")
TIME_LINE = re.compile(r"^(\d\d:\d\d:\d\d) ")


def _seconds(path: Path) -> float | None:
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("seconds")
    return float(value) if value is not None else None


def from_records(params: dict[str, Any]) -> list[tuple[str, str, float]]:
    """``(stage, job, seconds)`` from the stages' records (module docstring)."""
    rows: list[tuple[str, str, float]] = []
    jobs = job_names(params)
    for job in jobs:
        s = _seconds(train_paths(params, job)["metrics"])
        if s is not None:
            rows.append(("train", job, s))
    for stage, variant in (("evaluate", "baseline"), ("evaluate_hardened", "hardened")):
        path = evaluation_paths(params, variant)["metrics"]
        results = json.loads(path.read_text()) if path.is_file() else {}
        for job in jobs:
            if job in results:
                rows.append((stage, job, float(results[job]["seconds"]["total"])))
        if stage == "evaluate":
            for job in jobs:
                s = _seconds(tune_paths(params, job)["metrics"])
                if s is not None:
                    rows.append(("tune", job, s))
            for job in jobs:
                s = _seconds(harden_paths(params, job)["metrics"])
                if s is not None:
                    rows.append(("harden", job, s))
    order = {"train": 0, "evaluate": 1, "tune": 2, "harden": 3, "evaluate_hardened": 4}
    return sorted(rows, key=lambda r: order[r[0]])


def from_log(path: Path) -> list[tuple[str, str, float]]:
    """``(stage, job, wall seconds)`` per DVC stage from a timestamped log (module docstring)."""
    starts: list[tuple[dt.datetime, str]] = []
    last: dt.datetime | None = None
    day = dt.timedelta(days=1)
    for line in path.read_text(errors="replace").splitlines():
        m = TIME_LINE.match(line)
        if not m:
            continue
        t = dt.datetime.strptime(m.group(1), "%H:%M:%S")
        while last is not None and t < last - dt.timedelta(hours=12):  # past midnight
            t += day
        last = t
        s = STAGE_LINE.match(line)
        if s:
            starts.append((t, s.group(2)))
    if last is None:
        raise SystemExit(f"{path}: no line starts with a HH:MM:SS time")
    rows = []
    for (t0, name), (t1, _) in zip(starts, [*starts[1:], (last, "")], strict=True):
        stage, _, job = name.partition("@")
        rows.append((stage, job, (t1 - t0).total_seconds()))
    return rows


def table(rows: list[tuple[str, str, float]]) -> str:
    """Markdown: per stage and job the seconds and the share of the total, then per stage."""
    total = sum(s for _, _, s in rows) or 1.0
    lines = ["| stage | job | seconds | share |", "|---|---|---|---|"]
    lines += [f"| {stage} | {job} | {s:.0f} | {100 * s / total:.1f} % |" for stage, job, s in rows]
    per_stage: dict[str, float] = {}
    for stage, _, s in rows:
        per_stage[stage] = per_stage.get(stage, 0.0) + s
    lines += ["", "| stage | seconds | share |", "|---|---|---|"]
    lines += [f"| {stage} | {s:.0f} | {100 * s / total:.1f} % |" for stage, s in per_stage.items()]
    lines += [f"| **total** | {total:.0f} ({total / 60:.1f} min) | 100 % |"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--log", type=Path, default=None, help="a timestamped make run / dvc repro log")
    args = ap.parse_args()
    rows = from_log(args.log) if args.log else from_records(load_params(args.params, args.profile))
    if not rows:
        raise SystemExit("no stage records found: run `make run` first (or give --log)")
    print(table(rows))


if __name__ == "__main__":
    main()
