"""A local run: the rendered batch scripts executed on this machine, to rehearse a run before spending
cluster hours (`ansible-playbook submit.yml -e local_run=true`).

Jobs run one after the other in submission order (which respects `after`), array tasks one by one, with
the variables SLURM would set (job id, array task id, CPUs, a private $TMPDIR) and output in the log file
the `--output` pattern names. As with `afterok`, jobs after a failed one do not run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import ValidationError

from pipeline.contract import formats
from pipeline.contract.plan import Plan, PlannedJob

FIRST_JOB_ID = 1000


def task_environment(job: PlannedJob, plan: Plan, job_id: int, array_job_id: int,
                     task: int | None, tmpdir: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "SNOWPIPE_LOCAL_RUN": "1",
        "SLURM_JOB_ID": str(job_id),
        "SLURM_JOB_NAME": job.name,
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_CPUS_PER_TASK": str(job.sbatch.get("cpus-per-task", 1)),
        "SLURM_SUBMIT_DIR": plan.run_dir,
        "SLURM_RESTART_COUNT": "0",
        "TMPDIR": tmpdir,
    })
    if task is not None:
        env.update({"SLURM_ARRAY_JOB_ID": str(array_job_id), "SLURM_ARRAY_TASK_ID": str(task),
                    "SLURM_ARRAY_TASK_COUNT": str(job.array_size)})
    else:
        for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
            env.pop(name, None)
    return env


def run_job(job: PlannedJob, plan: Plan, job_id: int) -> int:
    """Run every task of one job; the first failing task's exit code, or 0."""
    tasks: list[int | None] = list(range(job.array_size)) if job.array_size else [None]
    script = Path(job.render_path)
    for index, task in enumerate(tasks):
        task_id = job_id + index  # as SLURM numbers array tasks
        log = Path(formats.expand_log(job.log, job.name, task_id, job_id, task))
        log.parent.mkdir(parents=True, exist_ok=True)
        label = job.name + (f"[{task}]" if task is not None else "")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="snowpipe-local-") as tmpdir, open(log, "ab") as out:
            env = task_environment(job, plan, task_id, job_id, task, tmpdir)
            code = subprocess.run(["bash", str(script)], cwd=plan.run_dir, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        print(f"{label}: exit {code} after {time.monotonic() - started:.1f} s, log {log}", flush=True)
        if code != 0:
            return code
    return 0


def run_plan(render_dir: Path) -> int:
    try:
        plan = Plan.model_validate_json((render_dir / "plan.json").read_text())
    except ValidationError as exc:
        print(f"{render_dir / 'plan.json'}: not a plan this snowpipe can run ({exc.errors()[0]['msg']}); "
              f"render it again with ansible-playbook submit.yml -e local_run=true", file=sys.stderr)
        return 2
    Path(plan.run_dir, formats.LOG_FOLDER).mkdir(parents=True, exist_ok=True)
    failed: set[str] = set()
    job_id = FIRST_JOB_ID
    for job in plan.jobs:
        blocked = [name for name in job.after if name in failed]
        if blocked:
            print(f"{job.name}: not run, it waits for {', '.join(blocked)}, which failed", flush=True)
            failed.add(job.name)
            continue
        code = run_job(job, plan, job_id)
        job_id += max(job.array_size, 1) + 1
        if code != 0:
            failed.add(job.name)
    if failed:
        print(f"local run {plan.run_id}: {', '.join(sorted(failed))} failed or did not run; "
              f"logs in {plan.run_dir}/{formats.LOG_FOLDER}", file=sys.stderr)
        return 1
    print(f"local run {plan.run_id}: every job completed; results in {plan.run_dir}/results", flush=True)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not (Path(argv[0]) / "plan.json").is_file():
        print("usage: python -m pipeline.submit.local_run RENDER_DIR (a folder with plan.json and jobs/)",
              file=sys.stderr)
        return 2
    return run_plan(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
