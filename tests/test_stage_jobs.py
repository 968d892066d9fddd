"""A stage split into chunks (array jobs of at most the cluster's MaxArraySize tasks) is one job to the user:
`snowpipe status` shows it as one row with its tasks counted per state and the failed ones listed, `logs` counts
its tasks over the chunks, `cancel` reaches every chunk, `runs` counts it once. Fed with accounting lines as
slurm-wlm 22.05 prints them (the cluster test in test_ssh_tools.py runs the same on the embedded cluster)."""

from __future__ import annotations

import io
import json

import pytest

from pipeline.contract.run_record import RecordedJob, RunRecord
from pipeline.errors import SnowpipeError
from pipeline.monitor import jobstate, stagejobs, tools
from pipeline.monitor.ssh import Result

LOG = "/runs/r/logs/%x-%A_%a.out"


class Accounting:
    """A login node whose sacct prints LINES (JobID|JobName|State|Elapsed|NodeList|ExitCode|Reason); no logs."""

    def __init__(self, lines: list[str]):
        self.text = "\n".join(lines) + "\n"
        self.asked: list[list[str]] = []

    def run(self, argv: list[str], timeout: float = 120.0) -> Result:
        self.asked.append(argv)
        return Result(0, self.text if argv[0] == "sacct" else "", "")


def chunked_run(with_chunk_of: bool = True) -> RunRecord:
    """decode and annotate split into chunks of 4 (10 scenes: 4 + 4 + 2), then a whole dataset job."""
    jobs = []
    for stage, first_id in (("decode", 100), ("annotate", 200)):
        for k, array in enumerate(["0-3", "0-3", "0-1"], start=1):
            extra = {"chunk_of": stage} if with_chunk_of else {}
            after = [str(100 + k - 1)] if stage == "annotate" else []
            jobs.append(RecordedJob(name=f"{stage}.{k}", id=str(first_id + k - 1), array=array, log=LOG, after=after,
                                    after_each=after, submitted="2026-12-05T10:00:00+00:00", **extra))
    jobs.append(RecordedJob(name="dataset", id="300", after=["200", "201", "202"], log="/runs/r/logs/%x-%j.out",
                            submitted="2026-12-05T10:00:00+00:00", **({"chunk_of": None} if with_chunk_of else {})))
    return RunRecord(run_id="r", host="local", address="127.0.0.1", remote_dir="/runs/r", jobs=jobs)


def accounting_of_a_run_with_one_failed_scene() -> list[str]:
    """Every decode task completed; annotate's task 1 of chunk 2 (the stage's task 5) exited 1, the rest
    completed; dataset never starts (afterok on a chunk that failed)."""
    lines = [f"{100 + c}_{t}|decode.{c + 1}|COMPLETED|00:00:03|vm|0:0|None"
             for c, tasks in enumerate([4, 4, 2]) for t in range(tasks)]
    lines += [f"{200 + c}_{t}|annotate.{c + 1}|{'FAILED' if (c, t) == (1, 1) else 'COMPLETED'}|00:00:09|vm|"
              f"{'1:0' if (c, t) == (1, 1) else '0:0'}|None" for c, tasks in enumerate([4, 4, 2]) for t in range(tasks)]
    return [*lines, "300|dataset|PENDING|00:00:00|None assigned|0:0|DependencyNeverSatisfied"]


@pytest.mark.parametrize("with_chunk_of", [True, False], ids=["chunk_of", "name-pattern"])
def test_status_shows_a_stage_split_into_chunks_as_one_job_with_its_failed_task(with_chunk_of):
    record = chunked_run(with_chunk_of)
    rows, source = jobstate.query(Accounting(accounting_of_a_run_with_one_failed_scene()), record)  # type: ignore[arg-type]
    by_job = {job.name: job for job in jobstate.by_stage_job(record, rows)}

    assert list(by_job) == ["decode", "annotate", "dataset"]
    annotate = by_job["annotate"]
    assert annotate.chunks == 3 and annotate.tasks == 10 and annotate.ids == ["200", "201", "202"]
    assert annotate.counts == {"COMPLETED": 9, "FAILED": 1} and annotate.state == "FAILED"
    assert [row.key for row in annotate.flagged] == ["201_1"]
    assert by_job["decode"].counts == {"COMPLETED": 10} and not by_job["decode"].flagged
    assert by_job["dataset"].chunks == 1 and by_job["dataset"].flagged[0].reason.startswith("never starts")
    assert "annotate.2 FAILED did not complete" in by_job["dataset"].flagged[0].reason

    table = _text(tools.status_table(record, rows, source))
    annotate_rows = [line for line in table.splitlines() if line.startswith("│ annotate")]
    assert len(annotate_rows) == 1 and "annotate (3 chunks)" in annotate_rows[0]
    assert "9 COMPLETED, 1 FAILED" in annotate_rows[0]
    failed = next(line for line in table.splitlines() if "201_1" in line)
    assert "task 5" in failed and "FAILED" in failed and "1:0" in failed
    assert len([line for line in table.splitlines() if "│" in line and "COMPLETED" in line]) == 2  # no per-task rows

    document = json.loads(tools.status_json(record, rows, source))
    assert document["by_job"][1] == {"name": "annotate", "ids": ["200", "201", "202"], "chunks": 3, "tasks": 10,
                                     "state": "FAILED", "counts": {"COMPLETED": 9, "FAILED": 1},
                                     "flagged": ["201_1"]}
    assert len(document["jobs"]) == 21 and document["jobs"][14]["chunk_of"] == "annotate"


