"""The plan learns from finished runs: a stage's measured minutes per task on the same cluster correct the cost
model's estimate of it.

`snowpipe report RUN` writes `runs/RUN/results/report.json`, whose stages carry the plan's estimated minutes per
task (kept in the run record at submission) and, where every task of the stage ended COMPLETED, the measured mean.
Their ratio is the stage's correction on that cluster: the next plan for the same inventory host multiplies the
cost model's minutes by it and names the run it came from (`jobs[].estimate.source`). The newest run with a
report that measured the stage wins; without one the estimate stays the cost model's ("cost model"). A ratio
carries what the benchmark machines cannot know (the cluster's CPUs and GPUs, its file system, the scenes' real
content) to scenes of other sizes, since the model's per-megapixel shape stays. See docs/architecture.md ("The
cost of a run").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.contract.run_record import UnreadableRecord, read_run_record

REPORT_FILE = Path("results") / "report.json"  # pipeline/monitor/report.py writes it under runs/RUN/
FACTOR_RANGE = (0.02, 50.0)  # a ratio outside it is a measurement gone wrong (a clock, an empty task), not a cluster


@dataclass(frozen=True)
class Measured:
    """One stage's correction: measured / estimated minutes per task in run `run_id`."""

    run_id: str
    factor: float

    @property
    def source(self) -> str:
        return f"run {self.run_id} (measured x{self.factor:.2g} of the cost model)"


def runs_dir(repo_root: Path) -> Path:
    """Where run records are kept (as pipeline/monitor/runs.py reads them)."""
    return Path(os.environ.get("SNOWPIPE_RUNS_DIR") or repo_root / "runs")


def measured_factors(repo_root: Path, host: str) -> dict[str, Measured]:
    """Per stage job name, the correction from the newest run on `host` whose report measured it."""
    folder = runs_dir(repo_root)
    runs = []
    for path in folder.glob("*.json"):
        try:
            record = read_run_record(path)
        except (OSError, UnreadableRecord):
            continue
        if record.host == host:
            runs.append((record.submitted, record.run_id))
    found: dict[str, Measured] = {}
    for _, run_id in sorted(runs, reverse=True):
        for name, factor in _stage_factors(folder / run_id / REPORT_FILE).items():
            found.setdefault(name, Measured(run_id, factor))
    return found


def _stage_factors(report_path: Path) -> dict[str, float]:
    """measured / estimated minutes per task of each stage the report measured (all tasks COMPLETED)."""
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(report, dict) or report.get("source") != "sacct":
        return {}
    factors = {}
    for stage in report.get("stages") or []:
        if not isinstance(stage, dict):
            continue
        measured, estimated = stage.get("measured_minutes_per_task"), stage.get("estimated_minutes_per_task")
        if isinstance(measured, (int, float)) and isinstance(estimated, (int, float)) and estimated > 0:
            factor = measured / estimated
            if FACTOR_RANGE[0] <= factor <= FACTOR_RANGE[1]:
                factors[str(stage.get("name"))] = round(factor, 4)
    return factors
