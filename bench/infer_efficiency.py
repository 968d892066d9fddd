"""How close the infer stage comes to the bare network's speed when it reads decoded rasters.

usage: python bench/infer_efficiency.py [--quick] [--size PX] [--scenes N] [--device auto|cpu|cuda]
                                        [--workdir build/bench-infer]

F: the model's forward throughput on the device (random input already there, the padded window shape of the
   scene's inner windows, the configured batch): computed pixels per second.
E: scene pixels per second of the infer stage (`infer_scene` with the stage's defaults: reading the decoded
   bands and the DEM, resampling, normalising, padding, forward passes, writing mask.tif and the quicklooks,
   publishing and recording) over several scenes read from the
   decode stage's rasters with their page cache dropped (posix_fadvise DONTNEED); the first scene is a
   warm-up and not counted.
E and F are measured alternately, three times, and the median of E/F is reported, so that load from other
processes on the machine hits both alike.
h: the halo bound, scene pixels per computed pixel (the halo's context is computed but not written): E/F <= h.

Printed: h, E/F, E/F / h, the reading's core-seconds and bytes per scene, the host-to-device and
device-to-host copy, the write time and the quicklooks' time per scene (measured separately), and peak host
and device memory. Last line `infer_efficiency <E/F>` (goal >= 0.8).

Like with like: the stage runs as configured by default, quicklooks included (`inference.quicklooks: true`).
`--no-quicklooks` measures the stage without them, as this benchmark did before 2026-12-04 (its figures in
docs/benchmarks.md up to then are of that setting).

--quick (CPU): the demo's default model (16 base channels, 4 levels), 3 scenes of 1024 px, window 512 +
halo 16 (halo bound 0.94), batch 2. Default (for a GPU): the thesis' 64-channel U-Net, 3 full tiles of
10980 px (their bands written as GeoTIFF, not JPEG 2000: minutes faster to generate, then decoded by the
decode stage as usual), the stage's default geometry: window 0 (a quarter of the side: 2745 px), halo 64,
batch 0 (fitted to the device's free memory). `--size 2560` for a smaller run.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import drop_cache, machine
from rasterio.windows import Window

from pipeline.bands import BANDS, CLASS_NAMES
from pipeline.config import PipelineConfig, parse_config
from pipeline.data.layout import Scene, find_auxiliary
from pipeline.data.normalise import Normaliser
from pipeline.data.reader import SceneReader
from pipeline.demo import generate_demo
from pipeline.inference.native import DeviceInput, native_input
from pipeline.inference.outputs import write_quicklooks
from pipeline.inference.predictor import Predictor, pad_to_multiple, pick_device
from pipeline.inference.tiling import window_for, window_tiles
from pipeline.model.checkpoint import save_checkpoint
from pipeline.model.unet import ModelSpec, UNet
from pipeline.stages import decode, infer

TILE = "32TNS"
QUICK = {"size": 1024, "scenes": 3, "base_channels": 16, "depth": 4, "window": 512, "halo": 16, "batch_size": 2}
FULL = {"size": 10980, "scenes": 3, "base_channels": 64, "depth": 4, "window": 0, "halo": 64, "batch_size": 0}


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def scene_files(scene: Scene, config: PipelineConfig) -> list[Path]:
    auxiliary = find_auxiliary(config.path("extracted_data"), TILE)
    return [scene.read_path(band) for band in BANDS] + [p for p in auxiliary.layers.values() if p is not None]


def prepare(workdir: Path, size: int, scenes: int) -> PipelineConfig:
    """Demo scenes (JPEG 2000), decoded once by the decode stage: what a cluster's infer job finds."""
    root = workdir / f"scenes-{scenes}x{size}"
    if not (root / "extracted_data").is_dir():
        generate_demo(root, scenes=scenes, size=size, seed=5, band_format="tif" if size > 4096 else "jp2")
    config = parse_config({"tile_id": TILE, "paths": {"extracted_data": str(root / "extracted_data"),
                                                      "decoded": str(root / "decoded"),
                                                      "results": str(root / "results")}}, root)
    decode.run(config)
    return config


