"""How much faster the annotate stage's defaults are than the thesis setting, and whether the masks agree,
counted honestly: the decode stage's time first, the page cache dropped before every timed run.

usage: python bench/annotate_speed.py [--quick] [--size PX] [--repeat N] [--workdir build/bench-annotate]

Two demo scenes (generated once, kept in the work folder): the demo's own (its swath edge and ExoLabs' gaps
leave 21 % of the mask without data) and the same seed with the swath edge moved to cut off 40 % (the demo
generator's straight line through one corner, a = b = sqrt(0.8) of the sides: a triangle of 40 % of the
area, no data in every band and in ExoLabs beyond it). Each is annotated in this process with `annotate_scene(...,
force=True, threads=<all CPUs>)`, each variant into its own annotated_masks folder:

  thesis      s2cloudless at 10 m over the JPEG 2000 band files, LightGBM, every pixel (no data included)
  jp2+20m     the JPEG 2000 band files, detector at 20 m, LightGBM     (the detector grid alone)
  dec+10m     the decoded GeoTIFFs, detector at 10 m, LightGBM         (the reading alone)
  dec+lgbm    the decoded GeoTIFFs, detector at 20 m, LightGBM         (all but the compiled model)
  default     the decoded GeoTIFFs, detector at 20 m, the compiled model (what the stage does by default)

d, the decode stage's time per scene, is measured first (`decode.run(force=True)`, JPEG 2000 files out of the
page cache). Before every timed annotate run the files it reads (bands, auxiliary layers, ExoLabs) are
dropped from the page cache. Each variant runs `--repeat` times, interleaved, and its fastest run counts.
The compiled model is built into the cache first when missing (`snowpipe build-detector`; minutes, once).

The backends alone: seconds per Mpx of the real model on the default variant's 20 m pixels and on uniform
random reflectance (1 and 2 threads), and their largest difference. Agreement: the cloud-mask IoU (class 2
against class 2, on pixels valid in both masks) of default against thesis (goal >= 0.9), and the share of
identical mask pixels for like-with-like pairs (compiled against LightGBM must be 1.0).

Printed last: `annotate_speedup_40pct_nodata`, `annotate_speedup_with_decode` (thesis / (d + default): the
scene decoded for annotate alone) and `annotate_speedup` (thesis / default: the decoded rasters already
there, as for every band-reading stage after the first). Goals: >= 5 and >= 3 at IoU >= 0.9.
--quick: 512 px scenes, one run per variant (a few minutes on 2 CPUs). Default: 1024 px, two runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from bench_common import drop_cache, machine, usable_threads
from rasterio.windows import Window

from pipeline.config import PipelineConfig, load_config
from pipeline.data.layout import Scene, discover_scenes, find_auxiliary
from pipeline.data.reader import SceneReader
from pipeline.demo import generate_demo
from pipeline.demo import scenes as demo_scenes
from pipeline.demo.config_file import write_demo_config
from pipeline.stages import cloud_backend, dataset, decode
from pipeline.stages.annotate import annotate_scene
from pipeline.stages.clouds import DETECTOR_BANDS, CloudDetector

CLOUDS, NODATA = 2, 255
DEFAULT_GRID = 20  # metres: the cloud detector grid of the "default" variant
NO_DATA_SHARE = 0.4  # of the second scene's pixels


@dataclass
class Variant:
    name: str
    label: str
    decoded: bool
    resolution: int
    backend: str
    every_pixel: bool = False  # the thesis: the detector ran on every pixel
    seconds: float = float("inf")  # wall, fastest run
    cpu: float = 0.0  # process CPU seconds (all threads) of that run
    parts: dict[str, float] = field(default_factory=dict)  # wall seconds in reading bands / the detector


def variants() -> list[Variant]:
    return [Variant("thesis", "thesis   (JPEG 2000, clouds 10 m, LightGBM, every px)", False, 10, "lightgbm", True),
            Variant("jp2-20m", "jp2+20m  (JPEG 2000, clouds 20 m, LightGBM)", False, 20, "lightgbm"),
            Variant("dec-10m", "dec+10m  (decoded,   clouds 10 m, LightGBM)", True, 10, "lightgbm"),
            Variant("dec-lgbm", f"dec+lgbm (decoded,   clouds {DEFAULT_GRID} m, LightGBM)", True, DEFAULT_GRID,
                    "lightgbm"),
            Variant("default", f"default  (decoded,   clouds {DEFAULT_GRID} m, compiled)", True, DEFAULT_GRID,
                    "compiled")]


class Parts:
    """Wall seconds spent in reading the bands (SceneReader.read_band, read_valid) and in the cloud model
    (CloudDetector.probability), by wrapping those methods while a run is timed."""

    WRAPPED = ((SceneReader, "read_band", "read"), (SceneReader, "read_valid", "read"),
               (CloudDetector, "probability", "detector"))

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"read": 0.0, "detector": 0.0}
        self._saved: list[tuple[type, str, object]] = []
        self._depth = 0

    def _wrap(self, owner: type, name: str, part: str) -> None:
        original = getattr(owner, name)
        self._saved.append((owner, name, original))

        def timed(*args: object, **kwargs: object) -> object:
            self._depth += 1  # read_valid may fall back to read_bands -> read_band: count the outer call only
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds[part] += time.perf_counter() - start

        setattr(owner, name, timed)

    def __enter__(self) -> Parts:
        for owner, name, part in self.WRAPPED:
            self._wrap(owner, name, part)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)


def prepare(workdir: Path, size: int, no_data: float | None = None) -> Path:
    """A one-scene demo (JPEG 2000 bands, auxiliary layers, ExoLabs) and its config; generated once.
    `no_data`: the swath edge moved to cut off that share of the scene (a corner triangle)."""
    out = workdir / (f"scene-{size}" if no_data is None else f"scene-{size}-nodata{round(no_data * 100)}")
    config = out / "pipeline-config.yml"
    if not config.is_file():
        plan = demo_scenes.plan_scenes
        if no_data is not None:
            side = math.sqrt(2 * no_data)
            demo_scenes.plan_scenes = lambda count, seed: [  # type: ignore[assignment]
                dataclasses.replace(spec, swath=dataclasses.replace(spec.swath, a=side, b=side))
                for spec in plan(count, seed)]
        try:
            summary = generate_demo(out, scenes=1, size=size, seed=5)
        finally:
            demo_scenes.plan_scenes = plan
        write_demo_config(summary)
    return config


def with_paths(config: PipelineConfig, **paths: Path) -> PipelineConfig:
    return config.model_copy(update={"paths": config.paths.model_copy(update={k: str(v) for k, v in paths.items()})})


def with_detection(config: PipelineConfig, **keys: object) -> PipelineConfig:
    detection = config.annotation.cloud_detection.model_copy(update=keys)
    return config.model_copy(update={"annotation": config.annotation.model_copy(update={"cloud_detection": detection})})


def variant_config(base: PipelineConfig, root: Path, variant: Variant) -> PipelineConfig:
    return with_paths(with_detection(base, resolution=variant.resolution, backend=variant.backend),
                      annotated_masks=root / f"masks-{variant.name}")


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


def input_files(config: PipelineConfig, scene: Scene) -> list[Path]:
    """What an annotate run reads: the bands it reads, the auxiliary layers, ExoLabs."""
    auxiliary = find_auxiliary(config.path("extracted_data"), config.tile_id)
    files = [scene.read_path(band) for band in scene.bands] + list(auxiliary.layers.values()) + [scene.exolabs]
    return [path for path in files if path is not None]


def time_dataset(config: PipelineConfig) -> float:
    start = time.perf_counter()
    dataset.run(config, force=True)
    return time.perf_counter() - start


@dataclass
class Bench:
    """One scene: its decode time d, the variants' times and masks."""

    name: str
    base: PipelineConfig
    jp2: Scene
    decoded: Scene
    decode_seconds: float
    variants: list[Variant]
    configs: dict[str, PipelineConfig]


