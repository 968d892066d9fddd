"""The submission plan: everything Ansible needs to stage, render and submit one run, computed once.

`snowpipe plan` prints it as JSON; the Ansible roles only move files and call sbatch. Keeping the
decisions here (remote layout, frozen config, array sizes, sbatch options, launch commands) makes them
testable without a cluster and the same for a real submission, a dry run and a local run.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import rasterio
from pydantic import JsonValue
from rasterio.errors import RasterioError

from pipeline.bands import BANDS
from pipeline.config import PipelineConfig, check_data_folders
from pipeline.contract import formats
from pipeline.contract.plan import (
    ConfigOverride,
    JobEstimate,
    Mode,
    Plan,
    PlannedJob,
    RunEstimate,
    SbatchValue,
    StageCommand,
    StagedFolder,
    SyncedFolder,
)
from pipeline.data.layout import EXOLABS_FOLDER, Scene, discover_scenes, find_auxiliary, select_dates
from pipeline.errors import ConfigError, DataError, SceneError
from pipeline.registry import STAGES, enabled, stage_dates
from pipeline.submit import cost, learned
from pipeline.submit.jobspec import Job, Resources, load_jobs, parse_resources
from pipeline.submit.sizing import (
    DEFAULT_MAX_ARRAY_SIZE,
    Chunk,
    Limits,
    chunk_dependencies,
    chunk_name,
    fit_submit_limit,
    largest_within,
    split,
)

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Target:
    """The cluster, as the inventory describes it (host variables prefixed `snowpipe_`)."""

    host: str
    remote_root: str
    python: str = "python3"
    venv: str | None = None
    gpu_request: Literal["gres", "gpus"] = "gres"
    defaults: Resources = field(default_factory=Resources)
    overrides: dict[str, Resources] = field(default_factory=dict)
    max_array_size: int | None = None   # the cluster's MaxArraySize where the inventory knows it
    max_submit_jobs: int | None = None  # the user's MaxSubmitJobs (QOS or association) where known

    @classmethod
    def from_vars(cls, host: str, variables: Mapping[str, object]) -> Target:
        """Inventory values are whatever YAML made of them: each is checked and named when wrong."""
        root = variables.get("snowpipe_remote_root")
        if not root or not str(root).startswith("/"):
            raise ConfigError(f"inventory host {host}: snowpipe_remote_root must be an absolute path on the cluster "
                              f"(got {root!r}); set it in the inventory, e.g. /cluster/scratch/$USER/snowpipe")
        requested = variables.get("snowpipe_gpu_request", "gres")
        if requested not in ("gres", "gpus"):
            raise ConfigError(f"inventory host {host}: snowpipe_gpu_request must be 'gres' (--gres=gpu:N) or "
                              f"'gpus' (--gpus=N), got {requested!r}")
        gpu_request: Literal["gres", "gpus"] = "gpus" if requested == "gpus" else "gres"
        venv = variables.get("snowpipe_venv")
        overrides = variables.get("snowpipe_job_overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"inventory host {host}: snowpipe_job_overrides must map job names (or '*') to "
                              f"resources")
        return cls(
            host=host,
            remote_root=str(root).rstrip("/"),
            python=str(variables.get("snowpipe_python") or "python3"),
            venv=str(venv) if venv else None,
            gpu_request=gpu_request,
            defaults=parse_resources(variables.get("snowpipe_job_defaults"), f"{host}: snowpipe_job_defaults"),
            overrides={name: parse_resources(value, f"{host}: snowpipe_job_overrides.{name}")
                       for name, value in overrides.items()},  # names: YAML keys, str() when a number
            max_array_size=_limit(host, variables, "snowpipe_max_array_size", "MaxArraySize"),
            max_submit_jobs=_limit(host, variables, "snowpipe_max_submit_jobs", "MaxSubmitJobs"),
        )


def _limit(host: str, variables: Mapping[str, object], key: str, what: str) -> int | None:
    """A positive whole number from the inventory (YAML or -e may give it as text); unset or "" = unknown."""
    value = variables.get(key)
    if value is None or value == "":
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ConfigError(f"inventory host {host}: {key} must be a whole number of at least 1, the cluster's "
                          f"{what} (got {value!r}); leave it unset to use what the cluster reports")
    return int(text)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def git_commit(root: Path = REPO_ROOT) -> tuple[str, bool]:
    """The checked-out commit and whether the tree has uncommitted changes ("unknown" outside git)."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True


