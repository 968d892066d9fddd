"""The formats that cross a language boundary: each is written here and nowhere else.

The batch template and the playbooks receive them through the plan's `formats` entry (`BatchFormats`);
the monitor, the local runner and the training loop import them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# ---- schema versions of the JSON files a run leaves behind ---------------------------------------------------------
PLAN_SCHEMA = 2         # plan.json (beside the rendered scripts); 2: scene_ids, chunks, estimates
CONFIG_SCHEMA = 2       # config.json (the frozen config a batch job reads); 2: tiles (a list), scene ids in dates
RUN_RECORD_SCHEMA = 1   # runs/<run_id>.json (absent in records written before versions: read as 0)
SCHEMA_KEY = "schema"

# ---- run ids: a folder name on the laptop and on the cluster, so never a path -------------------------------------
RUN_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"


def run_id_problem(run_id: str) -> str | None:
    """Why `run_id` cannot name a run (None when it can): no `/`, no leading `.` or `-`, at most 100 characters."""
    if re.fullmatch(RUN_ID_PATTERN, run_id):
        return None
    return (f"run id {run_id!r} is not allowed: use letters, digits, '.', '_' and '-' (not first), at most 100 "
            f"characters, e.g. -e run_id=snow-2021-v2")


# ---- exit codes ---------------------------------------------------------------------------------------------------
EXIT_OK = 0
EXIT_FAILED = 1         # a user error (SnowpipeError) or a failed stage
EXIT_CONFIG = 2         # the config or a command line is invalid
EXIT_OUTPUT = 74        # EX_IOERR: an output cannot be written (full disk, read-only folder)
EXIT_RETRY = 75         # EX_TEMPFAIL: try again later; a batch script requeues the job (checkpoint saved, lock busy)
EXIT_INTERRUPTED = 130  # Ctrl-C
CANCELLED_CODES = (130, 143)  # the stage ended on SIGINT / SIGTERM (scancel)

# ---- log names (sbatch --output patterns, expanded as SLURM expands them) -----------------------------------------
LOG_FOLDER = "logs"
JOB_LOG = "%x-%j.out"           # job name, job id
ARRAY_TASK_LOG = "%x-%A_%a.out"  # job name, array job id, task index
NO_ARRAY_TASK = 4294967294      # what SLURM puts for %a outside an array (NO_VAL - 1)


def log_pattern(run_dir: str, array: bool) -> str:
    """The --output of a job of the run: one file per job, or per array task."""
    return f"{run_dir}/{LOG_FOLDER}/{ARRAY_TASK_LOG if array else JOB_LOG}"


def expand_log(pattern: str, name: str, job_id: str | int, array_job_id: str | int | None = None,
               task: int | None = None) -> str:
    """The file an --output pattern names for one task (%x name, %j job id, %A array job id, %a task index)."""
    text = pattern.replace("%x", name).replace("%j", str(job_id))
    text = text.replace("%A", str(array_job_id if array_job_id is not None else job_id))
    return text.replace("%a", str(task if task is not None else NO_ARRAY_TASK))


# ---- exit markers: `logs/<job>-<task tag>.exit`, one JSON line written by the batch script's cleanup --------------
EXIT_MARKER_SUFFIX = ".exit"
EXIT_MARKER_GLOB = f"*{EXIT_MARKER_SUFFIX}"
# printf format the template fills with: job, task tag, exit code, node, end time (bash `printf`, so `%d` is checked).
EXIT_MARKER_PRINTF = '{"job": "%s", "task": "%s", "exit_code": %d, "node": "%s", "end": "%s"}\\n'


@dataclass(frozen=True)
class ExitMarker:
    """How one task ended, in the batch script's own words (kept after SLURM forgets the job)."""

    job: str
    task: str        # the task tag: `<job id>` or `<array job id>_<index>`
    exit_code: int
    node: str = ""
    end: str = ""

    @property
    def state(self) -> str:
        """The SLURM-style state this exit code means."""
        if self.exit_code == EXIT_OK:
            return "COMPLETED"
        return "CANCELLED" if self.exit_code in CANCELLED_CODES else "FAILED"


def exit_marker_name(job: str, task_tag: str) -> str:
    return f"{job}-{task_tag}{EXIT_MARKER_SUFFIX}"


def exit_marker_path(run_dir: str, job: str, task_tag: str) -> str:
    return f"{run_dir}/{LOG_FOLDER}/{exit_marker_name(job, task_tag)}"


def parse_exit_marker(line: str) -> ExitMarker | None:
    """One marker line; None for a torn or foreign line (a marker is renamed into place, but be lenient)."""
    try:
        data = json.loads(line)
        return ExitMarker(job=str(data["job"]), task=str(data["task"]), exit_code=int(data["exit_code"]),
                          node=str(data.get("node", "")), end=str(data.get("end", "")))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


def read_exit_markers(folder: Path) -> list[ExitMarker]:
    """Every readable marker in a local logs folder (local runs, tests)."""
    found = [parse_exit_marker(path.read_text()) for path in sorted(folder.glob(EXIT_MARKER_GLOB))]
    return [marker for marker in found if marker is not None]


# ---- requeue progress ----------------------------------------------------------------------------------------------
# The batch script names a file in this variable; a stage that saves resumable state writes how far it got there
# ("epoch E step S"). The script requeues a job only when that changed since its last requeue.
PROGRESS_FILE_ENV = "SNOWPIPE_PROGRESS_FILE"


# ---- job dependencies ----------------------------------------------------------------------------------------------
DEPENDENCY_FLAG = "--dependency="
DEPENDENCY_ALL = "afterok:"  # the whole job (every array task) ended well
DEPENDENCY_EACH = "aftercorr:"  # array task i starts once task i of that array ended well
DEPENDENCY_SEPARATOR = ":"
DEPENDENCY_JOIN = ","  # both conditions must hold
DEPENDENCY_EXTRA = ("--kill-on-invalid-dep=yes",)  # a failed dependency cancels the job instead of leaving it pending


def dependency_args(job_ids: list[str], each_ids: list[str] | None = None) -> list[str]:
    """sbatch arguments that start a job only after all of `job_ids` ended well, and each of its array tasks
    after the same task of every array in `each_ids`; a failed one cancels it (or the task)."""
    conditions = []
    if job_ids:
        conditions.append(DEPENDENCY_ALL + DEPENDENCY_SEPARATOR.join(job_ids))
    if each_ids:
        conditions.append(DEPENDENCY_EACH + DEPENDENCY_SEPARATOR.join(each_ids))
    if not conditions:
        return []
    return [DEPENDENCY_FLAG + DEPENDENCY_JOIN.join(conditions), *DEPENDENCY_EXTRA]


# ---- files that belong to one machine's processes ------------------------------------------------------------------
# Never synced, staged or copied back: temporaries, the output locks of live writers and the partial folders of
# interrupted ones (pipeline/locks.py, pipeline/records/publish.py).
TEMPORARY_FILES = (".*.tmp", "*.tmp", ".snowpipe-tmp-*", "__pycache__/", ".*.lock", ".*.partial-*")