def decode_scene(config_path: Path, threads: int, repeat: int) -> tuple[PipelineConfig, Scene, Scene, float]:
    """d: the decode stage for this scene, JPEG 2000 files out of the page cache, fastest of `repeat`."""
    root = config_path.parent
    base = with_paths(load_config(config_path), decoded=root / "decoded")
    base = base.model_copy(update={"annotation": base.annotation.model_copy(update={"workers": 1})})
    jp2_scene = discover_scenes(base.path("extracted_data"), base.tile_id)[0]
    seconds = float("inf")
    for _ in range(repeat):
        drop_cache([jp2_scene.band_path(band) for band in jp2_scene.bands])
        start = time.perf_counter()
        decode.run(base, force=True)
        seconds = min(seconds, time.perf_counter() - start)
    dec_scene = decode.with_decoded(base, [jp2_scene])[0]
    if not dec_scene.decoded:
        raise SystemExit("error: the decoded rasters were not found after the decode stage")
    return base, jp2_scene, dec_scene, seconds


def run_variants(bench: Bench, threads: int, repeat: int) -> None:
    for _ in range(repeat):  # interleaved, so that a slow spell of the machine hits all variants alike
        for v in bench.variants:
            scene = bench.decoded if v.decoded else bench.jp2
            config = bench.configs[v.name]
            drop_cache(input_files(config, scene))
            CloudDetector.every_pixel = v.every_pixel
            try:
                with Parts() as parts:
                    start, cpu = time.perf_counter(), time.process_time()
                    outcome = annotate_scene(scene, config, force=True, threads=threads)
                    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            finally:
                CloudDetector.every_pixel = False
            if outcome.status != "done":
                raise SystemExit(f"error: {bench.name} {v.name}: annotate {outcome.status}: {outcome.message}")
            if outcome.details.get("cloud_detector") != v.backend:
                raise SystemExit(f"error: {v.name} ran on {outcome.details.get('cloud_detector')}, not {v.backend}")
            if seconds < v.seconds:
                v.seconds, v.cpu, v.parts = seconds, cpu, dict(parts.seconds)