def fit_normaliser(scene: Scene, config: PipelineConfig) -> Normaliser:
    """Constants from a decimated read: their values do not change the speed."""
    with SceneReader(scene, TILE, find_auxiliary(config.path("extracted_data"), TILE)) as reader:
        coarse = reader.grid.scaled(8)
        window = Window(0, 0, coarse.width, coarse.height)
        bands, valid = reader.read_bands(window, factor=8)
        dem = reader.read_layer("dem", window, factor=8)
    return Normaliser.fit(bands[:, valid], dem[valid])


def forward_throughput(predictor: Predictor, batch: int, side: int, seconds: float = 3.0) -> float:
    """Computed pixels/s of the bare network on random device input of `batch` x `side`^2 (after warm-up)."""
    x = pad_to_multiple(torch.randn(batch, predictor.in_channels, side, side, device=predictor.device),
                        predictor.multiple)
    if predictor.cuda:
        x = x.half().contiguous(memory_format=torch.channels_last)
    predictor.forward_only(x)
    synchronise(predictor.device)
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < seconds:
        predictor.forward_only(x)
        runs += 1
        synchronise(predictor.device)
    return runs * batch * x.shape[-2] * x.shape[-1] / (time.perf_counter() - start)


def peak_host_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU-sized: the demo's model, 3 scenes of 1024 px")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--workdir", type=Path, default=Path("build/bench-infer"))
    parser.add_argument("--size", type=int, help="scene size in px")
    parser.add_argument("--scenes", type=int, help="scenes (the first is a warm-up)")
    parser.add_argument("--no-quicklooks", action="store_true",
                        help="inference.quicklooks: false (not the stage's default; the setting of the figures "
                             "before 2026-12-04)")
    args = parser.parse_args()
    p = dict(QUICK if args.quick else FULL)
    p.update({k: v for k, v in (("size", args.size), ("scenes", args.scenes)) if v})
    size, window, halo, batch = p["size"], p["window"], p["halo"], p["batch_size"]
    print(machine())
    base = prepare(args.workdir.resolve(), size, max(2, p["scenes"]))
    scenes = decode.discover_readable(base, [])
    assert all(scene.decoded for scene in scenes), "the decode stage did not vouch for every scene"
    normaliser = fit_normaliser(scenes[0], base)
    torch.manual_seed(0)
    spec = ModelSpec(len(BANDS) + 1, len(CLASS_NAMES), p["base_channels"], p["depth"])
    checkpoint = args.workdir.resolve() / f"model-{p['base_channels']}x{p['depth']}.pt"
    save_checkpoint(checkpoint, {"spec": spec.to_dict(), "model": UNet(spec).eval().state_dict(),
                                 "channels": [*BANDS, "DEM"], "classes": list(CLASS_NAMES),
                                 "normalisation": normaliser.to_dict(), "epoch": 0})
    inference = {"enable": True, "checkpoint": str(checkpoint), "window": window, "halo": halo,
                 "batch_size": batch, "device": args.device}  # everything else: the stage's defaults
    if args.no_quicklooks:
        inference["quicklooks"] = False
    config = parse_config({**base.model_dump(mode="json"), "dataset": {"include_dem": True},
                           "inference": inference}, Path(base.base_dir))
    loaded = infer.load_predictor(config)
    predictor = loaded.predictor
    device = pick_device(args.device)
    window = window_for(window, size, size, halo)
    batch = batch or loaded.batch_for(window, halo, size, size)
    tiles = window_tiles(size, size, window, halo)
    computed = sum(int(t.padded.height) * int(t.padded.width) for t in tiles)
    h = size * size / computed
    inner = max(int(t.padded.height) for t in tiles)
    print(f"device {device}; U-Net {p['base_channels']} channels x {p['depth']} levels; {len(scenes)} scenes of "
          f"{size} px read from decoded rasters; window {window} + halo {halo} ({len(tiles)} windows, "
          f"{len({(int(t.padded.height), int(t.padded.width)) for t in tiles})} shapes); batch {batch}; "
          f"{loaded.readers} reader thread(s); torch threads {torch.get_num_threads()}; "
          f"quicklooks {'on' if config.inference.quicklooks else 'off'}")

    infer.infer_scene(scenes[0], config, loaded, force=True)  # warm-up: file cache, cuDNN algorithm choice

    def end_to_end() -> float:
        seconds = 0.0
        for scene in scenes[1:]:
            drop_cache(scene_files(scene, config))
            start = time.perf_counter()
            infer.infer_scene(scene, config, loaded, force=True)
            seconds += time.perf_counter() - start
        return (len(scenes) - 1) * size * size / seconds

    ratios, forwards, ends = [], [], []
    for _ in range(3):
        forwards.append(forward_throughput(predictor, batch, inner))
        ends.append(end_to_end())
        ratios.append(ends[-1] / forwards[-1])
    f, e, ratio = statistics.median(forwards), statistics.median(ends), statistics.median(ratios)
    print(f"F forward only ({batch} x {inner}^2 on the device): {f / 1e6:.3f} Mpx/s computed")
    print(f"E infer stage, scenes 2-{len(scenes)}, page cache dropped: {e / 1e6:.3f} Mpx/s of scene "
          f"({size * size / e:.2f} s per scene)")
    print(f"h halo bound: {h:.3f} scene px per computed px")
    print(f"E/F {ratio:.3f} (runs: {', '.join(f'{r:.3f}' for r in ratios)}); E/F / h {ratio / h:.3f}")

    # Where the rest goes, per scene (each measured alone).
    scene = scenes[-1]
    auxiliary = find_auxiliary(config.path("extracted_data"), TILE)
    native = native_input(scene, TILE, auxiliary, loaded.normaliser, pin=predictor.cuda)
    drop_cache(scene_files(scene, config))
    cpu, wall = time.process_time(), time.perf_counter()
    with native() as read:
        blocks = [read(t.padded) for t in tiles]
    read_cpu, read_wall = time.process_time() - cpu, time.perf_counter() - wall
    read_bytes = sum(path.stat().st_size for path in scene_files(scene, config))
    print(f"reading one scene's native blocks (and the DEM) on one thread: {read_cpu:.2f} core-s "
          f"({read_wall:.2f} s wall), {read_bytes / 1e6:.1f} MB of files, "
          f"{sum(b.dn.numel() * 2 for n in blocks for b in n.blocks) / 1e6:.1f} MB of uint16 to the device")
    to_device = DeviceInput(loaded.normaliser, scene.dn_offset, device)
    synchronise(device)
    start = time.perf_counter()
    uploaded = [[block.dn.to(device, non_blocking=True) for block in n.blocks] for n in blocks]
    synchronise(device)
    h2d = time.perf_counter() - start
    start = time.perf_counter()
    on_device = [to_device(n)[0][None] for n in blocks]
    synchronise(device)
    resample = time.perf_counter() - start
    del uploaded
    start = time.perf_counter()
    masks = [t.max(dim=1).indices.to(torch.uint8).cpu().numpy() for t in on_device]
    d2h = time.perf_counter() - start
    from pipeline.data.writer import atomic_raster

    with SceneReader(scene, TILE) as reader:
        grid = reader.grid
    start = time.perf_counter()
    target = args.workdir.resolve() / "write-check.tif"
    with atomic_raster(target, grid.geotiff_profile("uint8", 255)) as out:
        for tile, mask in zip(tiles, masks):
            rows, cols = tile.inner
            out.write(np.ascontiguousarray(mask[0][rows, cols]), 1, window=tile.core)
    write = time.perf_counter() - start
    quicklook_dir = args.workdir.resolve() / "quicklook-check"
    quicklook_dir.mkdir(exist_ok=True)
    with SceneReader(scene, TILE, auxiliary) as reader:
        start = time.perf_counter()
        write_quicklooks(quicklook_dir, reader, target)
        quicklook = time.perf_counter() - start
    shutil.rmtree(quicklook_dir)
    target.unlink(missing_ok=True)
    print(f"per scene: host->device (uint16 blocks) {h2d:.3f} s, resampling + normalising on the device "
          f"{resample:.3f} s, device->host (a uint8 mask) {d2h:.3f} s, writing mask.tif {write:.3f} s, "
          f"quicklooks {quicklook:.3f} s ({'in' if config.inference.quicklooks else 'not in'} E)")
    device_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    print(f"peak memory: host {peak_host_gib():.2f} GiB (resident), device {device_peak:.2f} GiB")
    print(f"infer_efficiency {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
