"""Scheduled Prefect deployments of the ctharden flows.

Two deployments, both in UTC:

- ``reevaluate-champion/nightly-champion-reevaluation`` (default cron ``0 2 * * *``): ingest +
  validate the current data, then evaluate and gate every job's registered ``champion``
  (:func:`ctharden.flows.pipeline.reevaluate_champion`); each champion version is tagged with the
  verdict and the flow fails if a champion no longer passes its gate;
- ``harden-pipeline/weekly-rehardening`` (default cron ``0 3 * * 0``, Sundays): the whole harden
  pipeline (:func:`ctharden.flows.pipeline.harden_pipeline`), which registers a new version only if
  it passes the gate and promotes it to ``champion`` only if it beats the current one.

Serve them from one long-running process (it is its own worker; needs a Prefect server, see
``PREFECT_API_URL``)::

    python flows/serve.py --profile smoke
    prefect deployment run 'reevaluate-champion/nightly-champion-reevaluation'

The same two deployments for a work-pool-based worker are in ``prefect.yaml`` at the repository
root (``prefect deploy --all`` then ``prefect worker start --pool ctharden-process``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ctharden.flows.pipeline import harden_pipeline, reevaluate_champion

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

NIGHTLY_NAME = "nightly-champion-reevaluation"
WEEKLY_NAME = "weekly-rehardening"
NIGHTLY_CRON = "0 2 * * *"  # every day at 02:00
WEEKLY_CRON = "0 3 * * 0"  # Sundays at 03:00
TIMEZONE = "UTC"
TAGS = ["ctharden"]


def deployment_parameters(
    profile: str | None = None, params_path: str = "params.yaml", overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """The flow parameters both deployments share. ``params_path`` is made absolute, so a flow run
    does not depend on the serving process's working directory."""
    return {"profile": profile, "params_path": str(Path(params_path).resolve()), "overrides": list(overrides)}


def deployments(
    profile: str | None = None,
    params_path: str = "params.yaml",
    nightly_cron: str = NIGHTLY_CRON,
    weekly_cron: str = WEEKLY_CRON,
    *,
    overrides: Sequence[str] = (),
    timezone: str = TIMEZONE,
    jobs: Sequence[str] | None = None,
) -> list[RunnerDeployment]:
    """The nightly champion re-evaluation and the weekly re-hardening as ``RunnerDeployment``s.

    ``profile``, ``params_path`` and ``overrides`` (``key=value`` params overrides) become the
    default parameters of both deployments (a run may override them); ``jobs`` restricts the
    nightly re-evaluation (default: every training job). Cron strings are evaluated in
    ``timezone``. The flows are referenced by module path (``ctharden.flows.pipeline``), so
    whoever runs them only needs the package installed."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    base = deployment_parameters(profile, params_path, overrides)
    label = profile or "params default"
    nightly = reevaluate_champion.to_deployment(
        name=NIGHTLY_NAME,
        schedules=[Cron(nightly_cron, timezone=timezone)],
        parameters={**base, "jobs": list(jobs) if jobs else None},
        tags=[*TAGS, "nightly", "champion"],
        description=(f"Nightly ({nightly_cron}, {timezone}): ingest + validate the current data, then "
                     f"evaluate and gate every job's registered champion (profile {label}); tags each "
                     "champion version with the verdict and fails if a champion no longer passes the gate."),
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    weekly = harden_pipeline.to_deployment(
        name=WEEKLY_NAME,
        schedules=[Cron(weekly_cron, timezone=timezone)],
        parameters=base,
        tags=[*TAGS, "weekly", "harden"],
        description=(f"Weekly ({weekly_cron}, {timezone}): the whole harden pipeline (profile {label}); "
                     "registers models that pass the gate and promotes a new champion only if it beats "
                     "the current one."),
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    # to_deployment is typed for both sync and async callers (RunnerDeployment | Coroutine); called
    # outside an event loop it returns the RunnerDeployment itself
    return [cast("RunnerDeployment", nightly), cast("RunnerDeployment", weekly)]


def serve_deployments(
    profile: str | None = None,
    params_path: str = "params.yaml",
    nightly_cron: str = NIGHTLY_CRON,
    weekly_cron: str = WEEKLY_CRON,
    *,
    overrides: Sequence[str] = (),
    timezone: str = TIMEZONE,
    jobs: Sequence[str] | None = None,
    limit: int | None = 1,
) -> None:
    """Register both deployments with the Prefect server (``PREFECT_API_URL``) and serve them:
    a long-running process that starts their scheduled and manually triggered runs as
    subprocesses, at most ``limit`` at a time (default 1: every run uses every core)."""
    from prefect import serve

    serve(*deployments(profile, params_path, nightly_cron, weekly_cron, overrides=overrides,
                       timezone=timezone, jobs=jobs), limit=limit)