def report_times(bench: Bench, size: int, repeat: int) -> dict[str, float]:
    times = {v.name: v.seconds for v in bench.variants}
    thesis = times["thesis"]
    print(f"{bench.name}: annotate, fastest of {repeat} run(s), page cache dropped before each:")
    for v in bench.variants:
        other = v.seconds - v.parts["read"] - v.parts["detector"]
        print(f"  {v.label}: {v.seconds:6.2f} s  {size * size / v.seconds / 1e6:5.2f} Mpx/s  "
              f"x{thesis / v.seconds:5.2f} | reading bands {v.parts['read']:5.2f} s, "
              f"model {v.parts['detector']:5.2f} s, rest {other:5.2f} s | CPU {v.cpu:6.2f} s")
    if "dec-lgbm" in times:
        print(f"  gains: decoded rasters x{thesis / times['dec-10m']:.2f} at 10 m; the {DEFAULT_GRID} m grid "
              f"x{thesis / times['jp2-20m']:.2f} from JPEG 2000; the compiled model "
              f"x{times['dec-lgbm'] / times['default']:.2f} on the stage")
    cpu = {v.name: v.cpu for v in bench.variants}
    print(f"  in CPU seconds: default x{cpu['thesis'] / cpu['default']:.2f} vs thesis")
    with_decode = thesis / (bench.decode_seconds + times["default"])
    print(f"  d = {bench.decode_seconds:.2f} s (decode stage, cold); default with d counted: x{with_decode:.2f}")
    return times


