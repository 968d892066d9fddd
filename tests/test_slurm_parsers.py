"""What `snowpipe status` reads from sacct, squeue and scontrol, told with their real output: the files under
tests/fixtures/slurm/ were recorded from the embedded SLURM cluster (`record.py` there says how), except the
`*_hand_written.txt` ones, for states one local node cannot produce. No cluster needed: none of these is marked
`cluster`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pipeline.contract.run_record import RecordedJob, RunRecord
from pipeline.monitor import jobstate, slurm_parsers
from pipeline.monitor.slurm_parsers import JobRecord, parse_sacct, parse_scontrol, parse_squeue
from pipeline.monitor.ssh import Result

FIXTURES = Path(__file__).parent / "fixtures" / "slurm"


@dataclass
class Capture:
    """A fixture file: what the command printed (its `#` lines dropped) and the jobs it shows, by name."""

    text: str
    jobs: dict[str, str]


def capture(name: str) -> Capture:
    lines = (FIXTURES / name).read_text().splitlines(keepends=True)
    jobs = next(dict(pair.split("=") for pair in line.split()[2:]) for line in lines if line.startswith("# jobs:"))
    return Capture("".join(line for line in lines if not line.startswith("#")), jobs)


def by_id(records: list[JobRecord]) -> dict[str, JobRecord]:
    ids = [record.job_id for record in records]
    assert len(ids) == len(set(ids)), f"one record per job or task: {ids}"
    return {record.job_id: record for record in records}


# ------------------------------------------------------------------------------------------------ sacct


def test_a_job_that_exits_0_completes_and_one_that_exits_3_fails_with_that_code():
    queue = capture("sacct_queue.txt")
    records = by_id(parse_sacct(queue.text))
    ok, bad = records[queue.jobs["ok"]], records[queue.jobs["bad"]]
    assert (ok.state, ok.exit_code, ok.exit_status, ok.signal, ok.name, ok.node) == ("COMPLETED", "0:0", 0, 0, "ok",
                                                                                      "vm")
    assert (bad.state, bad.exit_code, bad.exit_status, bad.signal) == ("FAILED", "3:0", 3, 0)
    assert bad.tasks is None and not bad.is_range and bad.job == queue.jobs["bad"]


def test_a_pending_array_with_a_throttle_is_one_range_record_beside_its_running_tasks():
    queue = capture("sacct_queue.txt")
    arr = queue.jobs["arr"]
    records = by_id(parse_sacct(queue.text))
    rest = records[f"{arr}_[2-3%2]"]
    assert rest.is_range and rest.job == arr and rest.tasks == (2, 3)
    assert (rest.state, rest.reason, rest.node) == ("PENDING", "JobArrayTaskLimit", "")
    for task in (0, 1):
        running = records[f"{arr}_{task}"]
        assert (running.job, running.tasks, running.is_range) == (arr, (task,), False)
        assert (running.state, running.node, running.reason) == ("RUNNING", "vm", "")


def test_pending_jobs_say_why_they_wait_and_have_no_node():
    queue = capture("sacct_queue.txt")
    records = by_id(parse_sacct(queue.text))
    reasons = {name: records[queue.jobs[name]].reason for name in ("after", "later", "held")}
    assert reasons == {"after": "Dependency", "later": "BeginTime", "held": "JobHeldUser"}
    assert {records[queue.jobs[name]].state for name in reasons} == {"PENDING"}
    assert {records[queue.jobs[name]].node for name in reasons} == {""}  # sacct: "None assigned"


def test_right_after_submission_accounting_may_know_only_the_whole_array_as_pending():
    lag = capture("sacct_accounting_lags.txt")
    (record,) = parse_sacct(lag.text)
    assert record.job_id == f"{lag.jobs['arr']}_[0-3%2]" and record.tasks == (0, 1, 2, 3) and record.is_range
    assert record.state == "PENDING"
    queue = by_id(parse_squeue(capture("squeue_accounting_lags.txt").text))  # the queue, at the same moment, knows
    assert [queue[f"{lag.jobs['arr']}_{task}"].state for task in range(4)] == ["RUNNING"] * 2 + ["PENDING"] * 2


def test_a_job_cancelled_by_a_user_is_cancelled_not_failed():
    ended = capture("sacct_ended.txt")
    records = by_id(parse_sacct(ended.text))
    assert "CANCELLED by 0" in ended.text  # sacct names who cancelled it; the state is the first word
    for name in ("later", "held", "long", "rq"):  # cancelled pending, pending, running, and after a requeue
        assert records[ended.jobs[name]].state == "CANCELLED", name
    other_user = by_id(parse_sacct(capture("sacct_hand_written.txt").text))["207"]
    assert (other_user.state, other_user.node) == ("CANCELLED", "cpu-node-[01-02]")


def test_a_job_past_its_time_limit_is_TIMEOUT():
    ended = capture("sacct_ended.txt")
    slow = by_id(parse_sacct(ended.text))[ended.jobs["slow"]]
    assert (slow.state, slow.elapsed, slow.node) == ("TIMEOUT", "00:01:11", "vm")


def test_an_array_whose_tasks_exit_differently_has_one_record_per_task():
    ended = capture("sacct_ended.txt")
    records = by_id(parse_sacct(ended.text))
    mixed = [records[f"{ended.jobs['mixed']}_{task}"] for task in range(3)]
    assert [(r.state, r.exit_code, r.exit_status) for r in mixed] == [
        ("COMPLETED", "0:0", 0), ("FAILED", "1:0", 1), ("FAILED", "2:0", 2)]
    throttled = [records[f"{ended.jobs['arr']}_{task}"] for task in range(4)]
    assert {r.state for r in throttled} == {"COMPLETED"} and not any(r.is_range for r in records.values())


def test_a_requeued_job_is_REQUEUED_in_accounting_while_the_queue_has_it_pending_again():
    sacct, squeue, scontrol = (capture(f"{command}_requeued.txt") for command in ("sacct", "squeue", "scontrol"))
    rq = sacct.jobs["rq"]
    assert [(r.job_id, r.state, r.node) for r in parse_sacct(sacct.text)] == [(rq, "REQUEUED", "vm")]
    assert [(r.job_id, r.state, r.reason) for r in parse_squeue(squeue.text)] == [(rq, "PENDING", "BeginTime")]
    assert [(r.job_id, r.state, r.reason) for r in parse_scontrol(scontrol.text)] == [(rq, "PENDING", "BeginTime")]


def test_job_steps_are_not_jobs():
    steps = capture("sacct_steps.txt")
    assert ".batch|" in steps.text
    records = parse_sacct(steps.text)
    assert not any("." in record.job_id for record in records)
    ended = by_id(parse_sacct(capture("sacct_ended.txt").text))  # the same jobs as with --allocations
    assert records == [ended[record.job_id] for record in records]
    assert {record.job for record in records} == set(steps.jobs.values())


def test_a_node_failure_a_memory_kill_preemption_and_a_missed_deadline_keep_their_states():
    records = by_id(parse_sacct(capture("sacct_hand_written.txt").text))
    states = {job_id: (records[job_id].state, records[job_id].exit_code) for job_id in ("201", "202", "203", "204")}
    assert states == {"201": ("NODE_FAIL", "0:0"), "202": ("OUT_OF_MEMORY", "0:125"), "203": ("PREEMPTED", "0:15"),
                      "204": ("DEADLINE", "0:0")}
    assert records["202"].signal == 125 and records["204"].reason == "DeadLine"


def test_a_heterogeneous_jobs_components_count_as_the_job_and_a_sparse_range_expands():
    records = by_id(parse_sacct(capture("sacct_hand_written.txt").text))
    assert [(records[c].job, records[c].tasks) for c in ("205+0", "205+1")] == [("205", None), ("205", None)]
    sparse = records["206_[1,3,5-7%3]"]
    assert sparse.is_range and sparse.tasks == (1, 3, 5, 6, 7) and sparse.reason == "Priority"


def test_lines_that_are_no_record_are_skipped():
    assert parse_sacct("") == []
    assert parse_sacct("sacct: error: Problem talking to the database: Connection refused\n") == []
    assert parse_sacct("12|x|COMPLETED|00:00:01|vm|0:0\n") == []  # six fields: another --format


# ------------------------------------------------------------------------------------------------ squeue


def test_the_queue_lists_every_pending_task_of_a_throttled_array_on_its_own_line():
    queue = capture("squeue_queue.txt")
    arr = queue.jobs["arr"]
    records = by_id(parse_squeue(queue.text))
    for task in (2, 3):
        pending = records[f"{arr}_{task}"]
        assert (pending.job, pending.tasks, pending.is_range) == (arr, (task,), False)
        assert (pending.state, pending.reason, pending.node, pending.elapsed) == ("PENDING", "JobArrayTaskLimit", "",
                                                                                 "0:00")
    assert [(records[f"{arr}_{t}"].state, records[f"{arr}_{t}"].node) for t in (0, 1)] == [("RUNNING", "vm")] * 2


def test_the_queue_says_why_each_job_waits_but_knows_no_exit_codes_and_no_finished_jobs():
    queue = capture("squeue_queue.txt")
    records = by_id(parse_squeue(queue.text))
    reasons = {name: records[queue.jobs[name]].reason for name in ("after", "later", "held", "queued")}
    assert reasons == {"after": "Dependency", "later": "BeginTime", "held": "JobHeldUser", "queued": "Resources"}
    assert {record.exit_code for record in records.values()} == {None}
    assert {record.name for record in records.values()} == {None}
    assert queue.jobs["ok"] not in records and queue.jobs["bad"] not in records


def test_jobs_that_ended_leave_the_queue_and_an_unknown_id_prints_nothing():
    assert parse_squeue(capture("squeue_ended.txt").text) == []
    unknown = (FIXTURES / "squeue_unknown_id.txt").read_text()
    assert "Invalid job id specified" in unknown and parse_squeue(capture("squeue_unknown_id.txt").text) == []


def test_reasons_with_spaces_node_ranges_and_passing_states_are_read_whole():
    records = by_id(parse_squeue(capture("squeue_hand_written.txt").text))
    assert records["301"].state == "COMPLETING" and records["302"].node == "gpu-node-[01-02]"
    assert records["303"].reason == "ReqNodeNotAvail, UnavailableNodes:gpu-node-[03-04]"
    assert (records["304"].state, records["304"].reason) == ("REQUEUE_HOLD", "job_requeued_in_held_state")


# ------------------------------------------------------------------------------------------------ scontrol


def test_slurmctld_remembers_how_a_finished_job_ended_signal_included():
    ended = capture("scontrol_ended.txt")
    records = by_id(parse_scontrol(ended.text))
    slow, long, bad = (records[ended.jobs[name]] for name in ("slow", "long", "bad"))
    assert (slow.state, slow.reason, slow.exit_code, slow.signal) == ("TIMEOUT", "TimeLimit", "0:15", 15)
    assert (long.state, long.exit_code, long.elapsed) == ("CANCELLED", "0:15", "00:00:02")  # sacct: "CANCELLED by 0"
    assert (bad.state, bad.reason, bad.exit_code, bad.name) == ("FAILED", "NonZeroExitCode", "3:0", "bad")


def test_array_tasks_are_named_by_the_array_job_not_by_their_own_job_ids():
    ended = capture("scontrol_ended.txt")
    mixed = ended.jobs["mixed"]
    records = [r for r in parse_scontrol(ended.text) if r.job == mixed]
    assert sorted((r.job_id, r.tasks, r.state, r.exit_code) for r in records) == [
        (f"{mixed}_0", (0,), "COMPLETED", "0:0"), (f"{mixed}_1", (1,), "FAILED", "1:0"),
        (f"{mixed}_2", (2,), "FAILED", "2:0")]
    assert f"JobId={int(mixed) + 1} " in ended.text  # each task is a job of its own to slurmctld


def test_the_pending_rest_of_a_throttled_array_reads_as_sacct_writes_it():
    queue = capture("scontrol_queue.txt")
    arr = queue.jobs["arr"]
    records = by_id(parse_scontrol(queue.text))
    assert "ArrayTaskId=2-3%2" in queue.text
    rest = records[f"{arr}_[2-3%2]"]
    assert (rest.is_range, rest.tasks, rest.state, rest.reason, rest.node) == (True, (2, 3), "PENDING",
                                                                               "JobArrayTaskLimit", "")
    assert records[queue.jobs["after"]].reason == "Dependency" and records[f"{arr}_0"].node == "vm"


def test_a_node_failure_and_a_memory_kill_and_no_node_yet_as_scontrol_prints_them():
    records = by_id(parse_scontrol(capture("scontrol_hand_written.txt").text))
    assert (records["201"].state, records["201"].reason, records["201"].node) == ("NODE_FAIL", "NodeDown",
                                                                                  "gpu-node-03")
    assert (records["202"].state, records["202"].exit_code) == ("OUT_OF_MEMORY", "0:125")
    assert (records["208"].state, records["208"].node) == ("PENDING", "")  # NodeList=(null)


def test_scontrol_output_without_a_job_is_nothing():
    assert parse_scontrol("") == [] and parse_scontrol("\n") == []
    assert parse_scontrol("slurm_load_jobs error: Invalid job id specified\n") == []


# ------------------------------------------------------------------------------------------------ the commands


def test_the_commands_ask_for_the_format_the_parsers_read():
    assert slurm_parsers.sacct_command(["12", "7"]) == [
        "sacct", "--jobs", "12,7", "--allocations", "--noheader", "--parsable2",
        "--format=JobID,JobName,State,Elapsed,NodeList,ExitCode,Reason"]
    assert slurm_parsers.squeue_command(["12"]) == ["squeue", "--noheader", "--array", "--jobs", "12",
                                                    "--format=%i|%T|%M|%N|%r"]
    assert slurm_parsers.scontrol_command("12") == ["scontrol", "--oneliner", "show", "job", "12"]
    for name in FIXTURES.glob("*.txt"):  # every fixture was made with those commands (but the one about steps)
        command = next(line[4:].split()[0] for line in name.read_text().splitlines() if line.startswith("# $ "))
        argv = {"sacct": slurm_parsers.sacct_command(["X"]), "squeue": slurm_parsers.squeue_command(["X"]),
                "scontrol": slurm_parsers.scontrol_command("X")}[command]
        flags = [arg for arg in argv[1:] if arg.startswith("-") and not (name.stem == "sacct_steps" and
                                                                         arg == "--allocations")]
        assert all(flag in name.read_text() for flag in flags), name.name


# ------------------------------------------------------------------------------------------------ into status rows


class Replay:
    """A login node that answers sacct, squeue and scontrol with fixture files, and has no logs."""

    def __init__(self, sacct: str | None, squeue: str | None, scontrol: str | None):
        self.answers = {"sacct": sacct, "squeue": squeue, "scontrol": scontrol}
        self.asked: list[str] = []

    def run(self, argv: list[str], timeout: float = 120.0) -> Result:
        self.asked.append(argv[0])
        if argv[0] not in self.answers:
            return Result(0, "", "")
        name = self.answers[argv[0]]
        if name is None:
            return Result(1, "", f"{argv[0]}: error: Slurm accounting storage is disabled")
        return Result(0, capture(name).text, "")


def status_of(remote: Replay, jobs: dict[str, str], arrays: dict[str, str], use_sacct: bool = True
              ) -> tuple[dict[tuple[str, int | None], jobstate.TaskState], str]:
    record = RunRecord(run_id="r", host="local", address="127.0.0.1", remote_dir="/runs/r",
                       jobs=[RecordedJob(name=name, id=job_id, array=arrays.get(name))
                             for name, job_id in jobs.items()])
    rows, source = jobstate.query(remote, record, use_sacct=use_sacct)  # type: ignore[arg-type]
    return {(row.name, row.task): row for row in rows}, source


def test_status_from_accounting_fills_each_throttled_task_from_its_own_record_or_the_range():
    jobs = capture("sacct_queue.txt").jobs
    remote = Replay("sacct_queue.txt", "squeue_queue.txt", "scontrol_queue.txt")
    rows, source = status_of(remote, jobs, {"arr": "0-3%2"})
    # accounting knew every job; the queue is asked once, as `bad` FAILED (were it requeued, the queue would hold it)
    assert source == "sacct" and remote.asked.count("squeue") == 1 and remote.asked.count("scontrol") == 0
    assert [rows[("arr", task)].state for task in range(4)] == ["RUNNING", "RUNNING", "PENDING", "PENDING"]
    assert rows[("arr", 3)].reason == "JobArrayTaskLimit" and rows[("bad", None)].exit_code == "3:0"


def test_a_range_record_never_overrides_a_tasks_own_record_whatever_the_order():
    jobs = capture("sacct_queue.txt").jobs
    lag = capture("sacct_accounting_lags.txt").text.replace("91_", f"{jobs['arr']}_")
    text = lag + capture("sacct_queue.txt").text  # the range of all four tasks first, then their own records

    class Lagging(Replay):
        def run(self, argv: list[str], timeout: float = 120.0) -> Result:
            return Result(0, text, "") if argv[0] == "sacct" else super().run(argv, timeout)

    rows, _ = status_of(Lagging(None, None, None), jobs, {"arr": "0-3%2"})
    assert [rows[("arr", task)].state for task in range(4)] == ["RUNNING", "RUNNING", "PENDING", "PENDING"]


def test_status_without_accounting_reads_the_queue_then_slurmctld_for_jobs_that_left_it():
    jobs = capture("scontrol_ended.txt").jobs
    remote = Replay(None, "squeue_ended.txt", "scontrol_ended.txt")
    rows, source = status_of(remote, jobs, {"arr": "0-3%2", "mixed": "0-2"})
    assert source == "squeue" and remote.asked.count("scontrol") == len(jobs)
    states = {key: (row.state, row.exit_code) for key, row in rows.items()}
    assert states[("slow", None)] == ("TIMEOUT", "0:15") and states[("long", None)] == ("CANCELLED", "0:15")
    assert [states[("mixed", task)] for task in range(3)] == [("COMPLETED", "0:0"), ("FAILED", "1:0"),
                                                              ("FAILED", "2:0")]
    assert jobstate.summary(list(rows.values())) == "FAILED"


@pytest.mark.parametrize("use_sacct", [True, False], ids=["sacct", "squeue"])
def test_both_sources_agree_on_how_the_jobs_ended(use_sacct):
    jobs = capture("sacct_ended.txt").jobs
    remote = Replay("sacct_ended.txt", "squeue_ended.txt", "scontrol_ended.txt")
    rows, _ = status_of(remote, jobs, {"arr": "0-3%2", "mixed": "0-2"}, use_sacct=use_sacct)
    assert {key: row.state for key, row in rows.items()} == {
        ("ok", None): "COMPLETED", ("bad", None): "FAILED", **{("arr", t): "COMPLETED" for t in range(4)},
        ("after", None): "COMPLETED", ("later", None): "CANCELLED", ("held", None): "CANCELLED",
        ("queued", None): "COMPLETED", ("slow", None): "TIMEOUT", ("long", None): "CANCELLED",
        ("rq", None): "CANCELLED", ("mixed", 0): "COMPLETED", ("mixed", 1): "FAILED", ("mixed", 2): "FAILED"}


# ------------------------------------------------------------------------------------------------ what status says


def record_of(jobs: dict[str, str], arrays: dict[str, str] | None = None, after: dict[str, list[str]] | None = None,
              after_each: dict[str, list[str]] | None = None, submitted: str = "") -> RunRecord:
    arrays, after, after_each = arrays or {}, after or {}, after_each or {}
    return RunRecord(run_id="r", host="local", address="127.0.0.1", remote_dir="/runs/r", submitted=submitted,
                     jobs=[RecordedJob(name=name, id=job_id, array=arrays.get(name),
                                       after=[jobs[other] for other in after.get(name, [])],
                                       after_each=[jobs[other] for other in after_each.get(name, [])])
                           for name, job_id in jobs.items()])


def test_a_dependency_reason_is_told_from_the_jobs_it_waited_for():
    """SLURM keeps Reason=Dependency until its next scheduling pass after the jobs waited for ended, and
    DependencyNeverSatisfied names none: status says whether the job is starting, really waits, or never starts,
    and how to cancel what never starts (the whole job, or the one array task an aftercorr failure blocks)."""
    sacct = capture("sacct_dependency_hand_written.txt")
    jobs = sacct.jobs
    record = record_of(jobs, arrays={"decode": "0-2", "annotate": "0-2"},
                       after={"annotate": ["decode"], "dataset": ["annotate"], "infer": ["train"], "test": ["infer"],
                              "after": ["prep"]},
                       after_each={"annotate": ["decode"]})
    parsed = by_id(parse_sacct(sacct.text))
    assert parsed[f"{jobs['infer']}"].reason == slurm_parsers.NEVER_SATISFIED
    assert parsed[f"{jobs['after']}"].reason == slurm_parsers.WAITS_FOR_DEPENDENCY
    remote = Replay("sacct_dependency_hand_written.txt", "squeue_dependency_hand_written.txt", None)
    rows, source = jobstate.query(remote, record)  # type: ignore[arg-type]
    reasons = {(row.name, row.task): row.reason for row in rows}
    assert source == "sacct" and remote.asked.count("squeue") == 1  # train FAILED: is it back in the queue? no
    assert reasons[("after", None)] == "starting: prep completed (SLURM says Dependency until its next scheduling pass)"
    assert reasons[("annotate", 0)].startswith("starting: decode completed")  # aftercorr: its own decode task
    assert reasons[("annotate", 2)] == "Dependency"  # decode task 2 still runs: it really waits
    assert reasons[("annotate", 1)] == ("never starts (Dependency): decode FAILED did not complete; cancel it: "
                                        f"snowpipe cancel r {jobs['annotate']}_1 --yes")  # that task, not the array
    assert reasons[("dataset", None)] == ("never starts (Dependency): annotate never starts; cancel it: snowpipe "
                                          "cancel r dataset --yes")
    assert reasons[("infer", None)] == ("never starts (DependencyNeverSatisfied): train FAILED did not complete; "
                                        "cancel it: snowpipe cancel r infer --yes")
    assert reasons[("test", None)].startswith("never starts (Dependency): infer never starts")
    assert {row.state for row in rows if row.name in ("annotate", "dataset", "infer", "test", "after")} == {"PENDING"}
    old = record_of(jobs, arrays={"decode": "0-2", "annotate": "0-2"})  # a record without dependencies: SLURM's word
    rows, _ = jobstate.query(Replay("sacct_dependency_hand_written.txt", None, None), old)  # type: ignore[arg-type]
    assert {row.reason for row in rows if row.state == "PENDING"} == {"Dependency", (
        "never starts (DependencyNeverSatisfied): a job it waited for did not complete; cancel it: snowpipe cancel r "
        "infer --yes")}


class Silent(Replay):
    """A login node where sacct knows nothing yet (exit 0, no line) and squeue knows no such job."""

    def run(self, argv: list[str], timeout: float = 120.0) -> Result:
        self.asked.append(argv[0])
        if argv[0] == "squeue":  # as recorded in squeue_unknown_id.txt
            return Result(1, "", "slurm_load_jobs error: Invalid job id specified")
        return Result(0, "", "")


def test_a_job_no_source_lists_yet_is_submitted_not_failed_and_one_forgotten_long_ago_is_unknown():
    jobs = {"decode": "501", "annotate": "502"}
    now = datetime(2026, 12, 1, 14, 0, 0, tzinfo=timezone.utc)
    fresh = record_of(jobs, arrays={"annotate": "0-1"}, submitted=(now - timedelta(seconds=20)).isoformat())
    rows, _ = jobstate.query(Silent(None, None, None), fresh, now=now)  # type: ignore[arg-type]
    assert {row.state for row in rows} == {jobstate.SUBMITTED} and len(rows) == 3
    assert rows[0].reason == "submitted 20 s ago; SLURM does not list it yet"
    assert jobstate.summary(rows) == "PENDING" and jobstate.exit_code(rows) == jobstate.STILL_RUNNING
    assert not any(row.done for row in rows)  # `snowpipe status --watch` and check-submission wait for it
    # A job added to the run later carries its own submission time: the run's is old, the job's is not.
    added = fresh.model_copy(update={"submitted": (now - timedelta(days=2)).isoformat(), "jobs": [
        fresh.jobs[0], fresh.jobs[1].model_copy(update={"submitted": (now - timedelta(seconds=5)).isoformat()})]})
    rows, _ = jobstate.query(Silent(None, None, None), added, now=now)  # type: ignore[arg-type]
    assert [row.state for row in rows] == ["UNKNOWN", jobstate.SUBMITTED, jobstate.SUBMITTED]
    assert jobstate.exit_code(rows) == jobstate.STILL_RUNNING
    stale = record_of(jobs, submitted=(now - timedelta(seconds=jobstate.LISTED_WITHIN_S + 1)).isoformat())
    rows, _ = jobstate.query(Silent(None, None, None), stale, now=now)  # type: ignore[arg-type]
    assert {row.state for row in rows} == {"UNKNOWN"} and jobstate.exit_code(rows) == 1


def test_accounting_right_after_submission_never_makes_a_running_array_failed():
    """The recorded lag (sacct: one PENDING range; the queue runs two tasks): running and pending as the queue
    says, never failed."""
    arr = capture("sacct_accounting_lags.txt").jobs["arr"]
    remote = Replay("sacct_accounting_lags.txt", "squeue_accounting_lags.txt", None)
    rows, _ = status_of(remote, {"arr": arr}, {"arr": "0-3%2"})
    states = sorted(row.state for row in rows.values())
    assert states == ["PENDING", "PENDING", "RUNNING", "RUNNING"] and jobstate.exit_code(list(rows.values())) == 3


def test_a_job_accounting_calls_ended_but_the_queue_holds_again_is_pending():
    """A node failure requeued the job: accounting still says NODE_FAIL, the queue has it PENDING again (the
    recorded squeue_requeued.txt). The queue wins; the exit code of the first start is not shown."""
    jobs = capture("sacct_requeue_lags_hand_written.txt").jobs
    assert parse_sacct(capture("sacct_requeue_lags_hand_written.txt").text)[0].state == "NODE_FAIL"
    remote = Replay("sacct_requeue_lags_hand_written.txt", "squeue_requeued.txt", "scontrol_requeued.txt")
    rows, source = status_of(remote, jobs, {})
    row = rows[("rq", None)]
    assert source == "sacct" and (row.state, row.reason, row.exit_code) == ("PENDING", "BeginTime", "")
    assert jobstate.summary([row]) == "PENDING" and jobstate.exit_code([row]) == jobstate.STILL_RUNNING
    gone = Replay("sacct_requeue_lags_hand_written.txt", "squeue_ended.txt", None)  # not in the queue: it ended
    rows, _ = status_of(gone, jobs, {})
    assert rows[("rq", None)].state == "NODE_FAIL" and jobstate.exit_code(list(rows.values())) == 1
