"""Time of one `snowpipe status` on a run with a 50-task array, on the embedded local cluster (goal: < 2 s).

usage: python bench/status_time.py [--tasks 50]
Starts the local cluster if needed, submits a 50-task array job plus a chained job, records a run for it,
and times the whole `snowpipe status RUN` command (Python start, SSH connection, queries, last log lines)
while the jobs run and after they finished, with sacct (when accounting is on) and with the fallback.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.localcluster import embedded

SNOWPIPE = Path(sys.executable).parent / "snowpipe"


def timed_status(run_id: str, env: dict[str, str], *extra: str, repeat: int = 3) -> tuple[float, int]:
    times, code = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        code = subprocess.run([str(SNOWPIPE), "status", run_id, "--json", *extra], env=env,
                              capture_output=True).returncode
        times.append(time.perf_counter() - started)
    return statistics.median(times), code


def main(tasks: int = 50) -> int:
    cluster = embedded.up()
    run_id = f"bench-status-{int(time.time())}"
    run_dir = cluster.remote_root / "runs" / run_id
    (run_dir / "logs").mkdir(parents=True)
    common = ["sbatch", "--parsable", "--chdir", str(run_dir), "--mem=50M"]
    array = subprocess.run([*common, f"--array=0-{tasks - 1}", "--job-name=infer", "--output", "logs/%x-%A_%a.out",
                            "--wrap", "echo scene $SLURM_ARRAY_TASK_ID; sleep 1"], env=cluster.env(),
                           capture_output=True, text=True, check=True).stdout.strip()
    after = subprocess.run([*common, f"--dependency=afterok:{array}", "--job-name=test", "--output", "logs/%x-%j.out",
                            "--wrap", "echo done"], env=cluster.env(), capture_output=True, text=True,
                           check=True).stdout.strip()
    runs = Path(tempfile.mkdtemp(prefix="snowpipe-bench-runs-"))
    record = {"run_id": run_id, "host": "local", "address": cluster.host, "port": cluster.port, "user": cluster.user,
              "key": str(cluster.key), "known_hosts": str(cluster.known_hosts), "remote_dir": str(run_dir),
              "submitted": "", "commit": "", "jobs": [
                  {"name": "infer", "id": array, "after": [], "array": f"0-{tasks - 1}",
                   "log": f"{run_dir}/logs/%x-%A_%a.out"},
                  {"name": "test", "id": after, "after": [array], "array": None, "log": f"{run_dir}/logs/%x-%j.out"}]}
    (runs / f"{run_id}.json").write_text(json.dumps(record))
    env = {**os.environ, "SNOWPIPE_RUNS_DIR": str(runs)}

    running, code = timed_status(run_id, env, repeat=1)
    print(f"while running   : {running:.2f} s (exit {code})")
    deadline = time.monotonic() + 600
    while timed_status(run_id, env, repeat=1)[1] == 3 and time.monotonic() < deadline:
        time.sleep(2)
    finished, code = timed_status(run_id, env)
    fallback, _ = timed_status(run_id, env, "--no-sacct")
    accounting = getattr(cluster, "accounting", False)
    print(f"finished        : {finished:.2f} s (exit {code}, {'sacct' if accounting else 'squeue fallback'})")
    print(f"finished, no sacct: {fallback:.2f} s (squeue + scontrol + exit markers)")
    print(f"{tasks + 1} tasks; goal < 2 s")
    print(f"status_seconds {max(running, finished, fallback):.2f}")
    return 0


if __name__ == "__main__":
    count = int(sys.argv[sys.argv.index("--tasks") + 1]) if "--tasks" in sys.argv else 50
    sys.exit(main(count))
