"""When a Prefect task may be retried: only for errors a retry can fix."""

from __future__ import annotations

from typing import Any

from ctharden.core.errors import CthardenError


def transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry only errors that a retry can fix (I/O), never bad input (a ``retry_condition_fn``)."""
    try:
        state.result()
    except CthardenError:
        return False
    except OSError:
        return True
    except Exception:  # noqa: BLE001 - anything else is a bug: do not retry
        return False
    return False
