"""What a run will cost before it is submitted: one model per stage, from the figures measured in
docs/benchmarks.md ("Cost model" lists the same table), each with the machine it was measured on.

A task's time is its Python start-ups plus, per scene, a fixed part and a part per megapixel of the scene's
10 m grid (a full Sentinel-2 tile is 120.6 Mpx). Training is per patch pixel x epoch instead: its work is set by
the dataset's patches and the epochs, not by the scenes. The figures are those of the machines named; a
cluster's nodes differ, so an estimate is an order of magnitude to plan with, not a promise: where a choice was
needed the model errs long (no speed-up from more CPUs unless it was measured, none from more GPUs, the slower
of two measured reading paths).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pipeline.config import PipelineConfig

Device = Literal["cpu", "gpu"]


@dataclass(frozen=True)
class Machine:
    """Where figures of the model were measured."""

    name: str
    description: str


MACHINES: dict[str, Machine] = {
    "dev-xeon": Machine("dev-xeon", "development VM, Intel Xeon, 2 cores, 24 GiB, no GPU"),
    "dev-epyc": Machine("dev-epyc", "development VM, AMD EPYC, 2 cores, no GPU"),
    "h100": Machine("h100", "device machine, NVIDIA H100 80GB HBM3, 16 CPU cores, torch 2.11.0+cu130"),
}


@dataclass(frozen=True)
class StageCost:
    """Seconds of one scene: `per_scene_s + per_mpx_s x megapixels`, as measured with `threads` threads."""

    stage: str
    device: Device
    machine: str
    threads: int
    per_scene_s: float
    per_mpx_s: float
    source: str                      # the docs/benchmarks.md section and what was measured
    parallel_efficiency: float = 0.0  # > 0: the stage spreads over the job's CPUs (measured efficiency per core)
    model_channels: int = 0          # > 0: U-Net width of the measurement; a wider one costs (width ratio)^2


@dataclass(frozen=True)
class TrainCost:
    """Seconds of one epoch: training patch pixels / train rate + validation pixels / forward rate + overhead."""

    device: Device
    machine: str
    train_mpx_per_s: float
    forward_mpx_per_s: float         # 0: validation is inside the train rate (measured together)
    per_epoch_s: float               # validation set-up, checkpoints, curve plots
    model_channels: int
    source: str


STARTUP_S = 1.85  # one `python -m pipeline` with the stages imported (bench/scale.py, 1-scene plan, dev-xeon)
STARTUPS_PER_STAGE = 2  # the synced-data check (verify-data) and the stage itself

STAGE_COSTS: dict[tuple[str, Device, str], StageCost] = {
    ("decode", "cpu", ""): StageCost(
        "decode", "cpu", "dev-epyc", 1, 0.0, 3.09 / 4.194,
        "Decode (bench/decode.py, 2026-12-01): 3.09 core-seconds per 2048 px scene, efficiency 0.94 at 2 threads",
        parallel_efficiency=0.94),
    ("annotate", "cpu", "compiled"): StageCost(
        "annotate", "cpu", "dev-xeon", 2, 0.0134, 0.827,
        "Annotate 8x faster (bench/annotate_speed.py, 2026-12-04): default path 0.23 s at 512 px, 0.88 s at 1024 px"),
    ("annotate", "cpu", "lightgbm"): StageCost(
        "annotate", "cpu", "dev-xeon", 2, 0.0, 0.49 / 0.262,
        "Annotate 8x faster (2026-12-04): decoded, clouds 20 m, LightGBM, 0.49 s at 512 px"),
    ("annotate", "cpu", "10m"): StageCost(
        "annotate", "cpu", "dev-xeon", 2, 0.0, 1.41 / 0.262,
        "Annotate 8x faster (2026-12-04): decoded, clouds 10 m, LightGBM, 1.41 s at 512 px"),
    ("dataset", "cpu", ""): StageCost(
        "dataset", "cpu", "dev-epyc", 2, 0.0, 0.54 / 0.262,
        "Annotate from decoded rasters (2026-12-01): the dataset stage from decoded rasters, 0.54 s at 512 px"),
    ("infer", "gpu", ""): StageCost(
        "infer", "gpu", "h100", 16, 1.62, 0.184,
        "Inference efficiency (bench/infer_efficiency.py, 2026-11-26): 2.82 s at 2560 px, 6.43 s at 5120 px, "
        "64-channel U-Net (through JPEG 2000; decoded rasters read faster)", model_channels=64),
    ("infer", "cpu", ""): StageCost(
        "infer", "cpu", "dev-xeon", 2, 0.0, 622 / 120.56,
        "Inference of a full tile on CPU (2026-11-26): 10 min 22 s for 10980 px, 16-channel U-Net",
        model_channels=16),
    ("test", "cpu", ""): StageCost(
        "test", "cpu", "dev-xeon", 2, 0.0, 0.6 / (4 * 0.2304),
        "The whole demo pipeline on CPU (2026-11-26): test 0.6 s for 4 scenes of 480 px"),
}

TRAIN_COSTS: dict[Device, TrainCost] = {
    "gpu": TrainCost("gpu", "h100", 52.3, 169.4, 2.1, 64,
                     "The U-Net on a GPU (bench/gpu.py, 2026-11-26): 52.3 Mpx/s training, 169.4 Mpx/s forward; "
                     "the demo on the H100: 84 s for 40 epochs of 19 steps, 2.1 s per epoch beyond the steps"),
    "cpu": TrainCost("cpu", "dev-xeon", 294 * 64 * 64 * 40 / 1e6 / 128.9, 0.0, 0.0, 16,
                     "The whole demo pipeline on CPU (2026-11-26): 40 epochs of 294 + 98 patches of 64 px in 128.9 s, "
                     "16-channel U-Net"),
}


def device_of(gpus: int) -> Device:
    return "gpu" if gpus > 0 else "cpu"


def stage_cost(stage: str, config: PipelineConfig, gpus: int) -> StageCost:
    """The row of the model for a stage as the config and the job run it."""
    variant = ""
    if stage == "annotate":
        detection = config.annotation.cloud_detection
        variant = "10m" if detection.resolution == 10 else (
            "lightgbm" if detection.backend == "lightgbm" else "compiled")
    device: Device = device_of(gpus) if stage == "infer" else "cpu"
    return STAGE_COSTS[(stage, device, variant)]


def _width_factor(measured: int, config: PipelineConfig) -> float:
    """A wider U-Net costs about (width ratio)^2; a narrower one is not assumed cheaper (kernels stop shrinking)."""
    if not measured:
        return 1.0
    return max(1.0, (config.training.model.base_channels / measured) ** 2)


def scene_seconds(cost: StageCost, config: PipelineConfig, megapixels: float, cpus: int) -> float:
    """One scene of a stage in a job with `cpus` CPUs."""
    seconds = (cost.per_scene_s + cost.per_mpx_s * megapixels) * _width_factor(cost.model_channels, config)
    if cost.parallel_efficiency and cpus > cost.threads:
        speed = 1 + (cpus - 1) * cost.parallel_efficiency
        measured = 1 + (cost.threads - 1) * cost.parallel_efficiency
        seconds *= measured / speed
    return seconds


def train_seconds(config: PipelineConfig, dataset_scenes: int, gpus: int) -> float:
    """The whole training: every epoch over the dataset's patches (early stopping may end it sooner)."""
    cost = TRAIN_COSTS[device_of(gpus)]
    patches = dataset_scenes * config.dataset.patches_per_scene
    validation = math.ceil(patches * config.dataset.validation_fraction)
    training = patches - validation
    if config.training.steps_per_epoch:
        training = config.training.steps_per_epoch * config.training.batch_size
    area = config.dataset.patch_size**2 / 1e6
    epoch = training * area / cost.train_mpx_per_s + cost.per_epoch_s
    if cost.forward_mpx_per_s:
        epoch += validation * area / cost.forward_mpx_per_s
    return config.training.epochs * epoch * _width_factor(cost.model_channels, config)


