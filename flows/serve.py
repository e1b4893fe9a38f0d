"""Serve the scheduled ctharden deployments (entry point; see :mod:`ctharden.flows.deployments`).

A long-running process that registers the nightly champion re-evaluation and the weekly
re-hardening with the Prefect server at ``PREFECT_API_URL`` and runs them (it is its own worker):

    prefect server start --host 127.0.0.1 --port 4200          # another terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python flows/serve.py --profile smoke
    prefect deployment run 'reevaluate-champion/nightly-champion-reevaluation'
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ctharden.flows.deployments import NIGHTLY_CRON, TIMEZONE, WEEKLY_CRON, serve_deployments


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Serve the nightly champion re-evaluation and the weekly re-hardening.")
    parser.add_argument("--profile", default=None,
                        help="params.yaml profile (default: CTHARDEN_PROFILE or the file's)")
    parser.add_argument("--params", default="params.yaml", help="params file (made absolute)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="params override passed to both flows (repeatable)")
    parser.add_argument("--nightly-cron", default=NIGHTLY_CRON,
                        help=f"champion re-evaluation (default {NIGHTLY_CRON!r})")
    parser.add_argument("--weekly-cron", default=WEEKLY_CRON, help=f"re-hardening (default {WEEKLY_CRON!r})")
    parser.add_argument("--timezone", default=TIMEZONE,
                        help=f"time zone of the cron schedules (default {TIMEZONE})")
    parser.add_argument("--job", action="append", default=None, dest="jobs",
                        help="re-evaluate only this job's champion (repeatable; default every job)")
    parser.add_argument("--limit", type=int, default=1, help="flow runs at a time (default 1)")
    args = parser.parse_args(argv)
    serve_deployments(args.profile, args.params, args.nightly_cron, args.weekly_cron,
                      overrides=args.overrides, timezone=args.timezone, jobs=args.jobs, limit=args.limit)


if __name__ == "__main__":
    main()
