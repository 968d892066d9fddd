"""A season over two tiles on a cluster whose arrays hold at most 4 tasks (issue 22, items 3 and 7): `ansible-playbook
submit.yml` splits each array stage of 10 scenes into chunks of 4, 4 and 2, every chunk runs to COMPLETED on the
embedded SLURM cluster, and the run gives masks for both tiles and test metrics per tile. `snowpipe status` shows
each stage as one job.

The limit comes from the inventory variable `snowpipe_max_array_size` (the embedded cluster's own MaxArraySize is
SLURM's 1001; lowering it would restart slurmctld under the other tests): the plan must take the inventory's word
over the cluster's, and never exceed the cluster's.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.submit.plan import REPO_ROOT
from tests.playbooks import playbook

pytestmark = pytest.mark.cluster

TILES = ["32TNS", "32TMS"]
SCENES = 5                                   # per tile: 10 scenes, arrays of 4 + 4 + 2
MAX_ARRAY = 4
SMALL_JOBS = {"*": {"cpus": 1, "memory": "1G", "tmp": "0", "time": "01:00:00"}}
ARRAY_STAGES = ["decode", "annotate", "infer"]


def cluster_max_array_size(cluster) -> int:
    shown = subprocess.run(["scontrol", "show", "config"], env=cluster.env(), capture_output=True, text=True,
                           check=True).stdout
    return int(next(line.split("=", 1)[1] for line in shown.splitlines() if line.startswith("MaxArraySize")))


@pytest.fixture(scope="module")
def two_tiles(tmp_path_factory) -> Path:
    """Two tiles x 5 scenes of 64 px, and a config whose training is a smoke run (2 epochs, a tiny U-Net) on
    32 px patches (no 64 px patch lies fully inside a 64 px scene's coverage)."""
    out = tmp_path_factory.mktemp("two-tiles")
    assert main(["demo-data", str(out), "--tiles", ",".join(TILES), "--scenes", str(SCENES), "--size", "64"]) == 0
    path = out / "pipeline-config.yml"
    config = yaml.safe_load(path.read_text())
    config["training"].update(epochs=2, model={"base_channels": 4, "depth": 2})
    config["dataset"]["patch_size"] = 32
    config["inference"]["quicklooks"] = False
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_tiles_in_chunks_of_four_run_to_completed_with_masks_and_metrics_per_tile(local_cluster, two_tiles,
                                                                                      capsys):
    assert cluster_max_array_size(local_cluster) >= MAX_ARRAY  # the inventory's limit is the tighter one
    run_id = f"t{time.strftime('%H%M%S')}-chunks"
    try:
        result = playbook("-e", f"config={two_tiles}", "-e", f"run_id={run_id}", "-e", "wait=true",
                          "-e", json.dumps({"snowpipe_job_overrides": SMALL_JOBS,
                                            "snowpipe_max_array_size": MAX_ARRAY}))
        assert result.returncode == 0, result.stdout[-4000:]

        record = json.loads((REPO_ROOT / "runs" / f"{run_id}.json").read_text())
        jobs = {job["name"]: job for job in record["jobs"]}
        for stage in ARRAY_STAGES:  # 10 scenes in chunks of at most 4: stage.1, stage.2, stage.3
            chunks = [jobs[f"{stage}.{k}"] for k in (1, 2, 3)]
            assert [job["array"] for job in chunks] == ["0-3", "0-3", "0-1"], stage
            assert all(job.get("chunk_of") == stage for job in chunks) and stage not in jobs
        assert {"dataset", "train", "test"} <= set(jobs) and jobs["dataset"].get("chunk_of") is None
        # each annotate chunk waits task by task for its own decode chunk; dataset for every annotate chunk
        for k in (1, 2, 3):
            assert jobs[f"annotate.{k}"]["after_each"] == [jobs[f"decode.{k}"]["id"]]
        assert set(jobs["dataset"]["after"]) == {jobs[f"annotate.{k}"]["id"] for k in (1, 2, 3)}
        assert set(jobs["test"]["after"]) >= {jobs[f"infer.{k}"]["id"] for k in (1, 2, 3)}

        assert main(["status", run_id, "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        by_job = {job["name"]: job for job in status["by_job"]}
        assert list(by_job) == ["decode", "annotate", "dataset", "train", "infer", "test"]
        for stage in ARRAY_STAGES:
            assert by_job[stage]["chunks"] == 3 and by_job[stage]["counts"] == {"COMPLETED": 10}
        assert all(job["state"] == "COMPLETED" and not job["flagged"] for job in status["by_job"])
        markers = [json.loads(path.read_text()) for path in (Path(record["remote_dir"]) / "logs").glob("*.exit")]
        assert len(markers) == 3 * 10 + 3 and all(marker["exit_code"] == 0 for marker in markers)

        results = Path(record["remote_dir"]) / "results"
        for tile in TILES:  # every scene of both tiles annotated, predicted, in the metrics
            assert len(list(results.glob(f"predictions/{tile}_*/mask.tif"))) == SCENES, tile
        metrics = json.loads((results / "testing" / "metrics.json").read_text())
        assert sorted(metrics["tiles"]) == sorted(TILES)
        assert len(metrics["scenes"]) == 2 * SCENES
    finally:
        (REPO_ROOT / "runs" / f"{run_id}.json").unlink(missing_ok=True)
