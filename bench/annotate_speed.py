"""How much faster the annotate stage's defaults are than the thesis setting, and whether the masks agree.

usage: python bench/annotate_speed.py [--quick] [--size PX] [--repeat N] [--workdir build/bench-annotate]

One demo scene (generated once, kept in the work folder) is annotated in this process with
`annotate_scene(..., force=True, threads=<all CPUs>)`, each variant into its own annotated_masks folder:

  thesis     s2cloudless at 10 m over the JPEG 2000 band files
  jp2+20m    the JPEG 2000 band files, detector at 20 m        (the detector grid alone)
  dec+10m    the decoded GeoTIFFs, detector at 10 m            (the reading alone)
  default    the decoded GeoTIFFs, detector at 20 m            (both: what the stage does by default)

The decode stage runs first (timed, force=True) and is not counted in the annotate times: it is a separate
CPU job done once for all band-reading stages (annotate, dataset, infer). The speedup with decode counted
is printed too. Each variant runs `--repeat` times, interleaved, and its fastest run counts.

Agreement: the cloud-mask IoU (class 2 against class 2, on pixels valid in both masks) of default against
thesis (goal >= 0.9), and the share of identical mask pixels for like-with-like pairs (same detector grid:
dec+10m against thesis should be 1.0; default against jp2+20m likewise).

The dataset stage (`dataset.run`, force=True, the default variant's masks) is timed reading the JPEG 2000
files (paths.decoded pointing to an empty folder) and reading the decoded rasters.

Last line: `annotate_speedup <thesis seconds / default seconds>` (goal >= 5 at IoU >= 0.9).
--quick: a 512 px scene, one run per variant (a few minutes on 2 CPUs). Default: 1024 px, two runs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio

from pipeline.config import PipelineConfig, load_config
from pipeline.data.layout import Scene, discover_scenes
from pipeline.data.reader import SceneReader
from pipeline.demo import generate_demo
from pipeline.demo.config_file import write_demo_config
from pipeline.stages import dataset, decode
from pipeline.stages.annotate import annotate_scene
from pipeline.stages.base import usable_cpus
from pipeline.stages.clouds import CloudDetector

CLOUDS, NODATA = 2, 255
DEFAULT_GRID = 20  # metres: the cloud detector grid of the "default" variant


@dataclass
class Variant:
    name: str
    decoded: bool
    resolution: int
    seconds: float = float("inf")  # wall, fastest run
    cpu: float = 0.0  # process CPU seconds (all threads) of that run
    parts: dict[str, float] = field(default_factory=dict)  # wall seconds in reading bands / the detector


class Parts:
    """Wall seconds spent in reading the bands (SceneReader.read_bands, read_valid) and in the s2cloudless
    detector (CloudDetector.probability), by wrapping those methods while a run is timed."""

    WRAPPED = ((SceneReader, "read_bands", "read"), (SceneReader, "read_valid", "read"),
               (CloudDetector, "probability", "detector"))

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"read": 0.0, "detector": 0.0}
        self._saved: list[tuple[type, str, object]] = []

    def _wrap(self, owner: type, name: str, part: str) -> None:
        original = getattr(owner, name)
        self._saved.append((owner, name, original))

        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        setattr(owner, name, timed)

    def __enter__(self) -> Parts:
        for owner, name, part in self.WRAPPED:
            self._wrap(owner, name, part)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)


def prepare(workdir: Path, size: int) -> Path:
    """A one-scene demo (JPEG 2000 bands, auxiliary layers, ExoLabs) and its config; generated once."""
    out = workdir / f"scene-{size}"
    config = out / "pipeline-config.yml"
    if not config.is_file():
        summary = generate_demo(out, scenes=1, size=size, seed=5)
        write_demo_config(summary)
    return config


def with_paths(config: PipelineConfig, **paths: Path) -> PipelineConfig:
    return config.model_copy(update={"paths": config.paths.model_copy(update={k: str(v) for k, v in paths.items()})})


def with_grid(config: PipelineConfig, resolution: int) -> PipelineConfig:
    detection = config.annotation.cloud_detection.model_copy(update={"resolution": resolution})
    return config.model_copy(update={"annotation": config.annotation.model_copy(update={"cloud_detection": detection})})


def variant_config(base: PipelineConfig, root: Path, variant: Variant) -> PipelineConfig:
    return with_paths(with_grid(base, variant.resolution), annotated_masks=root / f"masks-{variant.name}")


def read_mask(config: PipelineConfig, date: str) -> np.ndarray:
    with rasterio.open(config.path("annotated_masks") / date / "mask.tif") as src:
        return src.read(1)


def cloud_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of class 2 between two masks, on pixels valid (not 255) in both."""
    valid = (a != NODATA) & (b != NODATA)
    ca, cb = (a == CLOUDS) & valid, (b == CLOUDS) & valid
    union = np.count_nonzero(ca | cb)
    return np.count_nonzero(ca & cb) / union if union else 1.0


