"""Job specs (`jobs/*.yml`): which stages a SLURM job runs, with which resources, after which jobs.

A spec file holds `jobs:`, a list of jobs. An entry either defines a job in full or says `use: NAME`
to take the job of `jobs/NAME.yml` (with any field overridden), so `pipeline.yml` chains the per-stage
jobs without repeating them. Resources come in layers, later wins: built-in defaults, the inventory's
`snowpipe_job_defaults`, the job spec, the inventory's `snowpipe_job_overrides` (per job name or `"*"`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import ConfigError
from pipeline.registry import PER_SCENE, STAGES

CLUSTER_STAGES = tuple(name for name, stage in STAGES.items() if stage.runs_on_cluster)
TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
MEMORY = re.compile(r"^\d+[KMGT]?$")


class Resources(BaseModel):
    """What one job asks SLURM for; None = leave it to the cluster (or the layer below)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    partition: str | None = None
    account: str | None = None
    time: str | None = None               # SLURM time: MM, HH:MM:SS, D-HH:MM:SS
    cpus: Annotated[int, Field(ge=1, le=1024)] | None = None        # CPUs per task
    memory: str | None = None             # per node, e.g. 16G
    gpus: Annotated[int, Field(ge=0, le=64)] | None = None
    gpu_type: str | None = None           # e.g. rtx_3090 -> gpu:rtx_3090:N
    gres: list[str] | None = None         # extra generic resources, e.g. [gpumem:20g]
    tmp: str | None = None                # node-local scratch, e.g. 50G
    throttle: Annotated[int, Field(ge=1)] | None = None             # array tasks at once: %N
    modules: list[str] | None = None      # `module load` these
    setup: list[str] | None = None        # shell lines run before the stages (e.g. source an env)
    mail_type: str | None = None          # e.g. END,FAIL
    mail_user: str | None = None
    constraint: str | None = None
    stage_inputs: bool | None = None      # copy the stages' inputs to node-local $TMPDIR first
    requeue_limit: Annotated[int, Field(ge=0, le=100)] | None = None  # requeues after a time-limit signal
    # array jobs: scenes per array task (the model loaded once for several scenes; fewer, longer tasks);
    # 0: as many as the cost model (pipeline/submit/cost.py) fits in half the time limit
    scenes_per_task: Annotated[int, Field(ge=0, le=10000)] | None = None  # 0: from the cost model

    @field_validator("time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None and not TIME.match(value):
            raise ValueError(f"expected a SLURM time such as 04:00:00 or 1-00:00:00, got {value!r}")
        return value

    @field_validator("memory", "tmp")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None and not MEMORY.match(value):
            raise ValueError(f"expected a size such as 16G or 4000M, got {value!r}")
        return value


RESOURCE_KEYS = tuple(Resources.model_fields)
BUILT_IN = Resources(time="04:00:00", cpus=1, memory="4G", gpus=0, gres=[], modules=[], setup=[],
                     stage_inputs=False, requeue_limit=3)


class JobEntry(Resources):
    name: str | None = None
    use: str | None = None                # take jobs/<use>.yml's job, then apply this entry's fields
    stages: list[str] | None = None       # stages of the registry that run on a cluster, in any order
    after: list[str] = []                 # job names this one waits for (afterok)
    after_each: list[str] = []            # array jobs whose task i this array's task i waits for (aftercorr)
    array: bool | None = None             # one array task per scene (per-scene stages only)
    description: str | None = None


class JobFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    description: str | None = None
    jobs: Annotated[list[JobEntry], Field(min_length=1)]


class Job(BaseModel):
    """A resolved job: what the planner renders into one batch script."""

    name: str
    stages: list[str]
    after: list[str]  # every job it waits for, after_each included
    array: bool
    after_each: list[str] = []
    resources: Resources
    description: str = ""


def _problems(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key; valid keys: {', '.join(RESOURCE_KEYS + tuple(JobEntry.model_fields))}")
        else:
            lines.append(f"{where}: {error['msg']}")
    return "\n  ".join(lines)


def read_job_file(path: Path) -> JobFile:
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yml"))
        raise ConfigError(f"job spec {path} not found; job specs in {path.parent}: {', '.join(known) or 'none'}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    try:
        return JobFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path} is invalid:\n  {_problems(exc)}") from None


def parse_resources(data: Any, source: str) -> Resources:
    """Inventory resource layers (`snowpipe_job_defaults`, one entry of `snowpipe_job_overrides`)."""
    try:
        return Resources.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(f"{source} is invalid:\n  {_problems(exc)}") from None


def _layer(base: Resources, top: Resources) -> Resources:
    return base.model_copy(update={k: v for k, v in top.model_dump().items() if v is not None and k in RESOURCE_KEYS})


def _entry_fields(entry: JobEntry) -> dict[str, Any]:
    return {k: v for k, v in entry.model_dump(exclude={"use"}).items()
            if v is not None and (k not in ("after", "after_each") or v)}


def load_jobs(jobs_dir: Path, spec: str, defaults: Resources | None = None,
              overrides: dict[str, Resources] | None = None) -> list[Job]:
    """The jobs of `jobs/<spec>.yml`, resources layered, names unique, `after` pointing backwards."""
    path = jobs_dir / (spec if spec.endswith(".yml") else f"{spec}.yml")
    entries: list[dict[str, Any]] = []
    for entry in read_job_file(path).jobs:
        fields = _entry_fields(entry)
        if entry.use:
            used = read_job_file(jobs_dir / f"{entry.use}.yml").jobs
            if len(used) != 1 or used[0].use:
                raise ConfigError(f"{path}: `use: {entry.use}` needs jobs/{entry.use}.yml to define exactly one job")
            fields = {**_entry_fields(used[0]), **fields}
            fields.setdefault("name", entry.use)
        entries.append(fields)
    overrides = overrides or {}
    jobs: list[Job] = []
    for fields in entries:
        name = fields.get("name")
        if not name or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", name):
            raise ConfigError(f"{path}: every job needs a `name` of letters, digits, '-' or '_' (got {name!r})")
        if not fields.get("stages"):
            raise ConfigError(f"{path}: job {name} lists no `stages`")
        if any(job.name == name for job in jobs):
            raise ConfigError(f"{path}: two jobs are named {name}")
        for before in fields.get("after", []):
            if not any(job.name == before for job in jobs):
                raise ConfigError(f"{path}: job {name} runs after {before!r}, which is not a job listed before it")
        array = bool(fields.get("array", False))
        for before in fields.get("after_each", []):
            earlier = next((job for job in jobs if job.name == before), None)
            if earlier is None or not earlier.array or not array:
                raise ConfigError(f"{path}: job {name} has `after_each: [{before}]`, which needs both jobs to be "
                                  f"arrays over scenes and {before!r} listed before it; use `after` otherwise")
        unknown = [stage for stage in fields["stages"] if stage not in CLUSTER_STAGES]
        if unknown:
            raise ConfigError(f"{path}: job {name} runs {', '.join(map(repr, unknown))}; stages a job can run: "
                              f"{', '.join(CLUSTER_STAGES)}")
        if array and not all(stage in PER_SCENE for stage in fields["stages"]):
            raise ConfigError(f"{path}: job {name} is an array over scenes, so its stages must be per-scene stages "
                              f"({', '.join(PER_SCENE)}); got {', '.join(fields['stages'])}")
        resources = _layer(BUILT_IN, defaults or Resources())
        resources = _layer(resources, Resources.model_validate({k: v for k, v in fields.items() if k in RESOURCE_KEYS}))
        for key in ("*", name):
            if key in overrides:
                resources = _layer(resources, overrides[key])
        after_each = list(fields.get("after_each", []))
        after = [*fields.get("after", []), *(name for name in after_each if name not in fields.get("after", []))]
        jobs.append(Job(name=name, stages=fields["stages"], after=after, after_each=after_each, array=array,
                        resources=resources, description=fields.get("description", "")))
    return jobs