@dataclass(frozen=True)
class Work:
    """What a job's task works on: its scenes' sizes, and for training the dataset's scene count."""

    megapixels: Sequence[float]
    dataset_scenes: int = 0


def task_minutes(stages: Sequence[str], config: PipelineConfig, work: Mapping[str, Work], cpus: int,
                 gpus: int) -> float:
    """Estimated minutes of one task that runs `stages`, each over its `work`."""
    seconds = 0.0
    for stage in stages:
        seconds += STARTUPS_PER_STAGE * STARTUP_S
        if stage == "train":
            seconds += train_seconds(config, work[stage].dataset_scenes, gpus)
        else:
            cost = stage_cost(stage, config, gpus)
            seconds += sum(scene_seconds(cost, config, mpx, cpus) for mpx in work[stage].megapixels)
    return seconds / 60


TIME_PARTS = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_minutes(time: str | None) -> float | None:
    """A SLURM time limit in minutes: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (None: not given)."""
    if not time:
        return None
    match = TIME_PARTS.match(time)
    if not match:
        return None
    days, first, second, third = match.groups()
    numbers = [int(first), int(second or 0), int(third or 0)]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = numbers
        return int(days) * 1440 + hours * 60 + minutes + seconds / 60
    if third is not None:  # HH:MM:SS
        return numbers[0] * 60 + numbers[1] + numbers[2] / 60
    return numbers[0] + numbers[1] / 60  # MM[:SS]


def model_table() -> list[tuple[str, str, str, str]]:
    """The model's rows for the docs and `--help`: stage, figure, machine, source."""
    rows = []
    for (stage, device, variant), cost in STAGE_COSTS.items():
        label = f"{stage} ({device}{', ' + variant if variant else ''})"
        figure = f"{cost.per_scene_s:.3g} s/scene + {cost.per_mpx_s:.3g} s/Mpx, {cost.threads} thread(s)"
        rows.append((label, figure, MACHINES[cost.machine].description, cost.source))
    for device, train in TRAIN_COSTS.items():
        figure = f"{train.train_mpx_per_s:.3g} Mpx/s of patches x epochs, {train.per_epoch_s:g} s/epoch"
        rows.append((f"train ({device})", figure, MACHINES[train.machine].description, train.source))
    return rows
