"""Planning at scale (issue 22, item 5): `snowpipe validate` and `snowpipe plan --json` on trees of 200 and 2,000
scenes over 20 tiles, the dry-run submission of the largest, and `snowpipe status` of its run.

usage: python bench/scale.py [--scenes 200,2000] [--tiles 20] [--repeat 3] [--keep DIR] [--no-dry-run]
                             [--no-status]
Planning reads only the layout (names, file types, the first scene's band headers), so the tree is cheap: one
demo product per tile (`snowpipe demo-data --tiles T1,...,T20 --scenes 1 --size 60`) hard-linked under N / 20
sensing times one day apart, the same times for every tile (one pass covers them all), with one ExoLabs raster
per tile and day. Each command runs in a fresh process; printed: its median wall time, the child's peak memory
(ru_maxrss from wait4) and the time per scene, and the ratio of the time per scene at the largest count to that
at the smallest (goal: <= 1.5: planning grows no faster than the scenes), also net of the start-up a 1-scene
tree measures (imports, config, job specs), which otherwise hides how the scenes' part grows.

Then, for the largest tree: `ansible-playbook submit.yml -e dry_run=true` (goal < 60 s; renders every batch
script, sends nothing, contacts no host), and `snowpipe status` of that plan's run as if every job had been
submitted (goal < 2 s, one row per job): the run record made from the plan with made-up job ids, and sacct's
answer written as slurm-wlm 22.05 prints it (most tasks COMPLETED, one in 100 FAILED, the last job pending),
replayed by a login node that answers from that text (`--replay-status`): the whole command is timed, Python
start-up, record, parsing, the table; the SSH round trips it saves are measured by bench/status_time.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from bench_common import machine

from pipeline.data.layout import EXOLABS_FOLDER, SAFE_NAME
from pipeline.demo.config_file import write_demo_config
from pipeline.demo.scenes import generate_demo

SNOWPIPE = Path(sys.executable).parent / "snowpipe"
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
REPO = Path(__file__).resolve().parent.parent
TARGET = '{"snowpipe_remote_root": "/scratch/x"}'


def tile_ids(count: int) -> list[str]:
    """COUNT Sentinel-2 tile ids of the Alps' UTM zone 32 (32TLR, 32TLS, ..., 32TNS, ...)."""
    return [f"32T{column}{row}" for column in "LMNPQ" for row in "QRST"][:count]


