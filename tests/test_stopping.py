"""Stopping a run with annotate workers: Ctrl-C, SIGTERM (scancel) and SIGHUP (a closed terminal) stop the scenes
not started and interrupt the running ones, so nothing is published after the signal; and a stage's summary says
"the other scenes finished" only when some did.

The runs are the real `snowpipe stage annotate` on small generated scenes. Each worker stops itself (SIGSTOP,
through SNOWPIPE_KILL_AT) right after it wrote its first scene's mask into its private folder, so the test knows
exactly which scenes had started when it sends the signal, without timing games; SIGCONT then lets the workers
see the signal.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.builders import TILE, sid, write_auxiliary, write_scene

SIZE = 60
DATES = [f"202203{day:02d}T102309" for day in range(1, 7)]
REPO = Path(__file__).resolve().parent.parent


def write_project(root: Path, dates: list[str], exolabs: int = 5, workers: int = 2) -> Path:
    write_auxiliary(root, SIZE)
    for date in dates:
        write_scene(root, date, SIZE, exolabs=np.full((SIZE, SIZE), exolabs, np.uint8))
    config = {"tile_id": TILE, "paths": {"extracted_data": ".", "annotated_masks": "masks", "dataset": "dataset",
                                         "results": "results", "work": "work"},
              "annotation": {"workers": workers, "clouds": False}}
    path = root / "pipeline-config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def pending(pid: int, number: int) -> bool:
    """Whether signal `number` waits to be delivered to `pid` (a stopped process sees it on SIGCONT)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    masks = [int(line.split()[1], 16) for line in lines if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask >> (number - 1) & 1 for mask in masks)


def wait_for(condition, what: str, limit: float = 180) -> None:
    """Poll for an event; the limit only turns a hang into a failure."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stopping")
    write_project(root, DATES)
    return root


@pytest.mark.parametrize("how", ["SIGTERM to the run", "Ctrl-C to the group", "SIGHUP to the group"])
def test_a_stop_signal_publishes_no_scene_after_it_and_stops_the_workers(scenes, tmp_path, how):
    """The run used to go on for 25 s, annotating and publishing every scene not started, and then say
    "unfinished ones were not written"; SIGHUP ended it with 129 and no word."""
    project = tmp_path / "project"
    shutil.copytree(scenes, project)
    env = {**os.environ, "SNOWPIPE_KILL_AT": "published mask.tif", "SNOWPIPE_KILL_SIGNAL": "STOP"}
    command = [sys.executable, "-m", "pipeline", "stage", "annotate", str(project / "pipeline-config.yml")]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                           start_new_session=True)
    try:
        stopped: list[int] = []

        def both_workers_stopped() -> bool:
            stopped[:] = [pid for pid in children(run.pid) if state(pid) == "T"]
            return len(stopped) == 2 or run.poll() is not None

        wait_for(both_workers_stopped, "both workers at their first mask")
        assert run.poll() is None, run.communicate()
        started = sorted(p.name for p in (project / "masks").glob(".*.partial-*"))
        assert len(started) == 2
        if how == "SIGTERM to the run":
            os.kill(run.pid, signal.SIGTERM)
        else:
            os.killpg(run.pid, signal.SIGINT if how.startswith("Ctrl-C") else signal.SIGHUP)
        # the run has passed the stop on to its workers (SIGTERM waits in each) before they may go on
        wait_for(lambda: all(pending(pid, signal.SIGTERM) for pid in stopped), "SIGTERM from the run to its workers",
                 limit=60)
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 130, stderr
    assert "interrupted: finished outputs are kept, unfinished ones were not written" in stderr
    assert "Traceback" not in stderr
    masks = project / "masks"
    assert not [date for date in DATES if (masks / sid(date)).exists()], "a scene was published after the signal"
    assert not list(masks.glob(".*.partial-*")) and not list(masks.glob(".*.lock")), sorted(os.listdir(masks))
    wait_for(lambda: all(state(pid) in ("gone", "Z") for pid in stopped), "the workers ended")


def test_the_summary_says_no_scene_finished_when_none_did(tmp_path):
    """Every scene failing used to end with "(the other scenes finished; ...)"."""
    config = write_project(tmp_path, DATES[:2], exolabs=0, workers=1)  # ExoLabs observed nothing: every scene fails
    done = subprocess.run([sys.executable, "-m", "pipeline", "stage", "annotate", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "annotate failed for 2 scene(s)" in done.stderr and "(no scene finished)" in done.stderr
    assert "other scene" not in done.stderr

    write_scene(tmp_path, DATES[2], SIZE, exolabs=np.full((SIZE, SIZE), 5, np.uint8))
    done = subprocess.run([sys.executable, "-m", "pipeline", "stage", "annotate", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "(the other scene finished; set annotation.on_scene_error: skip to continue without them)" in done.stderr


@pytest.mark.parametrize(("point", "workers"), [
    ("took .{scene}.lock", 1), ("took .{scene}.lock", 2), ("releasing .{scene}.lock", 1),
    ("releasing .{scene}.lock", 2), ("discarding {scene}", 1)],
    ids=["lock-just-taken", "lock-just-taken-in-a-worker", "lock-being-released", "lock-being-released-in-a-worker",
         "failed-scene-being-cleaned-up"])
def test_a_stop_signal_in_the_middle_of_a_lock_or_a_clean_up_waits_for_it(tmp_path, point, workers):
    """A SIGTERM that landed right after the scene's lock file was created, or inside its release, used to leave
    the lock behind, naming a pid that might still live (the CI's full-disk run, where a worker was stopped while
    it unwound); one inside the removal of a failed scene's private folder left the folder. The signal is sent by
    the process to itself at that exact point (SNOWPIPE_KILL_AT), so no timing decides the outcome."""
    failing = point.startswith("discarding")  # a scene with no valid pixel fails inside its build, then cleans up
    config = write_project(tmp_path, DATES[:3], exolabs=0 if failing else 5, workers=workers)
    env = {**os.environ, "SNOWPIPE_KILL_AT": point.format(scene=sid(DATES[0])), "SNOWPIPE_KILL_SIGNAL": "TERM"}
    done = subprocess.run([sys.executable, "-m", "pipeline", "stage", "annotate", str(config)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 130, done.stderr
    assert "interrupted: finished outputs are kept, unfinished ones were not written" in done.stderr
    assert "Traceback" not in done.stderr and "warning" not in done.stderr
    masks = tmp_path / "masks"
    assert sorted(p.name for p in masks.iterdir() if p.name.startswith(".")) == []  # no lock, partial or temp file
    published = sorted(p.name for p in masks.iterdir())
    if point.startswith("releasing") and workers == 1:
        assert published == [sid(DATES[0])]  # released after its swap: the scene is whole, the next never started
    elif point.startswith("took") and workers == 1 or failing:
        assert published == []
    for scene in published:
        assert (masks / scene / "mask.tif").is_file()
