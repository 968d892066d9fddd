"""Fault injection for tests: die at an exact write, without timing games.

`SNOWPIPE_KILL_AT=POINT` (or `POINT:N` for the N-th time) makes the process SIGKILL itself when it
reaches POINT (`SNOWPIPE_KILL_SIGNAL=TERM` sends SIGTERM instead, as scancel does). Writers announce a
point each time they publish a file (`published NAME`, after the rename) or a folder (`swapped NAME`);
locks announce `took .NAME.lock` and `releasing .NAME.lock`, a failed build `discarding NAME`.
Unset, this costs one dict look-up.
See docs/reliability.md for the faults the test suite injects this way.
"""

from __future__ import annotations

import os
import signal

ENV = "SNOWPIPE_KILL_AT"
SIGNAL_ENV = "SNOWPIPE_KILL_SIGNAL"
_seen: dict[str, int] = {}


def reached(point: str) -> None:
    """Kill this process now if SNOWPIPE_KILL_AT names this point (and this is its N-th arrival)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, nth = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "1")
    if name != point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] >= int(nth):
        os.kill(os.getpid(), getattr(signal, f"SIG{os.environ.get(SIGNAL_ENV, 'KILL')}"))