def identical(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels with the same class (255 included) in both masks."""
    return float(np.mean(a == b))


def time_dataset(config: PipelineConfig) -> float:
    start = time.perf_counter()
    dataset.run(config, force=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="512 px scene, one run per variant")
    parser.add_argument("--size", type=int, help="scene size in px (default: 1024, --quick: 512)")
    parser.add_argument("--repeat", type=int, help="runs per variant, the fastest counts (default: 2, --quick: 1)")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench-annotate"))
    args = parser.parse_args()
    size = args.size or (512 if args.quick else 1024)
    repeat = max(1, args.repeat or (1 if args.quick else 2))
    threads = usable_cpus()
    workdir = args.workdir.resolve()

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs ({threads} usable), "
          f"Python {platform.python_version()}; {datetime.datetime.now().isoformat(timespec='seconds')}")
    config_path = prepare(workdir, size)
    root = config_path.parent
    base = load_config(config_path)
    base = with_paths(base, decoded=root / "decoded")
    detection = base.annotation.cloud_detection
    print(f"scene: {size}x{size} px, one scene, annotate with {threads} thread(s); cloud detection: threshold "
          f"{detection.threshold}, average_over {detection.average_over}, dilation {detection.dilation_size}, "
          f"window {detection.window}; default cloud grid: {DEFAULT_GRID} m")

    # Decode: its own CPU job, once for every band-reading stage; timed, not counted in annotate's time.
    start = time.perf_counter()
    decode.run(base, force=True)
    decode_seconds = time.perf_counter() - start
    jp2_scene: Scene = discover_scenes(base.path("extracted_data"), base.tile_id)[0]
    dec_scene: Scene = decode.with_decoded(base, [jp2_scene])[0]
    if not dec_scene.decoded:
        print("error: the decoded rasters were not found after the decode stage", file=sys.stderr)
        return 1
    print(f"decode stage (13 bands to GeoTIFF, {threads} thread(s)): {decode_seconds:7.2f} s")

    variants = [Variant("thesis", False, 10), Variant("jp2-20m", False, 20),
                Variant("dec-10m", True, 10), Variant("default", True, DEFAULT_GRID)]
    labels = {"thesis": "thesis  (JPEG 2000, clouds 10 m)", "jp2-20m": "jp2+20m (JPEG 2000, clouds 20 m)",
              "dec-10m": "dec+10m (decoded,   clouds 10 m)",
              "default": f"default (decoded,   clouds {DEFAULT_GRID} m)"}
    configs = {v.name: variant_config(base, root, v) for v in variants}
    # Warm-up, not timed: the first run imports s2cloudless and LightGBM and loads its model (about a second),
    # which would otherwise count against whichever variant runs first.
    annotate_scene(dec_scene, with_paths(configs["default"], annotated_masks=root / "masks-warmup"),
                   force=True, threads=threads)
    for _ in range(repeat):  # interleaved, so that a slow spell of the machine hits all variants alike
        for v in variants:
            scene = dec_scene if v.decoded else jp2_scene
            with Parts() as parts:
                start, cpu = time.perf_counter(), time.process_time()
                outcome = annotate_scene(scene, configs[v.name], force=True, threads=threads)
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            if outcome.status != "done":
                print(f"error: {v.name}: annotate {outcome.status}: {outcome.message}", file=sys.stderr)
                return 1
            if seconds < v.seconds:
                v.seconds, v.cpu, v.parts = seconds, cpu, dict(parts.seconds)

    times = {v.name: v.seconds for v in variants}
    thesis = times["thesis"]
    pixels = size * size
    print(f"annotate, fastest of {repeat} run(s):")
    for v in variants:
        other = v.seconds - v.parts["read"] - v.parts["detector"]
        print(f"  {labels[v.name]}: {v.seconds:7.2f} s  {pixels / v.seconds / 1e6:6.2f} Mpx/s  "
              f"x{thesis / v.seconds:5.2f} vs thesis  | reading bands {v.parts['read']:6.2f} s, "
              f"detector {v.parts['detector']:6.2f} s, rest {other:5.2f} s | CPU {v.cpu:6.2f} s")
    print(f"  gain from reading decoded rasters: x{thesis / times['dec-10m']:.2f} at 10 m, "
          f"x{times['jp2-20m'] / times['default']:.2f} at {DEFAULT_GRID} m; from the {DEFAULT_GRID} m "
          f"detector grid: x{thesis / times['jp2-20m']:.2f} from JPEG 2000, "
          f"x{times['dec-10m'] / times['default']:.2f} from decoded")
    speedup = thesis / times["default"]
    cpu = {v.name: v.cpu for v in variants}
    print(f"  in CPU seconds (steadier on a busy machine): default x{cpu['thesis'] / cpu['default']:.2f} vs thesis")
    print(f"  default with decode counted ({decode_seconds:.2f} s + {times['default']:.2f} s): "
          f"x{thesis / (decode_seconds + times['default']):.2f} vs thesis")

    date = jp2_scene.date
    masks = {name: read_mask(config, date) for name, config in configs.items()}
    iou = cloud_iou(masks["default"], masks["thesis"])
    print("mask agreement:")
    print(f"  default vs thesis  (clouds {DEFAULT_GRID} m vs 10 m): cloud IoU {iou:.4f}, "
          f"identical {identical(masks['default'], masks['thesis']):.2%}")
    print(f"  jp2+20m vs thesis  (clouds {DEFAULT_GRID} m vs 10 m): cloud IoU "
          f"{cloud_iou(masks['jp2-20m'], masks['thesis']):.4f}, "
          f"identical {identical(masks['jp2-20m'], masks['thesis']):.2%}")
    print(f"  dec+10m vs thesis  (like with like, 10 m): identical {identical(masks['dec-10m'], masks['thesis']):.2%}, "
          f"cloud IoU {cloud_iou(masks['dec-10m'], masks['thesis']):.4f}")
    print(f"  default vs jp2+20m (like with like, {DEFAULT_GRID} m): "
          f"identical {identical(masks['default'], masks['jp2-20m']):.2%}, "
          f"cloud IoU {cloud_iou(masks['default'], masks['jp2-20m']):.4f}")
    cloud_share = np.count_nonzero(masks["thesis"] == CLOUDS) / max(np.count_nonzero(masks["thesis"] != NODATA), 1)
    print(f"  (clouds cover {cloud_share:.1%} of the thesis mask's valid pixels)")

    # Dataset stage: the default variant's masks (its config, so that their records match), JPEG 2000 vs decoded.
    empty = root / "no-decoded"
    shutil.rmtree(empty, ignore_errors=True)
    empty.mkdir()
    ds_base = configs["default"]
    ds_jp2 = time_dataset(with_paths(ds_base, decoded=empty, dataset=root / "dataset-jp2"))
    ds_dec = time_dataset(with_paths(ds_base, decoded=root / "decoded", dataset=root / "dataset-dec"))
    print(f"dataset stage ({base.dataset.patches_per_scene} patches of {base.dataset.patch_size} px): "
          f"JPEG 2000 {ds_jp2:.2f} s, decoded {ds_dec:.2f} s, x{ds_jp2 / ds_dec:.2f}")

    goal = speedup >= 5 and iou >= 0.9
    print(f"goal (>= 5x at cloud IoU >= 0.9): {'met' if goal else 'NOT met'} (x{speedup:.2f}, IoU {iou:.4f})")
    print(f"annotate_speedup {speedup:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
