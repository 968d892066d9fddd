"""`snowpipe status RUN` against a login node that answers sacct from a file: bench/scale.py times it.

usage: SNOWPIPE_RUNS_DIR=DIR python bench/status_replay.py RUN SACCT_OUTPUT [status options]
Everything the command does runs (start-up, the run record, parsing, the waits explained, the table) except the
SSH round trips, which bench/status_time.py measures on the embedded cluster: sacct's answer is the file's text,
squeue lists nothing (every task ended or pending in accounting), logs are empty.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.monitor import ssh
from pipeline.monitor.ssh import Result


class Replay:
    """What ClusterConnection offers the status command, answered from captured sacct output."""

    sacct = ""

    def __init__(self, record: object) -> None:
        self.record = record

    def run(self, argv: list[str], timeout: float = 120.0) -> Result:
        return Result(0, self.sacct if argv[0] == "sacct" else "", "")

    def close(self) -> None:
        pass

    def __enter__(self) -> Replay:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def main(argv: list[str]) -> int:
    run_id, sacct = argv[0], Path(argv[1])
    Replay.sacct = sacct.read_text()
    ssh.ClusterConnection = Replay  # type: ignore[misc,assignment]
    from pipeline.cli import main as snowpipe

    return snowpipe(["status", run_id, *argv[2:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
