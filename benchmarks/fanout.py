"""Robustness evaluation: serial (:func:`ctharden.stages.evaluate.run_evaluation`) vs fanned out
over a Dask LocalCluster (:func:`ctharden.flows.fanout.evaluate_fanout`), same jobs, same process.

Setup (untimed): ingest, validate and train the jobs (serially) in a work directory. Then the
serial evaluation, then a Prefect flow on a LocalCluster of ``--workers`` processes (one task slot
each): one warm-up unit per worker (cluster start-up, imports), then the timed fan-out. Prints
both times, their ratio, the cluster start-up and whether the metrics are identical (they must
be: every unit runs with this process's torch thread count). MLflow logging is off in both.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/fanout.py                    # smoke jobs (~2-3 min on 2 cores)
    python benchmarks/fanout.py --profile default --jobs covid2d --workers 4
    python benchmarks/fanout.py --workdir /tmp/fanout-bench                # keep (and reuse) the trained jobs
    python benchmarks/fanout.py --threads 1          # 1 torch thread per evaluation: the fan-out's scaling

Units run with the same torch thread count as the serial evaluation (results depend on it), so
with the default count (all cores) the serial run already uses every core and the gain on one
machine is what the small units leave idle (smoke, 2 cores: ~1.2x; ``--threads 1``: ~1.4x); it
grows with more cores than one evaluation uses, or more machines (``dask.address``).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUTPUT_PATHS = ("datasets", "validation", "metrics", "artifacts", "reports", "plots")


def bench_params(workdir: Path, profile: str, folds: int | None) -> dict[str, Any]:
    """params.yaml's ``profile`` with every output under ``workdir``."""
    from ctharden.config.params import load_params

    overrides = [f"paths.{p}={workdir / p}" for p in OUTPUT_PATHS]
    overrides += [f"mlflow.db={workdir / 'mlflow.db'}", f"mlflow.artifacts={workdir / 'mlruns'}"]
    if folds is not None:
        overrides.append(f"train.defaults.folds={folds}")
    return load_params(REPO / "params.yaml", profile, overrides)


def prepare(params: dict[str, Any], jobs: list[str]) -> None:
    """Ingest, validate and train ``jobs`` unless already trained in this work directory."""
    from ctharden.config.jobs import job_config
    from ctharden.config.paths import train_paths, validation_dir
    from ctharden.stages import ingest as ingest_stage
    from ctharden.stages import validate as validate_stage
    from ctharden.stages.train import run_training_job

    for job in jobs:
        if train_paths(params, job)["metrics"].is_file():
            continue
        ds = job_config(params, job)["dataset"]
        if not (validation_dir(params, ds) / "validation.json").is_file():
            ingest_stage.run(params, ds)
            validate_stage.run(params, ds)
        t = time.perf_counter()
        run_training_job(params, job, progress=False)
        print(f"trained {job} in {time.perf_counter() - t:.0f} s", flush=True)


def comparable(metrics: dict[str, Any]) -> Any:
    """Metrics without timings (and with the work directory's absolute paths as written)."""
    text = json.dumps(metrics, sort_keys=True)
    return re.sub(r'"seconds": \{[^}]*\}', "", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke", help="params.yaml profile (smoke | default | paper)")
    parser.add_argument("--jobs", default=None, help="comma-separated jobs (default: every training job)")
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes")
    parser.add_argument("--folds", type=int, default=2, help="CV folds to train (models: folds attacks each)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per evaluation (serial and every unit; default: torch's)")
    parser.add_argument("--workdir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()

    import torch
    from prefect import flow

    from ctharden.config.jobs import job_names
    from ctharden.evaluation.units import EvalUnit
    from ctharden.flows.fanout import evaluate_fanout, evaluation_unit_task, task_runner
    from ctharden.stages.evaluate import run_evaluation

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fanout-bench-"))
    params = bench_params(workdir, args.profile, args.folds)
    jobs = args.jobs.split(",") if args.jobs else job_names(params)
    prepare(params, jobs)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    t = time.perf_counter()
    serial = run_evaluation(params, jobs, log_mlflow=False)["metrics"]
    t_serial = time.perf_counter() - t

    @flow(name="fanout-benchmark", task_runner=task_runner("dask", n_workers=args.workers))
    def fanned() -> tuple[dict[str, Any], float, float]:
        t0 = time.perf_counter()
        warm = [evaluation_unit_task.submit(params, jobs[0], "baseline", EvalUnit("clean"), threads)
                for _ in range(args.workers)]
        [f.result() for f in warm]
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = evaluate_fanout(params, jobs=jobs, log_mlflow=False)["metrics"]
        return out, startup, time.perf_counter() - t1

    dask_metrics, t_startup, t_dask = fanned()
    same = comparable(dask_metrics) == comparable(serial)
    print(f"profile {args.profile}, jobs {jobs}, torch threads {threads}, {args.workers} Dask workers")
    print(f"serial evaluation        {t_serial:7.1f} s")
    print(f"dask evaluation (warm)   {t_dask:7.1f} s   (cluster start + warm-up {t_startup:.1f} s)")
    print(f"serial / dask            {t_serial / t_dask:7.2f}x")
    print(f"identical metrics        {same}")


if __name__ == "__main__":  # Dask's worker processes re-import this module
    main()
