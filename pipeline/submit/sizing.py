"""How a stage's scenes become array tasks and array jobs within the cluster's limits.

Scenes per task are the job spec's (`scenes_per_task: 0`: the most whose estimate stays within half the time
limit), raised together when the run's tasks would pass the user's MaxSubmitJobs (pending array tasks count
against it); a stage of more tasks than MaxArraySize becomes consecutive array jobs, its chunks, named
`{job}.{k}`. Dependencies between chunks keep the meaning of those between the stage jobs: task by task where
chunk k of both stages holds the same scenes in the same order, else on every chunk that holds one of its scenes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pipeline.cluster_facts import DEFAULT_MAX_ARRAY_SIZE  # SLURM's default MaxArraySize: indices 0-1000
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Limits:
    """The cluster's limits a run is fitted to, and where each came from (for messages)."""

    max_array_size: int = DEFAULT_MAX_ARRAY_SIZE
    max_submit_jobs: int | None = None
    array_source: str = "SLURM's default"
    submit_source: str = ""


def largest_within(minutes: Callable[[int], float], budget: float, most: int) -> int:
    """The largest n in 1..most with minutes(n) <= budget (1 when even one scene passes it); minutes grows with n."""
    low, high = 1, max(most, 1)
    if minutes(low) > budget:
        return 1
    while low < high:
        middle = (low + high + 1) // 2
        if minutes(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def task_count(scenes: int, per_task: int) -> int:
    return -(-scenes // per_task) if scenes else 0


def fit_submit_limit(scenes: Mapping[str, int], per_task: Mapping[str, int], single_jobs: int,
                     limit: int) -> dict[str, int]:
    """Scenes per task for each array job so that the run's tasks (array tasks plus `single_jobs`) are at most
    `limit`: a floor common to every array job, the smallest that fits, so that arrays whose tasks lined up
    (decode and annotate) still do. Unchanged when they fit; ConfigError when one task per array cannot fit."""
    def total(floor: int) -> int:
        return single_jobs + sum(task_count(n, max(per_task[name], floor)) for name, n in scenes.items())

    if total(1) <= limit:
        return dict(per_task)
    most = max(scenes.values(), default=1)
    if total(most) > limit:
        raise ConfigError(f"the run needs at least {total(most)} jobs (one task per array, {single_jobs} other "
                          f"job(s)), above MaxSubmitJobs {limit}: submit fewer jobs at once (-e job=NAME for part of "
                          f"the pipeline) or ask the cluster's administrators for a higher limit")
    low, high = 1, most
    while low < high:
        middle = (low + high) // 2
        if total(middle) <= limit:
            high = middle
        else:
            low = middle + 1
    return {name: max(per_task[name], low) for name in scenes}


def split(tasks: Sequence[str], size: int) -> list[list[str]]:
    """Consecutive chunks of at most `size` tasks ([[]] for a job that is not an array)."""
    return [list(tasks[i:i + size]) for i in range(0, len(tasks), size)] or [[]]


def chunk_name(job: str, index: int, chunks: int) -> str:
    """`{job}.{k}` (k from 1) for a stage split in several array jobs; the job's own name when it is one."""
    return job if chunks == 1 else f"{job}.{index + 1}"


@dataclass(frozen=True)
class Chunk:
    """One array job of a stage job (or the whole job), as the dependencies of later jobs need it."""

    name: str
    index: int
    tasks: list[str]  # array task i's scene ids, comma-separated

    @property
    def scenes(self) -> set[str]:
        return {scene for task in self.tasks for scene in task.split(",")}


def chunk_dependencies(tasks: list[str], index: int, after: Sequence[str], after_each: Sequence[str],
                       chunks: Mapping[str, list[Chunk]]) -> tuple[list[str], list[str]]:
    """The chunk names one chunk waits for (after) and those of them it waits for task by task (after_each).

    after_each: task by task on chunk `index` of that stage where its first tasks are this chunk's (task i of
    both is the same scene); otherwise as `after`. after, for an array chunk: every chunk of that stage holding
    one of its scenes (a scene waits for its own), all of them when none does; for a single job: all of them."""
    waits: list[str] = []
    each: list[str] = []
    mine = {scene for task in tasks for scene in task.split(",")} if tasks else set()
    for name in after:
        theirs = chunks[name]
        if name in after_each and tasks and index < len(theirs) and theirs[index].tasks[:len(tasks)] == tasks:
            waits.append(theirs[index].name)
            each.append(theirs[index].name)
            continue
        sharing = [chunk.name for chunk in theirs if mine & chunk.scenes] if mine else []
        waits.extend(sharing or [chunk.name for chunk in theirs])
    return waits, each
