"""Every stage of the pipeline, declared once: its name, config section, the folders it reads and writes,
whether it splits per scene, whether it needs a GPU, and which scenes it covers.

The runner, the job specs, the submission planner, the config checks and the README's stage table read this
table; nothing else restates it. It imports no stage module (and so no torch): a stage's code is loaded only
when the stage runs, so validating a config or planning a submission stays light. See docs/architecture.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # types only: the registry lies below config (config's checks read it), docs/architecture.md
    from pipeline.config import PipelineConfig
    from pipeline.stages.base import StageReport

Access = Literal["r", "w"]


def config_dates(config: PipelineConfig) -> list[str]:
    """The top-level `dates` ([] = every scene found)."""
    return list(config.dates)


def inference_dates(config: PipelineConfig) -> list[str]:
    """`inference.dates`, else the top-level dates."""
    return list(config.inference.dates or config.dates)


def decode_dates(config: PipelineConfig) -> list[str]:
    """Every scene a band-reading stage covers: the top-level dates, then inference's others ([] = all found).

    The top-level dates come first, in their order, so that decode's array task i is annotate's task i and
    annotate can start task by task (aftercorr); scenes only inferred are decoded after them.
    """
    if not config.dates:
        return []
    extra = sorted(set(config.inference.dates) - set(config.dates)) if config.inference.enable else []
    return [*config.dates, *extra]


def testing_dates(config: PipelineConfig) -> list[str]:
    """`testing.dates`, else the scenes inference covers."""
    return list(config.testing.dates or inference_dates(config))


@dataclass(frozen=True)
class StageInfo:
    """A stage declares what it needs; runners (local, SLURM) decide how to run it."""

    name: str
    section: str  # its key in pipeline-config.yml
    summary: str
    per_scene: bool  # can be split into one job-array task per scene
    needs_gpu: bool
    module: str  # where its `run(config, dates=None, force=False)` lives
    # The config's folders (paths.*) it reads (r) and writes (w). A batch job with stage_inputs copies what it
    # reads to node-local disk; what it writes stays on shared storage, visible as each output is published
    # (a requeue on another node resumes from it; a lost node loses no finished scene or epoch).
    folders: dict[str, Access] = field(default_factory=dict)
    dates: Callable[[PipelineConfig], list[str]] = config_dates  # the scenes it covers by default
    runs_on_cluster: bool = True
    # Finer than `folders`, for the overlap check (config.py, overlapping_paths): the part of a folder it writes
    # when that is not the whole folder ("results": "training" = results/training/), and what it reads in place,
    # never staged (the decoded rasters, which it also deletes with decode.keep: until_used; the checkpoint).
    parts: dict[str, str] = field(default_factory=dict)
    reads_in_place: tuple[str, ...] = ()  # "key" or "key/part"

    def reads(self, folder: str) -> bool:
        return folder in self.folders

    def touches(self) -> dict[str, Access]:
        """Every folder it reads or writes, as "key" or "key/part" (a fixed folder under a configured one)."""
        touched: dict[str, Access] = {}
        for key, access in self.folders.items():
            touched["/".join(filter(None, (key, self.parts.get(key))))] = access
        for folder in self.reads_in_place:
            touched.setdefault(folder, "r")
        return touched

    def run(self, config: PipelineConfig, dates: list[str] | None = None, force: bool = False) -> StageReport:
        """Import the stage's module (torch, s2cloudless: only now) and run it."""
        return importlib.import_module(self.module).run(config, dates=dates, force=force)


STAGES: dict[str, StageInfo] = {stage.name: stage for stage in (
    StageInfo("download", "download", "raw data from a data server (rsync over SSH)", per_scene=False,
              needs_gpu=False, module="pipeline.stages.download", runs_on_cluster=False),
    StageInfo("decode", "decode", "JPEG 2000 bands into fast GeoTIFFs at native resolution, shared by runs",
              per_scene=True, needs_gpu=False, module="pipeline.stages.decode",
              folders={"extracted_data": "r", "decoded": "w"}, dates=decode_dates),
    StageInfo("annotate", "annotation", "automatic masks: water, glacier, ExoLabs snow, s2cloudless clouds",
              per_scene=True, needs_gpu=False, module="pipeline.stages.annotate",
              folders={"extracted_data": "r", "annotated_masks": "w"}, reads_in_place=("decoded",)),
    StageInfo("dataset", "dataset", "training / validation patches, split by scene, normalisation constants",
              per_scene=False, needs_gpu=False, module="pipeline.stages.dataset",
              folders={"extracted_data": "r", "annotated_masks": "r", "dataset": "w"}, reads_in_place=("decoded",)),
    StageInfo("train", "training", "U-Net training: checkpoints every epoch, resume, curves", per_scene=False,
              needs_gpu=True, module="pipeline.stages.train", folders={"dataset": "r", "results": "w"},
              parts={"results": "training"}),
    StageInfo("infer", "inference", "predict whole scenes with the trained U-Net: masks, probabilities, quicklooks",
              per_scene=True, needs_gpu=True, module="pipeline.stages.infer",
              folders={"extracted_data": "r", "results": "w"}, dates=inference_dates,
              parts={"results": "predictions"}, reads_in_place=("decoded", "results/training")),
    StageInfo("test", "testing", "metrics of the predictions against ExoLabs or the annotated masks, with plots",
              per_scene=False, needs_gpu=False, module="pipeline.stages.test",
              folders={"extracted_data": "r", "annotated_masks": "r", "results": "w"}, dates=testing_dates,
              parts={"results": "testing"}, reads_in_place=("results/predictions",)),
)}
PER_SCENE = tuple(name for name, stage in STAGES.items() if stage.per_scene)


def enabled(config: PipelineConfig) -> list[str]:
    """The stages the config enables, in pipeline order."""
    return [name for name, stage in STAGES.items() if getattr(config, stage.section).enable]


def stage_dates(config: PipelineConfig, name: str, explicit: list[str] | None = None) -> list[str]:
    """The scenes a stage covers: explicit dates (--scene, an array task), else its own rule."""
    return list(explicit) if explicit else STAGES[name].dates(config)


def folder_uses() -> dict[str, dict[str, Access]]:
    """Every folder a stage touches ("key" or "key/part"), in pipeline order, with the stages that read (r) or
    write (w) it. The config check refuses two of them that overlap where one is written."""
    uses: dict[str, dict[str, Access]] = {}
    for name, stage in STAGES.items():
        for folder, access in stage.touches().items():
            uses.setdefault(folder, {})[name] = access
    return uses
