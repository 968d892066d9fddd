"""The ready-to-run OUT/pipeline-config.yml that `snowpipe demo-data` writes beside the demo scenes."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pipeline.config import parse_config
from pipeline.data.writer import atomic_path

TEMPLATE = """\
# Demo pipeline config written by `snowpipe demo-data` ({scenes} synthetic scenes of {size} px).
# Every key is explained in the pipeline-config.yml at the root of the snowpipe repository.
# Paths are relative to this file's folder. Settings are small so that the whole pipeline runs on a
# 2-core CPU in a few minutes.
tiles: [{tiles}]
dates: []                       # [] = every scene found in extracted_data

paths:
  extracted_data: extracted_data
  annotated_masks: annotated_masks
  dataset: dataset
  results: results
  work: work

download:
  enable: false                 # the demo data is already here

annotation:
  enable: true
  workers: 2                    # scenes annotated in parallel
  on_scene_error: fail
  water: true
  glacier: true
  exolabs_snow: true
  clouds: true
  cloud_detection:
    threshold: 0.4
    average_over: 4
    dilation_size: 2
    resolution: 10              # metres: 10 as the thesis, or 20 / 60 (faster)
    window: 512
    backend: lightgbm           # the demo's scenes are small: compiling the model (minutes, once) would cost
                                # more than it saves here; auto (the default) compiles it (README)

dataset:
  enable: true
  patch_size: {patch}
  patches_per_scene: {patches}
  sampling: balanced
  split: scene
  validation_fraction: 0.25
  validation_dates: []
  include_dem: true
  seed: 42
  on_scene_error: fail
  normalisation:
    method: log_percentile
    low_percentile: 2
    high_percentile: 98

training:
  enable: true
  model:
    base_channels: 16           # a small U-Net (thesis: 64), so that CPU training takes a few minutes
    depth: 4
  epochs: 40
  batch_size: 16
  steps_per_epoch: 0
  learning_rate: 0.003
  lr_patience: 5
  early_stopping_patience: 10
  workers: 0
  device: auto
  resume: auto

inference:
  enable: true
  checkpoint: best
  window: 512
  halo: 32
  batch_size: 2
  tta: false
  quicklooks: true

testing:
  enable: true
  reference: exolabs
"""


class DemoLike(Protocol):
    out: Path
    tiles: list[str]
    size: int
    dates: list[str]


def demo_config_text(summary: DemoLike) -> str:
    patch = 32 if summary.size < 160 else 64 if summary.size < 1024 else 256  # a patch must fit in coverage
    patches = max(8, min(512, (summary.size // patch) ** 2 * 2))
    return TEMPLATE.format(
        scenes=len(summary.dates) * len(summary.tiles), size=summary.size, tiles=", ".join(summary.tiles),
        patch=patch, patches=patches
    )


def write_demo_config(summary: DemoLike) -> Path:
    """Write OUT/pipeline-config.yml (validated before it is written) and return its path."""
    import yaml

    text = demo_config_text(summary)
    parse_config(yaml.safe_load(text), Path(summary.out))
    target = Path(summary.out) / "pipeline-config.yml"
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return target