def make_tree(template: Path, out: Path, count: int, tiles: list[str]) -> Path:
    """OUT with the template's config and auxiliary data and COUNT hard-linked products, spread over TILES on shared
    sensing times (a remainder goes to the first tiles); returns the config."""
    source = template / "extracted_data"
    extracted = out / "extracted_data"
    (extracted / EXOLABS_FOLDER).mkdir(parents=True)
    first = datetime(2021, 12, 20, 10, 23, 9)
    products = {match["tile"]: p for p in source.iterdir() if (match := SAFE_NAME.match(p.name))}
    exolabs = {p.name[3:8]: p for p in (source / EXOLABS_FOLDER).iterdir()}
    for number, tile in enumerate(tiles):
        shutil.copytree(source / f"{tile}_auxiliary_data", extracted / f"{tile}_auxiliary_data")
        bands = sorted(next(products[tile].glob("GRANULE/*/IMG_DATA")).iterdir())
        for index in range(count // len(tiles) + (number < count % len(tiles))):
            sensing = first + timedelta(days=index)
            key = sensing.strftime("%Y%m%dT%H%M%S")
            processed = (sensing + timedelta(hours=2)).strftime("%Y%m%dT%H%M%S")
            img = (extracted / f"S2A_MSIL1C_{key}_N0400_R065_T{tile}_{processed}.SAFE" / "GRANULE"
                   / f"L1C_T{tile}_A{30000 + index:06d}_{key}" / "IMG_DATA")
            img.mkdir(parents=True)
            for band in bands:
                os.link(band, img / f"T{tile}_{key}_{band.name.rsplit('_', 1)[1]}")
            os.link(exolabs[tile], extracted / EXOLABS_FOLDER / f"S2_{tile}_{sensing:%Y-%m-%d}_classification.tif")
    shutil.copy(template / "pipeline-config.yml", out / "pipeline-config.yml")
    return out / "pipeline-config.yml"


def timed(command: list[str], ok: tuple[int, ...] = (0,), cwd: Path | None = None,
          env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak resident set (bytes) and stdout of one run of COMMAND; an exit code not in OK stops the
    benchmark. The peak is ru_maxrss from wait4: Linux reports the largest of the child and every descendant it
    waited for (ansible-playbook's forks and the `snowpipe plan` it runs)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # files: a chatty child never blocks
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, cwd=cwd, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, error = out.read().decode(), err.read().decode()
    if child.returncode not in ok:
        raise SystemExit(f"{' '.join(command)} failed (exit {child.returncode}): {(error or text)[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, text


def dry_run(config: Path, run_id: str) -> tuple[float, int, Path]:
    """`ansible-playbook submit.yml -e dry_run=true` of CONFIG: seconds, peak memory of the playbook and what it
    runs, and the plan it wrote."""
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    seconds, peak, _ = timed([str(PLAYBOOK), "submit.yml", "-e", f"config={config}", "-e", f"run_id={run_id}",
                              "-e", "dry_run=true", "-e", "ansible_port=1"], cwd=REPO / "ansible", env=env)
    return seconds, peak, REPO / "build" / "dry-run" / run_id / "plan.json"


def replayed_run(plan_path: Path, runs: Path) -> tuple[str, Path, int]:
    """A run record of PLAN as if sbatch had accepted every job, and sacct's answer for it: every task COMPLETED
    but one in 100 FAILED (exit 1), the last job pending for ever behind them. Returns the run id, the sacct
    output's file and the number of tasks."""
    from pipeline.contract.plan import Plan
    from pipeline.contract.run_record import Connection, record_of_submission
    from pipeline.monitor.slurm_parsers import expand_tasks

    plan = Plan.model_validate_json(plan_path.read_text())
    ids = {job.name: str(5000 + number) for number, job in enumerate(plan.jobs)}
    record = record_of_submission(plan, ids, Connection(host="bench", address="127.0.0.1"))
    runs.mkdir(parents=True, exist_ok=True)
    (runs / f"{record.run_id}.json").write_text(record.to_json())
    lines = []
    for job in record.jobs[:-1]:
        for task in expand_tasks(job.array) if job.array else [None]:
            failed = task is not None and task % 100 == 7
            lines.append(f"{job.id}{'' if task is None else f'_{task}'}|{job.name}|"
                         f"{'FAILED' if failed else 'COMPLETED'}|00:01:0{(task or 0) % 10}|node{(task or 0) % 16}|"
                         f"{'1:0' if failed else '0:0'}|None")
    last = record.jobs[-1]
    lines.append(f"{last.id}|{last.name}|PENDING|00:00:00|None assigned|0:0|DependencyNeverSatisfied")
    sacct = runs / f"{record.run_id}.sacct"
    sacct.write_text("\n".join(lines) + "\n")
    return record.run_id, sacct, len(lines)


def status_of(plan_path: Path, runs: Path, repeat: int) -> None:
    """Time `snowpipe status` (table and --json) of the plan's run from its replayed sacct output."""
    run_id, sacct, tasks = replayed_run(plan_path, runs)
    env = {**os.environ, "SNOWPIPE_RUNS_DIR": str(runs)}
    replay = [sys.executable, str(Path(__file__).parent / "status_replay.py"), run_id, str(sacct)]
    jobs = json.loads(timed([*replay, "--json"], ok=(1, 3), env=env)[2])["by_job"]
    chunks = sum(job["chunks"] for job in jobs)
    for name, extra in (("table", []), ("--json", ["--json"])):
        runs_timed = [timed([*replay, *extra], ok=(1, 3), env=env) for _ in range(repeat)]
        seconds = statistics.median(r[0] for r in runs_timed)
        table = runs_timed[-1][2]
        rows = [line for line in table.splitlines() if line.startswith("│ ") and not line.startswith("│   ")]
        shown = f", {len(rows)} job rows + {table.count('│   task')} flagged task rows" if name == "table" else ""
        print(f"snowpipe status ({name}) of {tasks} tasks in {len(jobs)} jobs ({chunks} array jobs and chunks) "
              f"from captured sacct output: {seconds:.2f} s{shown} (goal < 2 s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", default="200,2000", help="scene counts, comma-separated (default 200,2000)")
    parser.add_argument("--tiles", type=int, default=20, help="tiles the scenes are spread over (default 20)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per command; the median is kept")
    parser.add_argument("--keep", type=Path, help="build the trees here and keep them (default: a temporary folder)")
    parser.add_argument("--no-dry-run", action="store_true", help="skip the dry-run submission and the status")
    args = parser.parse_args()
    counts = sorted(int(n) for n in args.scenes.split(","))
    tiles = tile_ids(args.tiles)
    root = args.keep or Path(tempfile.mkdtemp(prefix="snowpipe-bench-scale-"))
    print(machine())
    print(f"command: python bench/scale.py --scenes {args.scenes} --tiles {args.tiles} --repeat {args.repeat}")
    try:
        write_demo_config(generate_demo(root / "template", scenes=1, size=60, tiles=tiles))
        per_scene: dict[str, dict[int, tuple[float, float]]] = {"validate": {}, "plan": {}}
        start_up: dict[str, float] = {}
        for count in [len(tiles), *counts]:
            config = make_tree(root / "template", root / f"scenes-{count}", count, tiles)
            commands = {"validate": [str(SNOWPIPE), "validate", str(config)],
                        "plan": [str(SNOWPIPE), "plan", str(config), "--json", "--target-vars", TARGET]}
            for name, command in commands.items():
                runs = [timed(command) for _ in range(args.repeat)]
                seconds, peak = statistics.median(r[0] for r in runs), max(r[1] for r in runs)
                if count == len(tiles):  # start-up (imports, the config, the job specs): what every count pays once
                    start_up[name] = seconds
                else:
                    per_scene[name][count] = (seconds, (seconds - start_up[name]) / (count - len(tiles)))
                print(f"{count:6d} scenes  snowpipe {name:<8s} {seconds:6.2f} s  peak {peak / 2**20:6.0f} MiB  "
                      f"{1000 * seconds / count:6.2f} ms/scene  (goal < 10 s, < 1024 MiB)")
        low, high = counts[0], counts[-1]
        ratios = {name: (times[high][0] / high / (times[low][0] / low), times[high][1] / times[low][1])
                  for name, times in per_scene.items()}
        for name, (ratio, net) in ratios.items():
            print(f"{name}: time per scene at {high} / at {low} {ratio:.2f}, net of the {len(tiles)}-scene start-up "
                  f"{net:.2f}")
        print(f"time per scene at {high} / at {low} (goal <= 1.5): {max(r for r, _ in ratios.values()):.2f} "
              f"({max(n for _, n in ratios.values()):.2f} net of start-up)")
        if not args.no_dry_run:
            run_id = f"bench-scale-{high}"
            seconds, peak, plan = dry_run(root / f"scenes-{high}" / "pipeline-config.yml", run_id)
            print(f"{high:6d} scenes  ansible-playbook submit.yml -e dry_run=true  {seconds:6.2f} s  "
                  f"(goal < 60 s)")
            status_of(plan, root / "runs", args.repeat)
            shutil.rmtree(plan.parent, ignore_errors=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