def compare_masks(bench: Bench) -> float:
    date = bench.jp2.date
    masks = {name: read_mask(config, date) for name, config in bench.configs.items()}
    iou = cloud_iou(masks["default"], masks["thesis"])
    print(f"{bench.name}: mask agreement:")
    print(f"  default vs thesis   (clouds {DEFAULT_GRID} m vs 10 m): cloud IoU {iou:.4f}, "
          f"identical {identical(masks['default'], masks['thesis']):.2%}")
    for a, b in (("default", "dec-lgbm"), ("dec-10m", "thesis"), ("dec-lgbm", "jp2-20m")):
        if a in masks and b in masks:
            print(f"  {a} vs {b} (like with like): identical {identical(masks[a], masks[b]):.4%}, "
                  f"cloud IoU {cloud_iou(masks[a], masks[b]):.4f}")
    share = np.count_nonzero(masks["thesis"] == CLOUDS) / max(np.count_nonzero(masks["thesis"] != NODATA), 1)
    no_data = np.count_nonzero(masks["thesis"] == NODATA) / masks["thesis"].size
    print(f"  (clouds cover {share:.1%} of the thesis mask's valid pixels; no data {no_data:.1%} of the scene)")
    return iou


def compare_backends(bench: Bench, threads: int) -> None:
    """The real model on two inputs: the default variant's valid 20 m pixels (repeated to 1 Mpx) and uniform
    random reflectance (0-0.8 in every band, 0.25 Mpx: paths through the trees a branch predictor cannot learn).
    Seconds per Mpx at 1 and all threads, and the largest difference from LightGBM."""
    config = bench.configs["default"]
    with SceneReader(bench.decoded, config.tile_id) as reader:
        detector = CloudDetector(config.annotation.cloud_detection, reader.grid.resolution, say=lambda line: None)
        grid = reader.grid.scaled(detector.factor)
        bands, valid, _ = detector.read(reader, Window(0, 0, grid.width, grid.height))
    pixels = np.moveaxis(bands, 0, -1)[valid]
    inputs = {"scene pixels": np.ascontiguousarray(np.resize(pixels, (1_000_000, len(DETECTOR_BANDS)))),
              "uniform random": np.random.default_rng(0).uniform(0, 0.8, (250_000, 10)).astype(np.float32)}
    print(f"backends: s2cloudless's model, seconds per Mpx, {threads} CPU(s):")
    for label, features in inputs.items():
        results = {}
        for count in sorted({1, threads}):
            line = []
            for backend in ("lightgbm", "compiled"):
                model, _ = cloud_backend.load(backend, count)
                model.predict(features[:1000])
                best = float("inf")
                for _ in range(2):
                    start = time.perf_counter()
                    results[backend] = model.predict(features)
                    best = min(best, time.perf_counter() - start)
                line.append(f"{backend} {best * 1e6 / len(features):6.3f} s")
            print(f"  {label}, {count} thread(s): {', '.join(line)}")
        difference = float(np.max(np.abs(results["compiled"] - results["lightgbm"])))
        print(f"  {label}: compiled vs LightGBM max abs difference {difference:.3g}, "
              f"{np.mean((results['compiled'] > 0.4) == (results['lightgbm'] > 0.4)):.4%} equal at the threshold")


