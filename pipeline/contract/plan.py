"""The submission plan as types: what `snowpipe plan --json` prints, Ansible hands to its roles and the
template, and the local runner reads back from `plan.json`.

One model per level (plan, job, stage command, staged folder) with `extra="forbid"`, so a key a consumer
expects cannot silently disappear or be misspelt on one side. `schema` versions the file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from pipeline.contract import formats

Mode = Literal["cluster", "dry_run", "local_run"]
SbatchValue = str | int | None  # None: a flag without a value (--requeue)


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SyncedFolder(Model):
    """A laptop folder rsync sends to the cluster's shared data folder."""

    name: str
    source: str
    dest: str
    files: int
    bytes: int


class StagedFolder(Model):
    """A config folder a stage reads, copied to node-local scratch first (outputs are never staged)."""

    name: str
    source: str
    task_filters: list[str] = []  # array task i stages only what task_filters[i] lets through


class ConfigOverride(Model):
    """`--set KEY=$SCRATCH/FOLDER`: the stage reads the staged copy instead of the shared one."""

    key: str
    scratch: str


class StageCommand(Model):
    stage: str
    args: list[str]
    processes: int = Field(ge=1)  # > 1: one process per GPU (srun, or torchrun in a local run)
    staged: list[StagedFolder] = []
    sets: list[ConfigOverride] = []
    verify_data: bool = False      # check the synced data it reads against the run's manifest first


class JobEstimate(Model):
    """What one job will cost by the cost model (pipeline/submit/cost.py): allocated CPU and GPU hours are the
    job's cpus or GPUs x the estimated minutes per task x its tasks."""

    tasks: int = Field(ge=1)
    scenes_per_task: int = Field(ge=0)   # 0: the job is not an array over scenes
    minutes_per_task: float = Field(ge=0)
    time_limit_minutes: float | None     # the job's --time (None: the cluster's default)
    cpu_hours: float = Field(ge=0)
    gpu_hours: float = Field(ge=0)
    # Where the minutes come from: "cost model" (docs/benchmarks.md), or "run RUN" when a finished run of this
    # stage on the same cluster measured them (`snowpipe report` of that run; pipeline/submit/learned.py).
    source: str = "cost model"


class RunEstimate(Model):
    """The run's bill before it is spent: hours allocated over every job, decoded rasters' disk, bytes to sync."""

    cpu_hours: float = Field(ge=0)
    gpu_hours: float = Field(ge=0)
    decoded_bytes: int = Field(ge=0)
    sync_bytes: int = Field(ge=0)
    warnings: list[str] = []             # a task's estimate past its time limit, scenes per task raised, ...


class PlannedJob(Model):
    name: str
    description: str = ""
    stages: list[str]
    after: list[str] = []          # names of jobs this one waits for (afterok, or aftercorr for after_each)
    after_each: list[str] = []     # those of `after` whose array task i it waits for task by task (aftercorr)
    array: str | None = None       # "0-N" for a job array
    array_size: int = 0
    script: str                    # where the batch script lies on the cluster
    render_path: str               # where Ansible renders it (the same path, or build/dry-run/... for a dry run)
    sbatch: dict[str, SbatchValue]
    sbatch_lines: list[str]
    modules: list[str] = []
    setup: list[str] = []
    stage_inputs: bool = False
    scene_ids: list[str] = []      # array task i processes scene_ids[i] (comma-separated with scenes_per_task)
    scenes_per_task: int = 0       # scenes per array task (0: not an array)
    chunk_of: str | None = None    # `{job}.{k}` is chunk k of stage job `{job}` (an array past MaxArraySize)
    requeue_limit: int = 0
    submit_display: str
    commands: list[StageCommand]
    estimate: JobEstimate

    @property
    def log(self) -> str:
        return str(self.sbatch["output"])


class BatchFormats(Model):
    """The cross-language formats of contract/formats.py, as the template and the playbooks read them."""

    requeue_exit_code: int = formats.EXIT_RETRY
    exit_marker_printf: str = formats.EXIT_MARKER_PRINTF
    exit_marker_suffix: str = formats.EXIT_MARKER_SUFFIX
    log_folder: str = formats.LOG_FOLDER
    dependency_flag: str = formats.DEPENDENCY_FLAG
    dependency_all: str = formats.DEPENDENCY_ALL
    dependency_each: str = formats.DEPENDENCY_EACH
    dependency_separator: str = formats.DEPENDENCY_SEPARATOR
    dependency_join: str = formats.DEPENDENCY_JOIN
    dependency_extra: list[str] = list(formats.DEPENDENCY_EXTRA)
    transient_files: list[str] = list(formats.TEMPORARY_FILES)
    progress_file_env: str = formats.PROGRESS_FILE_ENV


class Plan(Model):
    schema_version: int = Field(formats.PLAN_SCHEMA, alias=formats.SCHEMA_KEY)
    run_id: str = Field(pattern=f"^{formats.RUN_ID_PATTERN}$")
    mode: Mode
    host: str
    spec: str
    remote_root: str
    run_dir: str
    render_dir: str
    data_root: str | None
    code_dir: str
    config_json: str
    data_manifest: str | None      # what was synced, checked on the node (None: a local run reads this machine's)
    config_source: str
    python: str
    venv: str | None
    commit: str
    dirty: bool
    config_hash: str
    submission_key: str            # code + job spec + config + data: the same key while queued = a duplicate
    config: dict[str, JsonValue]   # the frozen config (config.json), versioned by its own `schema` key
    sync: list[SyncedFolder]
    decoded_dir: str | None = None  # where the decode stage writes (shared by runs), when a job decodes
    decoded_bytes: int = 0          # the most its rasters take: uint16 at native resolution, before ZSTD
    formats: BatchFormats = BatchFormats()
    max_array_size: int = Field(ge=1)   # the cluster's MaxArraySize the arrays were split for (chunks)
    max_submit_jobs: int | None = None  # the user's MaxSubmitJobs the run's tasks were fitted to (None: unknown)
    estimate: RunEstimate
    jobs: list[PlannedJob]

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=1)

    def job(self, name: str) -> PlannedJob:
        return next(job for job in self.jobs if job.name == name)