def _text(table) -> str:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=200).print(table)
    return out.getvalue()


def test_logs_count_a_stage_jobs_tasks_over_its_chunks():
    record = chunked_run()
    assert tools._pick_task(record, "annotate", 5) == (record.jobs[4], 1)   # chunk 2, its task 1
    assert tools._pick_task(record, "annotate", 9) == (record.jobs[5], 1)   # chunk 3, its task 1
    assert tools._pick_task(record, "annotate", None) == (record.jobs[3], 0)
    assert tools._pick_task(record, "annotate.3", 1) == (record.jobs[5], 1)  # one chunk by its own name
    assert tools._pick_task(record, None, None) == (record.jobs[6], None)    # the run's last job
    with pytest.raises(SnowpipeError, match=r"job annotate has array tasks 0-9 over 3 chunks \(0-3, 0-3, 0-1\), "
                                            r"not 10"):
        tools._pick_task(record, "annotate", 10)
    with pytest.raises(SnowpipeError, match="no job 'train'; its jobs: decode, annotate, dataset"):
        tools._pick_task(record, "train", None)


def test_cancel_and_the_run_listing_reach_every_chunk():
    record = chunked_run()
    assert [job.id for job in stagejobs.find(record, "annotate")] == ["200", "201", "202"]
    assert [job.id for job in stagejobs.find(record, "annotate.2")] == ["201"]
    assert [job.id for job in stagejobs.find(record, "300")] == ["300"]
    assert len(stagejobs.stage_jobs(record)) == 3


def test_a_job_with_chunk_of_null_is_whole_whatever_its_name():
    job = RecordedJob(name="v.2", id="1", chunk_of=None)
    assert stagejobs.chunk_of(job) is None and stagejobs.stage_name(job) == "v.2"
    assert stagejobs.chunk_of(RecordedJob(name="v.2", id="1")) == "v"  # an older record: the name pattern


def test_the_same_job_submitted_again_into_a_run_is_another_row():
    first = RecordedJob(name="test", id="7", submitted="2026-12-05T10:00:00+00:00")
    again = RecordedJob(name="test", id="9", submitted="2026-12-05T11:00:00+00:00")
    record = RunRecord(run_id="r", host="h", remote_dir="/r", jobs=[first, again])
    assert [stage.ids for stage in stagejobs.stage_jobs(record)] == [["7"], ["9"]]


def test_a_4000_task_run_flags_each_failed_task_and_each_task_behind_one():
    """Two stages of 2,000 tasks in chunks of 1,000: 20 decode tasks failed, so the 20 annotate tasks waiting for
    them task by task never start, and the other 1,980 still just wait (bench/scale.py times this at scale)."""
    jobs = [RecordedJob(name=f"decode.{k}", id=str(10 + k), array="0-999", chunk_of="decode", log=LOG)
            for k in (1, 2)]
    jobs += [RecordedJob(name=f"annotate.{k}", id=str(20 + k), array="0-999", chunk_of="annotate", log=LOG,
                         after=[str(10 + k)], after_each=[str(10 + k)]) for k in (1, 2)]
    record = RunRecord(run_id="r", host="h", remote_dir="/r", jobs=jobs)
    lines = [f"{10 + k}_{t}|decode.{k}|{'FAILED' if t % 100 == 0 else 'COMPLETED'}|00:00:01|vm|0:0|None"
             for k in (1, 2) for t in range(1000)]
    lines += [f"{20 + k}_{t}|annotate.{k}|PENDING|00:00:00|None assigned|0:0|Dependency"
              for k in (1, 2) for t in range(1000)]
    rows, _ = jobstate.query(Accounting(lines), record)  # type: ignore[arg-type]
    summaries = jobstate.by_stage_job(record, rows)
    assert summaries[0].counts == {"COMPLETED": 1980, "FAILED": 20} and len(summaries[0].flagged) == 20
    assert len(summaries[1].flagged) == 20 and summaries[1].counts == {"PENDING": 2000}  # never start: behind a fail
    assert {row.key for row in summaries[1].flagged} == {f"{20 + k}_{t}" for k in (1, 2) for t in range(0, 1000, 100)}
