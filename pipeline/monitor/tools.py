"""`snowpipe runs | status | logs | fetch | cancel`: what happened to a submitted run, from the laptop.

Each command opens one SSH connection (host keys checked) with what the run record says.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipeline.contract import formats
from pipeline.contract.run_record import RecordedJob, RunRecord
from pipeline.errors import SnowpipeError
from pipeline.monitor import jobstate, stagejobs
from pipeline.monitor.runs import RUNS_DIR, list_records, load_record, remember_state
from pipeline.progress import say
from pipeline.ssh_options import login

STATE_STYLE = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "FAILED": "red", "CANCELLED": "magenta",
               "TIMEOUT": "red", "OUT_OF_MEMORY": "red", "UNKNOWN": "dim", jobstate.SUBMITTED: "yellow"}
WATCH_FLOOR = 2.0


def _console() -> Console:
    """Tables as wide as the terminal; 140 columns when the output goes to a file or a pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=140)


def _styled(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


def status_table(record: RunRecord, rows: list[jobstate.TaskState], source: str, every_task: bool = False) -> Table:
    """One row per stage job (a stage's chunks together) with its tasks counted per state, then one row for each
    task that needs a look (ended otherwise than COMPLETED, unknown, never starts); every task with EVERY_TASK."""
    if every_task:
        return task_table(record, rows, source)
    table = Table(title=f"run {record.run_id} on {record.host}: {_styled(jobstate.summary(rows))} "
                        f"(from {source})", title_justify="left")
    for column in ("job", "id", "tasks", "state", "elapsed", "node", "exit", "reason"):
        table.add_column(column, no_wrap=column != "reason")
    table.add_column("last log line", no_wrap=True, overflow="ellipsis", ratio=1)
    for job in jobstate.by_stage_job(record, rows):
        ids = ", ".join(job.ids) if len(job.ids) <= 2 else f"{job.ids[0]} .. {job.ids[-1]}"
        name = f"{job.name} ({job.chunks} chunks)" if job.chunks > 1 else job.name
        only = job.rows[0] if len(job.rows) == 1 and job.rows[0].task is None else None
        if only is not None:
            table.add_row(name, ids, "", _styled(only.state), only.elapsed, only.node, only.exit_code, only.reason,
                          only.last_line)
            continue
        counts = ", ".join(f"{n} {_styled(state)}" for state, n in job.counts.items())
        waiting = {row.reason for row in job.rows if row.state == "PENDING"}
        running = [row for row in job.rows if row.state == "RUNNING"]
        table.add_row(name, ids, str(job.tasks), counts, "", "", "", waiting.pop() if len(waiting) == 1 else "",
                      running[-1].last_line if running else "")
        index = {row.key: number for number, row in enumerate(job.rows)}  # the stage's task number over its chunks
        for row in job.flagged:
            table.add_row(f"  task {index[row.key]}", row.key, "", _styled(row.state), row.elapsed, row.node,
                          row.exit_code, row.reason, row.last_line)
    return table


def task_table(record: RunRecord, rows: list[jobstate.TaskState], source: str) -> Table:
    """Every job and array task on its own row (`snowpipe status --tasks`)."""
    table = Table(title=f"run {record.run_id} on {record.host}: {_styled(jobstate.summary(rows))} "
                        f"(from {source})", title_justify="left")
    for column in ("job", "id", "task", "state", "elapsed", "node", "exit", "reason"):
        table.add_column(column, no_wrap=column != "reason")
    table.add_column("last log line", no_wrap=True, overflow="ellipsis", ratio=1)
    for row in rows:
        table.add_row(row.name, row.id, "" if row.task is None else str(row.task), _styled(row.state), row.elapsed,
                      row.node, row.exit_code, row.reason, row.last_line)
    return table


def status_json(record: RunRecord, rows: list[jobstate.TaskState], source: str) -> str:
    """`snowpipe status --json`: the run's state, one entry per stage job (`by_job`), and every task (`jobs`)."""
    return json.dumps({"run": record.run_id, "host": record.host, "state": jobstate.summary(rows), "source": source,
                       "by_job": [job.as_dict() for job in jobstate.by_stage_job(record, rows)],
                       "jobs": [row.as_dict() for row in rows]}, indent=1)


def _query(record: RunRecord, use_sacct: bool) -> tuple[list[jobstate.TaskState], str]:
    from pipeline.monitor.ssh import ClusterConnection  # paramiko: only for the commands that connect

    with ClusterConnection(record) as remote:
        return jobstate.query(remote, record, use_sacct=use_sacct)


def cmd_status(args: argparse.Namespace) -> int:
    record = load_record(args.run)
    use_sacct = not args.no_sacct
    if not args.watch:
        rows, source = _query(record, use_sacct)
        remember_state(record, jobstate.summary(rows))
        if args.json:
            print(status_json(record, rows, source))
        else:
            _console().print(status_table(record, rows, source, args.tasks))
        return jobstate.exit_code(rows)
    interval = max(WATCH_FLOOR, args.interval)
    delay, previous = interval, None
    with Live(console=_console(), auto_refresh=False) as live:
        while True:
            rows, source = _query(record, use_sacct)
            live.update(status_table(record, rows, source, args.tasks), refresh=True)
            states = [(row.key, row.state) for row in rows]
            if not any(row.state in jobstate.NOT_DONE for row in rows):
                break
            # Back off while nothing changes (up to 60 s); come back to the floor when something does.
            delay = interval if states != previous else min(delay * 1.5, 60.0)
            previous = states
            time.sleep(delay)
    remember_state(record, jobstate.summary(rows))
    return jobstate.exit_code(rows)


def cmd_runs(args: argparse.Namespace) -> int:
    records = list_records()
    if not records:
        say(f"no run recorded in {RUNS_DIR} yet: submit one with `cd ansible && ansible-playbook submit.yml`")
        return 0
    table = Table(title="submitted runs, newest first", title_justify="left")
    for column in ("run", "cluster", "commit", "submitted", "jobs", "last known state"):
        table.add_column(column)
    for record in records:
        state = record.last_state
        known = f"{_styled(state.summary)} at {state.at[11:16]}" if state else "[dim]run snowpipe status[/]"
        table.add_row(record.run_id, record.host, record.commit[:8], record.submitted[:16].replace("T", " "),
                      str(len(stagejobs.stage_jobs(record))), known)
    _console().print(table)
    return 0


def _pick_task(record: RunRecord, job_name: str | None, task: int | None) -> tuple[RecordedJob, int | None]:
    """The job and array task `snowpipe logs RUN [JOB] [--task I]` means. JOB is a stage job (its chunks count
    its tasks on: task I of `annotate` split into chunks of 4 is task I-4 of annotate.2 when I is 4 to 7), one
    chunk by its name, or a job id; the last of that name when the run holds several."""
    stages = stagejobs.stage_jobs(record)
    if not stages:
        raise SnowpipeError(f"run {record.run_id} has no job recorded")
    if job_name:
        named = [stage for stage in stages if stage.name == job_name] or [
            stagejobs.StageJob(job.name, [job]) for job in stagejobs.find(record, job_name)]
        if not named:
            raise SnowpipeError(f"run {record.run_id} has no job {job_name!r}; its jobs: "
                                f"{', '.join(dict.fromkeys(stage.name for stage in stages))}")
        stage = named[-1]
    else:
        stage = stages[-1]
    tasks = stage.tasks()
    if any(job.array for job in stage.jobs):
        task = 0 if task is None else task
        if not 0 <= task < len(tasks):
            arrays = ", ".join(job.array or "" for job in stage.jobs)
            over = f" over {len(stage.jobs)} chunks ({arrays})" if len(stage.jobs) > 1 else f" {arrays}"
            raise SnowpipeError(f"job {stage.name} has array tasks 0-{len(tasks) - 1}{over}, not {task}")
        return tasks[task]
    if task is not None:
        raise SnowpipeError(f"job {stage.name} is not an array job: drop --task")
    return tasks[-1]


def cmd_logs(args: argparse.Namespace) -> int:
    from pipeline.monitor.ssh import ClusterConnection

    record = load_record(args.run)
    job, task = _pick_task(record, args.job, args.task)
    row = next(r for r in jobstate.expected_tasks(record.model_copy(update={"jobs": [job]})) if r.task == task)
    if row.chunk_of:
        say(f"{row.chunk_of} task {args.task or 0} is task {task} of its chunk {job.name} ({row.key})")
    marker = formats.exit_marker_path(record.remote_dir, job.name, row.key)
    with ClusterConnection(record) as remote:
        if not args.follow:
            result = remote.run(["tail", "-n", str(args.lines), row.log])
            if result.code != 0:
                raise SnowpipeError(f"no output of {job.name} ({row.key}) yet at {row.log}: the job may still be "
                                    f"pending (snowpipe status {record.run_id})")
            sys.stdout.write(result.stdout)
            return 0
        # Follow until the job's exit marker appears (or Ctrl-C).
        script = ('tail -n "$1" -F "$2" 2>/dev/null & t=$!; while [ ! -e "$3" ]; do sleep 2; done; sleep 1; '
                  'kill "$t"')
        remote.stream(["bash", "-c", script, "follow", str(args.lines), row.log, marker],
                      lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from pipeline.monitor.ssh import rsync_shell

    record = load_record(args.run)
    dest = Path(args.dest or RUNS_DIR / record.run_id).expanduser()
    if shutil.which("rsync") is None:
        raise SnowpipeError("rsync not found on this machine: apt-get install rsync")
    source = f"{login(record.login_address, record.user)}:{record.remote_dir}/"
    dest.mkdir(parents=True, exist_ok=True)
    argv = ["rsync", "--archive", "--partial", "--itemize-changes", "--protect-args", "--rsh", rsync_shell(record),
            "--include=/results/***", "--include=/logs/***", "--include=/config.json", "--include=/COMMIT",
            "--exclude=*", source, f"{dest}/"]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise SnowpipeError(f"rsync from {record.host} failed: {result.stderr.strip().splitlines()[-1:]}")
    sent = [line for line in result.stdout.splitlines() if line.startswith(">f")]
    say(f"fetched {len(sent)} changed file(s) of run {record.run_id} into {dest} (results/, logs/, config.json)")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    record = load_record(args.run)
    task = args.job if args.job and re.fullmatch(r"\d+_\d+", args.job) else None  # one array task: ID_TASK
    if task is not None:
        jobs = [job for job in record.jobs if job.array and task.split("_")[0] == job.id]
    else:  # a stage job cancels every chunk of it
        jobs = stagejobs.find(record, args.job) if args.job else list(record.jobs)
    if not jobs:
        raise SnowpipeError(f"run {record.run_id} has no job {args.job!r}")
    ids = [task] if task else [job.id for job in jobs]
    if not args.yes:
        if not sys.stdin.isatty():
            raise SnowpipeError("cancel needs a confirmation: add --yes")
        stages: dict[str, list[str]] = {}
        for job in jobs:
            stages.setdefault(stagejobs.stage_name(job), []).append(job.id)
        listed = f"{jobs[0].name} task {task}" if task else ", ".join(
            f"{name} ({', '.join(job_ids)})" for name, job_ids in stages.items())
        answer = input(f"cancel {listed} of run {record.run_id} on {record.host}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            say("nothing cancelled")
            return 1
    from pipeline.monitor.ssh import ClusterConnection

    with ClusterConnection(record) as remote:
        result = remote.run(["scancel", *ids])
    if result.code != 0:
        raise SnowpipeError(f"scancel on {record.host} failed: {result.stderr.strip()}")
    say(f"cancelled {', '.join(ids)} of run {record.run_id} (finished jobs are not affected)")
    return 0


def add_tool_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list submitted runs, newest first",
                       description="The runs recorded in runs/*.json, with the last state `snowpipe status` saw.")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("status", help="job states of a run over SSH (exit 0 done, 1 failed, 3 running)",
                       description="One table per run: one row per job (a stage split into chunks of the cluster's "
                                   "MaxArraySize is one job) with its array tasks counted per state, then every "
                                   "task that failed, is unknown or never starts, with elapsed time, node, exit "
                                   "code, reason and the last line of its log (--tasks: every task). sacct when "
                                   "accounting is on, else squeue + scontrol + the exit markers the batch scripts "
                                   "write.")
    p.add_argument("run", nargs="?", help="run id (default: the newest)")
    p.add_argument("--watch", action="store_true", help="refresh until every job is done")
    p.add_argument("--interval", type=float, default=5.0,
                   help=f"seconds between refreshes with --watch (at least {WATCH_FLOOR:g}; backs off while "
                        f"nothing changes)")
    p.add_argument("--json", action="store_true",
                   help='print {"run": ..., "state": ..., "by_job": [one per stage job], "jobs": [every task]} '
                        'instead of a table')
    p.add_argument("--tasks", action="store_true",
                   help="one row per array task (default: one row per job, its chunks together, with its tasks "
                        "counted per state and those that failed listed)")
    p.add_argument("--no-sacct", action="store_true", help="skip sacct (use squeue / scontrol / exit markers)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="a job's output over SSH",
                       description="The output of one job (default: the run's last job) or array task. A job "
                                   "split into chunks counts its tasks over them (annotate --task 5 is the sixth "
                                   "task of annotate, whichever chunk runs it).")
    p.add_argument("run", help="run id")
    p.add_argument("job", nargs="?", help="job name (a stage job, or one chunk as JOB.K) or id (default: the "
                                          "last job of the run)")
    p.add_argument("--task", type=int, help="array task index, counted over the job's chunks (default: the "
                                            "first)")
    p.add_argument("--lines", "-n", type=int, default=40, help="lines from the end (default 40)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("fetch", help="pull a run's results and logs back (rsync over SSH)",
                       description="rsync results/, logs/ and config.json of the run folder; resumable, only "
                                   "what changed.")
    p.add_argument("run", help="run id")
    p.add_argument("dest", nargs="?", help="local folder (default: runs/RUN/)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("cancel", help="scancel a run's jobs (after a confirmation)",
                       description="Cancel every job of the run, or one job (every chunk of it), one chunk "
                                   "(JOB.K) or one array task (ID_TASK).")
    p.add_argument("run", help="run id")
    p.add_argument("job", nargs="?", help="job name (all its chunks) or id, or one array task as ID_TASK (default: "
                                          "all jobs of the run)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_cancel)

    from pipeline.monitor.probe import add_probe_parser  # what a run cost, what the cluster offers (issue 25)
    from pipeline.monitor.report import add_report_parser

    add_report_parser(sub)
    add_probe_parser(sub)
