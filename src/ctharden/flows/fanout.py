"""Fan-out of CV-fold training and of the robustness evaluation as many Prefect tasks, which the
flow's task runner places: one thread (``serial``) or the workers of a Dask cluster (``dask``).

Inside a flow body::

    @flow(task_runner=task_runner("dask", n_workers=2))
    def f(params):
        summary = train_fanout(params, "nodule3d")     # == run_training_job(params, "nodule3d")
        return evaluate_fanout(params)                  # == run_evaluation(params)

Same results as the serial functions, same files: a fold is :func:`ctharden.stages.train.train_one_fold`
(seeded by ``init_seed(seed, k)``), an evaluation unit is :func:`ctharden.evaluation.units.run_unit`
(seeded from ``(seed, unit)``), and the serial writers (:func:`ctharden.stages.train.finish_training`,
:func:`ctharden.stages.evaluate.write_evaluation`) run in the flow's process. Each task loads its
job's models and data from ``params`` itself (files on a shared disk; nothing large goes through
the scheduler); a unit's result (metrics, small tensors) comes back.

Threads: CPU results of the attacks depend on torch's intra-op thread count (measured: the smoke
evaluation with 1 and with 2 threads differs in the PGD sanity curves), and Dask's nanny starts
workers with ``OMP_NUM_THREADS=1``. So every evaluation unit runs with the flow process's
``torch.get_num_threads()`` (what the serial evaluation in that process would use), and a fold
sets its threads from ``train.*.threads`` (``auto``: the CPUs of the process) exactly as the serial
training does; on workers with another CPU count, fix ``train.defaults.threads`` for identical
weights. ``threads_per_worker`` is only Dask's task slots per worker.

Worker environment: Dask's nanny spawns workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which
disables glibc's dynamic mmap threshold and doubles the time of the attacks (measured: a covid2d
PGD unit 8.2 s -> 16.4 s); :class:`FanoutDaskTaskRunner` leaves it out.

Prefect API in the workers: a task on a Dask worker reports its state to the Prefect API of the
flow. The flow's settings travel with each task (including ``PREFECT_API_URL`` when set, as under
``prefect_test_harness``), but when the flow runs on Prefect's temporary server a worker process
started without ``PREFECT_API_URL`` starts a temporary server of its own (measured: ~15 s per
worker, and its task runs land there, not in the flow's API). :class:`FanoutDaskTaskRunner`
therefore exports the flow's API URL (the configured one, or the temporary server's) into
``os.environ`` before its LocalCluster spawns the workers, and restores the environment when the
flow ends. Workers of an existing scheduler (``address``) are not spawned by the flow: start them
with ``PREFECT_API_URL`` pointing at a Prefect server they can reach, and with the same ``paths``
(shared disk) and MLflow store.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask.task_runners import DaskTaskRunner  # prefect_dask's __init__ does not re-export it

from ctharden.config.paths import evaluation_paths, train_paths
from ctharden.core.errors import ConfigError
from ctharden.evaluation.units import EvalUnit, UnitResult, assemble, evaluation_units, run_unit
from ctharden.flows.retry import transient
from ctharden.stages import evaluate as evaluate_stage
from ctharden.stages import train as train_stage
from ctharden.stages.evaluate import evaluation_plan, finish_job, prepare_job, write_evaluation
from ctharden.stages.result import EvaluateResult, TrainResult
from ctharden.stages.train import FoldRecord, TrainJob, run_training, train_one_fold

RUNNERS = ("serial", "dask")
_SUBMIT_ORDER = {"pgd": 0, "optimized_nps": 1, "examples": 2, "random_nps": 3, "clean": 4}  # longest first


class FanoutDaskTaskRunner(DaskTaskRunner):
    """:class:`prefect_dask.DaskTaskRunner` whose LocalCluster workers get the flow's Prefect API
    URL and glibc's default allocator settings (see the module docstring); the flow process's
    environment is restored when the flow ends."""

    def __enter__(self) -> FanoutDaskTaskRunner:
        self._restore = contextlib.ExitStack()
        if self.address is None:
            self._restore.enter_context(_worker_environment())
        super().__enter__()  # type: ignore[no-untyped-call]  # prefect_dask's __enter__ is unannotated
        return self

    def __exit__(self, *args: Any) -> None:
        try:
            super().__exit__(*args)
        finally:
            self._restore.close()


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    """For worker processes spawned in the block: ``PREFECT_API_URL`` exported and Dask's
    ``MALLOC_TRIM_THRESHOLD_`` left out (a fixed trim threshold turns off glibc's dynamic mmap
    threshold; every large tensor is then a fresh mmap, and a PGD unit takes twice as long).
    Afterwards the variables that the block or Dask's nanny set here are restored."""
    import dask

    spawn_key = "distributed.nanny.pre-spawn-environ"
    keys = ["PREFECT_API_URL", *dask.config.get(spawn_key)]
    saved = {k: os.environ.get(k) for k in keys}
    if saved["PREFECT_API_URL"] is None:
        url = _current_api_url()
        if url:
            os.environ["PREFECT_API_URL"] = url
    try:
        with dask.config.set({f"{spawn_key}.MALLOC_TRIM_THRESHOLD_": None}):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _current_api_url() -> str | None:
    """The Prefect API this process talks to: the configured URL, else the temporary server's."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        return str(url)
    return str(get_client(sync_client=True).api_url).rstrip("/") or None


def task_runner(runner: str, *, address: str | None = None, n_workers: int | None = None,
                threads_per_worker: int = 1) -> Any:
    """The flow's task runner: ``serial`` (one thread) or ``dask`` (the scheduler at ``address``,
    else a LocalCluster of ``n_workers`` processes, default one per core, with
    ``threads_per_worker`` task slots each)."""
    if runner == "serial":
        return ThreadPoolTaskRunner(max_workers=1)
    if runner == "dask":
        if address:
            return FanoutDaskTaskRunner(address=address)
        kwargs: dict[str, Any] = {"threads_per_worker": int(threads_per_worker), "processes": True}
        if n_workers is not None:
            kwargs["n_workers"] = int(n_workers)
        return FanoutDaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)
    raise ConfigError(f"unknown task runner {runner!r} (choose from {list(RUNNERS)})")


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (unchanged when None)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@task(name="evaluate-unit", retries=2, retry_delay_seconds=2, retry_condition_fn=transient, cache_policy=NO_CACHE,
      task_run_name="evaluate-{job}-{unit.name}")
def evaluation_unit_task(params: dict[str, Any], job: str, variant: str, unit: EvalUnit,
                         threads: int | None = None) -> UnitResult:
    """One evaluation unit of ``job``; loads the job's models and data from ``params``. ``threads``:
    torch's intra-op threads for the unit (results depend on it; None: the worker's)."""

    ctx = prepare_job(params, job, variant)
    with _torch_threads(threads):
        return run_unit(unit, ctx.models, ctx.data, ctx.settings, seed=ctx.seed, nps=ctx.nps)


@task(name="train-fold", retries=2, retry_delay_seconds=2, retry_condition_fn=transient, cache_policy=NO_CACHE,
      task_run_name="train-{job}-fold{fold}")
def train_fold_task(params: dict[str, Any], job: str, fold: int, parent_run_id: str) -> FoldRecord:
    """Train one CV fold (see :func:`ctharden.stages.train.train_one_fold`), nested under the job's
    MLflow run ``parent_run_id``."""
    return train_one_fold(params, job, fold, parent_run_id)


def train_fanout(params: dict[str, Any], job: str) -> TrainResult:
    """:func:`ctharden.stages.train.run` with one task per fold; call inside a flow. Returns the
    same result and writes the same files."""
    def fan_out(ctx: TrainJob) -> list[FoldRecord]:
        futures = [train_fold_task.submit(params, job, k, ctx.run_id) for k in ctx.folds]
        wait(futures)  # every fold has ended before the parent run may end
        return [f.result() for f in futures]

    return TrainResult(train_stage.STAGE, job, run_training(params, job, fan_out), train_paths(params, job)["metrics"])


def evaluate_fanout(params: dict[str, Any], variant: str = "baseline", jobs: list[str] | None = None, *,
                    log_mlflow: bool = True) -> EvaluateResult:
    """:func:`ctharden.stages.evaluate.run` with one task per evaluation unit (every job's units
    submitted at once, the usually longest kinds first: PGD, optimised NPS); call inside a flow.
    Returns the same result, writes the same files."""

    names, baselines = evaluation_plan(params, jobs, variant)
    contexts = {job: prepare_job(params, job, variant) for job in names}
    threads = torch.get_num_threads()
    todo = {job: evaluation_units(ctx.settings, len(ctx.models)) for job, ctx in contexts.items()}
    queue = sorted(((job, u) for job, units in todo.items() for u in units), key=lambda ju: _SUBMIT_ORDER[ju[1].kind])
    futures = {(job, u): evaluation_unit_task.submit(params, job, variant, u, threads) for job, u in queue}
    wait(list(futures.values()))
    evaluated = {}
    for job, ctx in contexts.items():
        partials = [futures[job, u].result() for u in todo[job]]
        result, visuals = assemble(todo[job], partials, ctx.settings, len(ctx.models))
        evaluated[job] = (finish_job(ctx, result), visuals, ctx.model)
    out = write_evaluation(params, evaluated, variant=variant, jobs=jobs, log_mlflow=log_mlflow, baselines=baselines)
    return EvaluateResult(evaluate_stage.STAGE[variant], variant, out["metrics"],
                          evaluation_paths(params, variant)["metrics"], out["report"])