def setup_bench(name: str, config_path: Path, threads: int, repeat: int, chosen: list[Variant]) -> Bench:
    base, jp2_scene, dec_scene, seconds = decode_scene(config_path, threads, repeat)
    root = config_path.parent
    print(f"{name}: decode stage (13 bands to GeoTIFF, {threads} thread(s), JPEG 2000 cold): d = {seconds:.2f} s")
    configs = {v.name: variant_config(base, root, v) for v in chosen}
    return Bench(name, base, jp2_scene, dec_scene, seconds, chosen, configs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="512 px scenes, one run per variant")
    parser.add_argument("--size", type=int, help="scene size in px (default: 1024, --quick: 512)")
    parser.add_argument("--repeat", type=int, help="runs per variant, the fastest counts (default: 2, --quick: 1)")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench-annotate"))
    args = parser.parse_args()
    size = args.size or (512 if args.quick else 1024)
    repeat = max(1, args.repeat or (1 if args.quick else 2))
    threads = usable_threads()
    workdir = args.workdir.resolve()
    print(machine())

    model_file = cloud_backend.default_model_file()
    folder = cloud_backend.library_folder(model_file)
    if not (folder / cloud_backend.LIBRARY).is_file():
        cloud_backend.build(model_file, threads)
    print(f"compiled model: {folder} ({(folder / 'build.json').read_text().strip()})"
          if (folder / "build.json").is_file() else f"compiled model: {folder}")

    main_bench = setup_bench("scene", prepare(workdir, size), threads, repeat, variants())
    detection = main_bench.base.annotation.cloud_detection
    print(f"scenes: {size}x{size} px, annotate with {threads} thread(s); cloud detection: threshold "
          f"{detection.threshold}, average_over {detection.average_over}, dilation {detection.dilation_size}, "
          f"window {detection.window}")
    chosen = [v for v in variants() if v.name in ("thesis", "default")]
    holes = setup_bench(f"scene, {NO_DATA_SHARE:.0%} no data", prepare(workdir, size, NO_DATA_SHARE), threads,
                        repeat, chosen)
    # Warm-up, not timed: the first run of each backend imports s2cloudless and LightGBM and loads the model
    # (kept for the process), which would otherwise count against whichever variant runs first.
    for backend in ("lightgbm", "compiled"):
        warm = with_paths(with_detection(main_bench.base, backend=backend), annotated_masks=workdir / "masks-warmup")
        annotate_scene(main_bench.decoded, warm, force=True, threads=threads)
    for bench in (main_bench, holes):
        run_variants(bench, threads, repeat)
    times = report_times(main_bench, size, repeat)
    iou = compare_masks(main_bench)
    holes_times = report_times(holes, size, repeat)
    holes_iou = compare_masks(holes)
    compare_backends(main_bench, threads)

    # Dataset stage: the default variant's masks (its config, so that their records match), JPEG 2000 vs decoded.
    root = prepare(workdir, size).parent
    empty = root / "no-decoded"
    shutil.rmtree(empty, ignore_errors=True)
    empty.mkdir()
    ds_base = main_bench.configs["default"]
    ds_jp2 = time_dataset(with_paths(ds_base, decoded=empty, dataset=root / "dataset-jp2"))
    ds_dec = time_dataset(with_paths(ds_base, decoded=root / "decoded", dataset=root / "dataset-dec"))
    print(f"dataset stage ({main_bench.base.dataset.patches_per_scene} patches of "
          f"{main_bench.base.dataset.patch_size} px): JPEG 2000 {ds_jp2:.2f} s, decoded {ds_dec:.2f} s, "
          f"x{ds_jp2 / ds_dec:.2f}")

    speedup = times["thesis"] / times["default"]
    with_decode = times["thesis"] / (main_bench.decode_seconds + times["default"])
    holes_speedup = holes_times["thesis"] / holes_times["default"]
    goal = speedup >= 5 and with_decode >= 3 and iou >= 0.9
    print(f"goal (>= 5x, >= 3x with decode, at cloud IoU >= 0.9): {'met' if goal else 'NOT met'} "
          f"(x{speedup:.2f}, x{with_decode:.2f}, IoU {iou:.4f}; {NO_DATA_SHARE:.0%} no data: x{holes_speedup:.2f} "
          f"at IoU {holes_iou:.4f})")
    print(f"annotate_speedup_40pct_nodata {holes_speedup:.2f}")
    print(f"annotate_speedup_with_decode {with_decode:.2f}")
    print(f"annotate_speedup {speedup:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