def folder_size(path: Path) -> tuple[int, int, str]:
    """(files, bytes, fingerprint) below a folder, temporary files excluded: what rsync would consider. The
    fingerprint (paths, sizes, modification times) tells a resubmission of the same data from new data."""
    files = size = 0
    digest = hashlib.blake2b(digest_size=8)
    if path.is_dir():
        for item in sorted(path.rglob("*")):
            if item.is_file() and not item.name.endswith(".tmp") and ".snowpipe-tmp-" not in item.name:
                stat = item.stat()
                files += 1
                size += stat.st_size
                digest.update(f"{item.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return files, size, digest.hexdigest()


def submission_key(target: Target, commit: str, dirty: bool, spec: str, config: PipelineConfig,
                   data: list[str]) -> str:
    """What makes two submissions the same run: the cluster, code, job spec, every config value, the data sent."""
    identity = {"cluster": [target.host, target.remote_root], "commit": commit, "dirty": dirty, "spec": spec,
                "config": config.resolved(), "data": data}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def enabled_jobs(jobs: list[Job], config: PipelineConfig, spec: str) -> list[Job]:
    """Jobs with the stages the config enables; a job left without one is dropped and its dependents
    wait for what it waited for instead."""
    wanted = set(enabled(config))
    kept: list[Job] = []
    waits: dict[str, list[str]] = {}
    for job in jobs:
        after: list[str] = []
        for name in job.after:
            for before in waits.get(name, [name]):
                if before not in after:
                    after.append(before)
        stages = [stage for stage in job.stages if stage in wanted]
        if stages:
            each = [name for name in job.after_each if name not in waits]  # a dropped one's waits: afterok
            kept.append(job.model_copy(update={"stages": stages, "after": after, "after_each": each}))
        else:
            waits[job.name] = after
    if not kept:
        raise ConfigError(f"jobs/{spec}.yml: none of its stages is enabled in the config "
                          f"(enabled: {', '.join(sorted(wanted)) or 'none'}); set `enable: true` where needed")
    return kept


SceneScan = Callable[[list[str]], list[Scene]]


def scene_scanner(config: PipelineConfig) -> SceneScan:
    """discover_scenes for a date list, scanning extracted_data once for every list (each picks from it)."""
    found: list[list[Scene]] = []

    def scan(dates: list[str]) -> list[Scene]:
        if not found:
            found.append(discover_scenes(config.path("extracted_data"), config.tiles))
        return select_dates(found[0], config.path("extracted_data"), dates)

    return scan


def decoded_space(scenes: list[Scene]) -> int:
    """Bytes the decoded rasters of these scenes take at most: every band as uint16 at its native resolution
    (ZSTD saves about a third). The band sizes come from the first scene's headers: a tile's scenes share them."""
    if not scenes:
        return 0
    per_scene = 0
    with rasterio.Env():
        for band in BANDS:
            try:
                with rasterio.open(scenes[0].band_path(band)) as source:
                    per_scene += 2 * source.width * source.height
            except (RasterioError, SceneError):
                return 0  # the decode job names the file; the plan only estimates
    return per_scene * len(scenes)


def task_scenes(dates: list[str], per_task: int) -> list[str]:
    """Array task i's scenes, comma-separated (what `--scene` takes): `per_task` consecutive dates each."""
    return [",".join(dates[i:i + per_task]) for i in range(0, len(dates), per_task)]


def scene_order(scan: SceneScan, dates: list[str]) -> list[str]:
    """The scene ids of an array's tasks: the stage's own order where it lists dates or ids (decode lists
    annotate's first, so that task i of both is one scene and annotate may wait task by task), else by id.
    A sensing time stands for every tile's scene at that time, in id order."""
    scenes = scan(dates)
    if not dates:
        return [scene.id for scene in scenes]
    by_entry: dict[str, list[str]] = {}
    for scene in scenes:
        by_entry.setdefault(scene.id, []).append(scene.id)
        by_entry.setdefault(scene.date, []).append(scene.id)
    return list(dict.fromkeys(one for entry in dates for one in by_entry.get(entry, [])))


def array_dates(config: PipelineConfig, jobs: list[Job], scan: SceneScan) -> dict[str, list[str]]:
    """Per array job, the scenes of its tasks in order. Every stage of one array job runs on task i's scenes,
    so the stages must cover the same scenes in the same order: otherwise the job is refused, named."""
    found: dict[str, list[str]] = {}
    for job in jobs:
        if not job.array:
            continue
        lists = {stage: scene_order(scan, stage_dates(config, stage)) for stage in job.stages}
        first, dates = next(iter(lists.items()))
        for stage, other in lists.items():
            if other != dates:
                differ = sorted(set(dates) ^ set(other)) or ["the same scenes in another order"]
                raise ConfigError(
                    f"job {job.name}: its stages {first} and {stage} cover different scenes "
                    f"({len(dates)} and {len(other)}; differing: {', '.join(differ[:5])}"
                    f"{' ...' if len(differ) > 5 else ''}); split it into one job per stage in jobs/, "
                    f"or give both stages the same dates in the config")
        if not dates:
            raise DataError(f"job {job.name}: no scene to process in {config.path('extracted_data')}")
        found[job.name] = dates
    return found


def _gpu_options(resources: Resources, gpu_request: str) -> dict[str, str]:
    gres = list(resources.gres or [])
    options: dict[str, str] = {}
    if resources.gpus:
        kind = f"{resources.gpu_type}:" if resources.gpu_type else ""
        if gpu_request == "gpus":
            options["gpus"] = f"{kind}{resources.gpus}"
        else:
            gres.insert(0, f"gpu:{kind}{resources.gpus}")
    if gres:
        options["gres"] = ",".join(gres)
    return options


def sbatch_options(job: Job, run_id: str, run_dir: str, array_size: int | None,
                   gpu_request: str, name: str | None = None) -> dict[str, SbatchValue]:
    """#SBATCH options (name -> value; None for a flag), `name` for a chunk. Dependencies are added at submission."""
    r = job.resources
    options: dict[str, SbatchValue] = {
        "job-name": name or job.name,
        "comment": f"snowpipe run {run_id}",
        "output": formats.log_pattern(run_dir, array=bool(array_size)),
        "chdir": run_dir,
        "time": r.time,
        "cpus-per-task": r.cpus,
        "mem": r.memory,
        "nodes": 1,
        "open-mode": "append",
        "partition": r.partition,
        "account": r.account,
        "tmp": r.tmp,
        "constraint": r.constraint,
        "mail-type": r.mail_type,
        "mail-user": r.mail_user,
        **_gpu_options(r, gpu_request),
    }
    if array_size:
        options["array"] = f"0-{array_size - 1}" + (f"%{r.throttle}" if r.throttle else "")
    if "train" in job.stages:
        options["signal"] = "B:USR1@300"  # time to save last.pt before the time limit
        options["requeue"] = None
        if (r.gpus or 0) > 1:
            options["ntasks-per-node"] = r.gpus
    return {k: v for k, v in options.items() if v is not None or k == "requeue"}


def scene_filters(config: PipelineConfig, scenes: list[Scene]) -> dict[str, str]:
    """Per scene id, the rsync filters that stage only that scene (with its ExoLabs file and the auxiliary
    layers) out of extracted_data: an array task never copies the other scenes to its node."""
    auxiliaries = {tile: find_auxiliary(config.path("extracted_data"), tile).folder for tile in config.tiles}
    filters = {}
    for scene in scenes:
        auxiliary = auxiliaries.get(scene.tile)
        rules = [f"--include=/{scene.safe_dir.name}/***", *([f"--include=/{auxiliary.name}/***"] if auxiliary else [])]
        if scene.exolabs:
            rules += [f"--include=/{EXOLABS_FOLDER}/", f"--include=/{EXOLABS_FOLDER}/{scene.exolabs.name}"]
        filters[scene.id] = " ".join([*rules, "--exclude=*"])
    return filters


def merge_filters(filters: list[str]) -> str:
    """One array task's rsync filters for several scenes: every scene's includes, then one exclude."""
    rules: list[str] = []
    for rule in " ".join(filters).split():
        if rule != "--exclude=*" and rule not in rules:
            rules.append(rule)
    return " ".join([*rules, "--exclude=*"])


def _stage_command(stage: str, job: Job, paths: dict[str, str], config: PipelineConfig, tasks: list[str],
                   filters: Mapping[str, str]) -> StageCommand:
    """One stage of a job (or chunk): its arguments, processes, and the input folders copied to node-local
    scratch; an array's extracted_data per task (`tasks`: task i's scene ids), from each scene's `filters`."""
    processes = (job.resources.gpus or 0) if stage == "train" and (job.resources.gpus or 0) > 1 else 1
    staged: list[StagedFolder] = []
    sets: list[ConfigOverride] = []
    if job.resources.stage_inputs:
        for name, access in STAGES[stage].folders.items():
            if access == "w":  # outputs are published in place on shared storage, as they finish
                continue
            if name == "extracted_data" and stage != "decode" and config.decode.enable:
                continue  # the bands come from the decoded rasters, read in place; JPEG 2000 is not copied
            per_task = job.array and name == "extracted_data"
            staged.append(StagedFolder(name=name, source=paths[name], task_filters=[
                merge_filters([filters[scene] for scene in task.split(",")]) for task in tasks] if per_task else []))
            sets.append(ConfigOverride(key=f"paths.{name}", scratch=name))
    reads_synced = any(STAGES[stage].folders.get(name) == "r" for name in ("extracted_data", "annotated_masks"))
    return StageCommand(stage=stage, args=["stage", stage], processes=processes, staged=staged, sets=sets,
                        verify_data=reads_synced)


def shell_variable(name: str) -> str:
    """A job (or chunk) name as a shell variable: `annotate.2` -> `annotate_2`."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def submit_display(name: str, script: str, after: list[str], after_each: list[str]) -> str:
    """The sbatch call as a line of shell, job ids in variables: `train=$(sbatch ... afterok:$dataset ...)`."""
    whole = [f"${shell_variable(before)}" for before in after if before not in after_each]
    flags = " ".join(formats.dependency_args(whole, [f"${shell_variable(before)}" for before in after_each]))
    return f"{shell_variable(name)}=$(sbatch --parsable {flags + ' ' if flags else ''}{shlex.quote(script)})"


def sbatch_quote(value: SbatchValue) -> str:
    """A value as sbatch reads it from an #SBATCH line: double quotes, backslash escapes."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ConfigError(f"an sbatch option value may not contain a line break: {text!r}")
    if re.fullmatch(r"[A-Za-z0-9_.,:/%@+=-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sbatch_lines(options: dict[str, SbatchValue]) -> list[str]:
    """Sorted `--name=value` lines (flags without a value) for the script's header."""
    return [f"--{name}" if value is None else f"--{name}={sbatch_quote(value)}"
            for name, value in sorted(options.items())]


def frozen_config(config: PipelineConfig, data_root: str | None, run_dir: str,
                  scan: SceneScan | None = None) -> tuple[dict[str, JsonValue], dict[str, str]]:
    """The resolved config a job reads (data under the shared data folder, outputs in the run folder), and its
    paths as the stage commands need them."""
    frozen: dict[str, JsonValue] = config.frozen()
    if not config.dates and config.path("extracted_data").is_dir():
        # "every scene found" is decided here, on the data being sent: the shared data folder on the cluster
        # may hold scenes of other runs, and array task i must mean the same scene there as here.
        frozen["dates"] = [scene.id for scene in (scan or scene_scanner(config))([])]
    paths: dict[str, str] = {name: str(config.path(name)) for name in type(config.paths).model_fields}
    if data_root:
        paths["extracted_data"] = f"{data_root}/extracted_data"
        paths["annotated_masks"] = f"{data_root}/annotated_masks"
        paths["decoded"] = f"{data_root}/decoded"  # made on the cluster, beside the data it comes from
    paths["results"] = f"{run_dir}/results"
    paths["dataset"] = f"{run_dir}/results/dataset"
    paths["work"] = f"{run_dir}/work"
    frozen["paths"] = dict(paths)
    return frozen, paths


@dataclass(frozen=True)
class RunFolders:
    """Where a run lives: on the cluster (and rendered under build/ for a dry run), or on this machine."""

    root: str
    run_dir: str
    data_root: str | None  # the shared data folder on the cluster; None: this machine's data in place
    code_dir: str
    render_dir: str
    python: str
    venv: str | None


def run_folders(mode: Mode, target: Target, run_id: str, repo_root: Path, build_dir: Path) -> RunFolders:
    """The folder layout of each mode: the cluster's (a dry run renders it under build/ without sending), or for
    a local run this machine's data and code with a run folder under build/."""
    if mode != "local_run":
        root = target.remote_root
        run_dir = f"{root}/runs/{run_id}"
        return RunFolders(root, run_dir, f"{root}/data", f"{run_dir}/code",
                          str(build_dir / "dry-run" / run_id) if mode == "dry_run" else run_dir,
                          target.python, target.venv)
    root = str(build_dir / "local-run")
    run_dir = f"{root}/runs/{run_id}"
    return RunFolders(root, run_dir, None, str(repo_root), run_dir, sys.executable, None)


def checked_jobs(config: PipelineConfig, spec: str, target: Target, jobs_dir: Path) -> list[Job]:
    """The job spec's jobs with the config's stages, each able to run on a cluster, their input folders there."""
    jobs = enabled_jobs(load_jobs(jobs_dir, spec, target.defaults, target.overrides), config, spec)
    for job in jobs:
        for stage in job.stages:
            if not STAGES[stage].runs_on_cluster:
                raise ConfigError(f"job {job.name} runs stage {stage!r}, which never runs on a cluster")
    problems = check_data_folders(config, sorted({stage for job in jobs for stage in job.stages}))
    if problems:
        raise DataError("\n".join(problems))
    return jobs


def synced_folders(config: PipelineConfig, mode: Mode, data_root: str | None) -> tuple[list[SyncedFolder], list[str]]:
    """The folders sent to the cluster, with their sizes, and their fingerprints (what makes a resubmission the
    same data); nothing is sent for a local run."""
    sync: list[SyncedFolder] = []
    fingerprints: list[str] = []
    for name in ("extracted_data", "annotated_masks"):
        source = config.path(name)
        if mode != "local_run" and source.is_dir():
            files, total, fingerprint = folder_size(source)
            fingerprints.append(f"{name}:{fingerprint}")
            sync.append(SyncedFolder(name=name, source=f"{source}/", dest=f"{data_root}/{name}/", files=files,
                                     bytes=total))
    return sync, fingerprints


def cluster_limits(target: Target, repo_root: Path) -> Limits:
    """MaxArraySize and MaxSubmitJobs: the inventory's, else what the playbook's preflight read from the cluster
    (pipeline/cluster_facts.py, saved by the cluster probe), else SLURM's default MaxArraySize and no known
    MaxSubmitJobs."""
    facts: Mapping[str, object] = {}
    if target.max_array_size is None or target.max_submit_jobs is None:
        try:  # the probe's module (issue 25): without it, only the inventory and the default count
            from pipeline import cluster_facts
        except ImportError:
            pass
        else:
            facts = cluster_facts.load_facts(repo_root, target.host) or {}

    def fact(key: str) -> int | None:
        value = facts.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    array, array_source = target.max_array_size, "inventory snowpipe_max_array_size"
    if array is None:
        array, array_source = fact("max_array_size"), f"the cluster's MaxArraySize ({target.host})"
    if array is None:
        array, array_source = DEFAULT_MAX_ARRAY_SIZE, "SLURM's default MaxArraySize"
    submit, submit_source = target.max_submit_jobs, "inventory snowpipe_max_submit_jobs"
    if submit is None:
        submit, submit_source = fact("max_submit_jobs"), f"the cluster's MaxSubmitJobs ({target.host})"
    return Limits(array, submit, array_source, submit_source if submit else "")


def scene_megapixels(scenes: list[Scene]) -> dict[str, float]:
    """Per scene id, the megapixels of its 10 m grid (what the cost model counts), from the first scene of each
    tile's B02 header (a tile's scenes share it); 0 where no header can be read (the stage names the file)."""
    by_tile: dict[str, float] = {}
    found: dict[str, float] = {}
    with rasterio.Env():
        for scene in scenes:
            if scene.tile not in by_tile:
                try:
                    with rasterio.open(scene.band_path("B02")) as source:
                        by_tile[scene.tile] = source.width * source.height / 1e6
                except (RasterioError, SceneError):
                    by_tile[scene.tile] = 0.0
            found[scene.id] = by_tile[scene.tile]
    return found


@dataclass(frozen=True)
class Costing:
    """What the cost model needs of the run: the config, each scene's size, each stage's scenes."""

    config: PipelineConfig
    megapixels: dict[str, float]
    stage_scenes: dict[str, list[str]]
    # Per job name, the correction a finished run on this cluster measured (pipeline/submit/learned.py).
    measured: dict[str, learned.Measured] = field(default_factory=dict)

    def work(self, stage: str, tasks_scenes: list[str] | None) -> cost.Work:
        ids = tasks_scenes if tasks_scenes is not None else self.stage_scenes.get(stage, [])
        return cost.Work([self.megapixels.get(scene, 0.0) for scene in ids],
                         dataset_scenes=len(self.stage_scenes.get("dataset", [])))

    def minutes(self, job: Job, scenes: list[str] | None) -> float:
        """One task of `job` over `scenes` (an array task), or over each stage's own scenes (None)."""
        r = job.resources
        minutes = cost.task_minutes(job.stages, self.config, {stage: self.work(stage, scenes) for stage in job.stages},
                                    cpus=r.cpus or 1, gpus=r.gpus or 0)
        return minutes * self.measured[job.name].factor if job.name in self.measured else minutes

    def source(self, job: Job) -> str:
        """Where a job's minutes come from: a finished run on this cluster, or the cost model."""
        return self.measured[job.name].source if job.name in self.measured else "cost model"


def allocated(job: Job) -> tuple[int, int]:
    """CPUs and GPUs one task holds: cpus per process (one process per GPU when training on several)."""
    r = job.resources
    gpus = r.gpus or 0
    processes = gpus if "train" in job.stages and gpus > 1 else 1
    return (r.cpus or 1) * processes, gpus


def job_estimate(job: Job, tasks: list[str], costing: Costing) -> JobEstimate:
    """Minutes of the longest task, and the hours the job holds: CPUs or GPUs x each task's minutes."""
    minutes = [costing.minutes(job, task.split(",")) for task in tasks] if tasks else [costing.minutes(job, None)]
    cpus, gpus = allocated(job)
    per_task = job.resources.scenes_per_task or 1
    return JobEstimate(tasks=len(minutes), scenes_per_task=per_task if job.array else 0,
                       minutes_per_task=round(max(minutes), 2),
                       time_limit_minutes=cost.slurm_minutes(job.resources.time),
                       cpu_hours=round(cpus * sum(minutes) / 60, 4), gpu_hours=round(gpus * sum(minutes) / 60, 4),
                       source=costing.source(job))


def auto_scenes_per_task(job: Job, scenes: list[str], costing: Costing) -> int:
    """`scenes_per_task: 0`: the most scenes whose task the cost model puts at half the job's time limit or less
    (the largest scenes counted first); 1 without a time limit."""
    limit = cost.slurm_minutes(job.resources.time)
    if limit is None:
        return 1
    ordered = sorted(scenes, key=lambda scene: costing.megapixels.get(scene, 0.0), reverse=True)
    return largest_within(lambda count: costing.minutes(job, ordered[:count]), limit / 2, len(scenes))


def scenes_per_task(jobs: list[Job], dates: dict[str, list[str]], costing: Costing,
                    limits: Limits) -> tuple[list[Job], list[str]]:
    """Each array job with its scenes per task decided: the spec's, or (0) the most whose estimate is at most half
    the time limit; then raised together where the run's tasks would pass MaxSubmitJobs. With notes on what was
    decided. A raise that would take a task past its time limit is refused, saying what to change."""
    notes: list[str] = []
    decided: dict[str, int] = {}
    for job in jobs:
        if not job.array:
            continue
        chosen = job.resources.scenes_per_task
        if chosen == 0:
            chosen = auto_scenes_per_task(job, dates[job.name], costing)
            notes.append(f"job {job.name}: {chosen} scene(s) per task (scenes_per_task: 0, at most half of its time "
                         f"limit {job.resources.time} by the cost model)")
        decided[job.name] = chosen or 1
    if limits.max_submit_jobs is not None and decided:
        single = sum(1 for job in jobs if not job.array)
        raised = fit_submit_limit({name: len(dates[name]) for name in decided}, decided, single,
                                  limits.max_submit_jobs)
        for job in jobs:
            if job.array and raised[job.name] != decided[job.name]:
                tasks = task_scenes(dates[job.name], raised[job.name])
                longest = max(costing.minutes(job, task.split(",")) for task in tasks)
                limit = cost.slurm_minutes(job.resources.time)
                if limit is not None and longest > limit:
                    raise ConfigError(
                        f"the run's array tasks pass MaxSubmitJobs {limits.max_submit_jobs} ({limits.submit_source}); "
                        f"with {raised[job.name]} scenes per task a task of job {job.name} would take about "
                        f"{longest:.0f} min, past its time limit {job.resources.time}: raise its `time:` "
                        f"(snowpipe_job_overrides), submit fewer scenes per run (config `dates`), or part of the "
                        f"pipeline at a time (-e job=NAME)")
                notes.append(f"job {job.name}: {raised[job.name]} scenes per task (was {decided[job.name]}) so that "
                             f"the run's tasks stay within MaxSubmitJobs {limits.max_submit_jobs} "
                             f"({limits.submit_source})")
        decided = raised
    return [job.model_copy(update={"resources": job.resources.model_copy(
        update={"scenes_per_task": decided[job.name]})}) if job.array else job for job in jobs], notes


def planned_jobs(jobs: list[Job], dates: dict[str, list[str]], folders: RunFolders, run_id: str, target: Target,
                 limits: Limits, costing: Costing, paths: dict[str, str],
                 filters: Mapping[str, str]) -> list[PlannedJob]:
    """Every job's entries in submission order: one per chunk of at most MaxArraySize tasks."""
    planned: list[PlannedJob] = []
    chunks: dict[str, list[Chunk]] = {}
    for job in jobs:
        tasks = task_scenes(dates.get(job.name, []), job.resources.scenes_per_task or 1) if job.array else []
        parts = split(tasks, limits.max_array_size)
        chunks[job.name] = []
        for index, part in enumerate(parts):
            name = chunk_name(job.name, index, len(parts))
            chunks[job.name].append(Chunk(name, index, part))
            after, each = chunk_dependencies(part, index, job.after, job.after_each, chunks)
            commands = [_stage_command(stage, job, paths, config=costing.config, tasks=part, filters=filters)
                        for stage in job.stages]
            planned.append(planned_job(job, name, part, after, each, folders, run_id, target, commands,
                                       chunk_of=job.name if len(parts) > 1 else None,
                                       estimate=job_estimate(job, part, costing)))
    return planned


def planned_job(job: Job, name: str, tasks: list[str], after: list[str], after_each: list[str],
                folders: RunFolders, run_id: str, target: Target, commands: list[StageCommand],
                chunk_of: str | None, estimate: JobEstimate) -> PlannedJob:
    """One job's (or chunk's) entry: #SBATCH options, array and its tasks' scenes, dependencies, commands."""
    size = len(tasks) or None
    options = sbatch_options(job, run_id, folders.run_dir, size, target.gpu_request, name)
    script = f"{folders.run_dir}/jobs/{name}.sbatch"
    return PlannedJob(
        name=name,
        description=job.description,
        stages=job.stages,
        after=after,
        after_each=after_each,
        array=f"0-{size - 1}" if size else None,
        array_size=size or 0,
        script=script,
        render_path=f"{folders.render_dir}/jobs/{name}.sbatch",
        sbatch=options,
        sbatch_lines=sbatch_lines(options),
        modules=job.resources.modules or [],
        setup=job.resources.setup or [],
        stage_inputs=bool(job.resources.stage_inputs),
        # Array task i processes scene_ids[i] (passed as --scene), whatever else the cluster holds.
        scene_ids=tasks,
        scenes_per_task=(job.resources.scenes_per_task or 1) if tasks else 0,
        chunk_of=chunk_of,
        requeue_limit=job.resources.requeue_limit or 0,
        submit_display=submit_display(name, script, after, after_each),
        commands=commands,
        estimate=estimate,
    )


def run_estimate(planned: list[PlannedJob], decoded_bytes: int, sync: list[SyncedFolder],
                 notes: list[str]) -> RunEstimate:
    """The run's totals, and a warning for every job whose task estimate passes its time limit."""
    warnings = list(notes)
    for job in planned:
        limit = job.estimate.time_limit_minutes
        if limit is not None and job.estimate.minutes_per_task > limit:
            warnings.append(f"job {job.name}: a task is estimated at {job.estimate.minutes_per_task:.0f} min, past its "
                            f"time limit of {limit:.0f} min: raise `time:` (jobs/*.yml or snowpipe_job_overrides)"
                            + (" or lower scenes_per_task" if job.estimate.scenes_per_task > 1 else ""))
    return RunEstimate(cpu_hours=round(sum(job.estimate.cpu_hours for job in planned), 4),
                       gpu_hours=round(sum(job.estimate.gpu_hours for job in planned), 4),
                       decoded_bytes=decoded_bytes, sync_bytes=sum(item.bytes for item in sync), warnings=warnings)


def make_plan(config: PipelineConfig, config_path: Path, spec: str, target: Target, mode: Mode = "cluster",
              run_id: str | None = None, jobs_dir: Path = REPO_ROOT / "jobs", repo_root: Path = REPO_ROOT,
              build_dir: Path | None = None) -> Plan:
    """The run as data: folders, files to sync, frozen config, and one entry per job (or chunk) in submission
    order, with what each will cost."""
    run_id = run_id or new_run_id()
    problem = formats.run_id_problem(run_id)
    if problem:
        raise ConfigError(problem)
    jobs = checked_jobs(config, spec, target, jobs_dir)
    scan = scene_scanner(config)
    dates = array_dates(config, jobs, scan)
    commit, dirty = git_commit(repo_root)
    folders = run_folders(mode, target, run_id, repo_root, build_dir or repo_root / "build")
    sync, fingerprints = synced_folders(config, mode, folders.data_root)
    frozen, paths = frozen_config(config, folders.data_root, folders.run_dir, scan)
    scenes = scan([]) if config.path("extracted_data").is_dir() else []
    stages = sorted({stage for job in jobs for stage in job.stages})
    costing = Costing(config, scene_megapixels(scenes),
                      {stage: [scene.id for scene in scan(stage_dates(config, stage))] for stage in stages}
                      if scenes else {}, learned.measured_factors(repo_root, target.host))
    limits = cluster_limits(target, repo_root)
    jobs, notes = scenes_per_task(jobs, dates, costing, limits)
    filters = scene_filters(config, scenes) if any(job.array and job.resources.stage_inputs for job in jobs) else {}
    planned = planned_jobs(jobs, dates, folders, run_id, target, limits, costing, paths, filters)
    decoding = any("decode" in job.stages for job in jobs)
    decoded_bytes = decoded_space(scan(stage_dates(config, "decode"))) if decoding else 0
    return Plan(
        run_id=run_id,
        mode=mode,
        host=target.host,
        spec=spec,
        remote_root=folders.root,
        run_dir=folders.run_dir,
        render_dir=folders.render_dir,
        data_root=folders.data_root,
        code_dir=folders.code_dir,
        config_json=f"{folders.run_dir}/config.json",
        data_manifest=f"{folders.run_dir}/data-manifest.json" if mode != "local_run" else None,
        config_source=str(config_path),
        python=folders.python,
        venv=folders.venv,
        commit=commit,
        dirty=dirty,
        config_hash=config.section_hash("annotation", "dataset", "training", "inference", "testing"),
        submission_key=submission_key(target, commit, dirty, spec, config, fingerprints),
        config=frozen,
        sync=sync,
        decoded_dir=paths["decoded"] if decoding else None,
        decoded_bytes=decoded_bytes,
        max_array_size=limits.max_array_size,
        max_submit_jobs=limits.max_submit_jobs,
        estimate=run_estimate(planned, decoded_bytes, sync, notes),
        jobs=planned,
    )
