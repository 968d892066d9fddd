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
    Mode,
    Plan,
    PlannedJob,
    SbatchValue,
    StageCommand,
    StagedFolder,
    SyncedFolder,
)
from pipeline.data.layout import EXOLABS_FOLDER, Scene, discover_scenes, find_auxiliary, select_dates
from pipeline.errors import ConfigError, DataError, SceneError
from pipeline.registry import STAGES, enabled, stage_dates
from pipeline.submit.jobspec import Job, Resources, load_jobs, parse_resources

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
        )


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
                   gpu_request: str) -> dict[str, SbatchValue]:
    """#SBATCH options (name -> value; None for a flag). Dependencies are added at submission."""
    r = job.resources
    options: dict[str, SbatchValue] = {
        "job-name": job.name,
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


def task_filters(config: PipelineConfig, scenes: list[Scene]) -> list[str]:
    """Per array task, the rsync filters that stage only its own scene (with its ExoLabs file and the
    auxiliary layers) out of extracted_data: a task never copies the other scenes to its node."""
    auxiliaries = {tile: find_auxiliary(config.path("extracted_data"), tile).folder for tile in config.tiles}
    filters = []
    for scene in scenes:
        auxiliary = auxiliaries.get(scene.tile)
        rules = [f"--include=/{scene.safe_dir.name}/***", *([f"--include=/{auxiliary.name}/***"] if auxiliary else [])]
        if scene.exolabs:
            rules += [f"--include=/{EXOLABS_FOLDER}/", f"--include=/{EXOLABS_FOLDER}/{scene.exolabs.name}"]
        filters.append(" ".join([*rules, "--exclude=*"]))
    return filters


def merge_filters(filters: list[str]) -> str:
    """One array task's rsync filters for several scenes: every scene's includes, then one exclude."""
    rules: list[str] = []
    for rule in " ".join(filters).split():
        if rule != "--exclude=*" and rule not in rules:
            rules.append(rule)
    return " ".join([*rules, "--exclude=*"])


def _stage_command(stage: str, job: Job, paths: dict[str, str], config: PipelineConfig,
                   scan: SceneScan) -> StageCommand:
    """One stage of a job: its arguments, processes, and the input folders copied to node-local scratch."""
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
            filters = task_filters(config, scan(stage_dates(config, stage))) if per_task else []
            step = job.resources.scenes_per_task or 1
            staged.append(StagedFolder(name=name, source=paths[name], task_filters=[
                merge_filters(filters[i:i + step]) for i in range(0, len(filters), step)]))
            sets.append(ConfigOverride(key=f"paths.{name}", scratch=name))
    reads_synced = any(STAGES[stage].folders.get(name) == "r" for name in ("extracted_data", "annotated_masks"))
    return StageCommand(stage=stage, args=["stage", stage], processes=processes, staged=staged, sets=sets,
                        verify_data=reads_synced)


def submit_display(job: Job, script: str, after_each: list[str]) -> str:
    """The sbatch call as a line of shell, job ids in variables: `train=$(sbatch ... afterok:$dataset ...)`."""
    def variable(name: str) -> str:
        return name.replace("-", "_")

    after = [f"${variable(name)}" for name in job.after if name not in after_each]
    flags = " ".join(formats.dependency_args(after, [f"${variable(name)}" for name in after_each]))
    return f"{variable(job.name)}=$(sbatch --parsable {flags + ' ' if flags else ''}{shlex.quote(script)})"


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


def planned_job(job: Job, dates: list[str], planned: list[PlannedJob], folders: RunFolders, run_id: str,
                target: Target, commands: list[StageCommand]) -> PlannedJob:
    """One job's entry: #SBATCH options, array and its tasks' scenes, dependencies, commands."""
    tasks = task_scenes(dates, job.resources.scenes_per_task or 1) if job.array else []
    size = len(tasks) or None
    options = sbatch_options(job, run_id, folders.run_dir, size, target.gpu_request)
    # Task by task (aftercorr) only where task i of both arrays is the same scene; else the whole array.
    each = [name for name in job.after_each
            if next(p for p in planned if p.name == name).scene_dates[:len(tasks)] == tasks]
    script = f"{folders.run_dir}/jobs/{job.name}.sbatch"
    return PlannedJob(
        name=job.name,
        description=job.description,
        stages=job.stages,
        after=job.after,
        after_each=each,
        array=f"0-{size - 1}" if size else None,
        array_size=size or 0,
        script=script,
        render_path=f"{folders.render_dir}/jobs/{job.name}.sbatch",
        sbatch=options,
        sbatch_lines=sbatch_lines(options),
        modules=job.resources.modules or [],
        setup=job.resources.setup or [],
        stage_inputs=bool(job.resources.stage_inputs),
        # Array task i processes scene_dates[i] (passed as --scene), whatever else the cluster holds.
        scene_dates=tasks,
        requeue_limit=job.resources.requeue_limit or 0,
        submit_display=submit_display(job, script, each),
        commands=commands,
    )


def make_plan(config: PipelineConfig, config_path: Path, spec: str, target: Target, mode: Mode = "cluster",
              run_id: str | None = None, jobs_dir: Path = REPO_ROOT / "jobs", repo_root: Path = REPO_ROOT,
              build_dir: Path | None = None) -> Plan:
    """The run as data: folders, files to sync, frozen config, and one entry per job in submission order."""
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
    planned: list[PlannedJob] = []
    for job in jobs:
        commands = [_stage_command(stage, job, paths, config, scan) for stage in job.stages]
        planned.append(planned_job(job, dates.get(job.name, []), planned, folders, run_id, target, commands))
    decoding = any("decode" in job.stages for job in jobs)
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
        decoded_bytes=decoded_space(scan(stage_dates(config, "decode"))) if decoding else 0,
        jobs=planned,
    )
