"""How close whole-scene inference comes to the bare network's speed, and how much faster the
large-window scheme is than the thesis' 256 px patches at stride 128.

usage: python bench/infer_efficiency.py [--quick] [--size PX] [--device auto|cpu|cuda] [--workdir build/bench-infer]

1. Reference: the model's pure forward throughput (pixels/s) on random input of `batch` x `window` x
   `window` px, already on the device (no reading, no normalisation, no softmax, no writing).
2. End to end: the infer stage's per-scene function (`infer_scene`) on one demo scene: decoding the JPEG
   2000 bands (once per scene, overlapped with the forward passes), reading the DEM, normalising,
   padding, forward passes, writing mask.tif; scene pixels / seconds. The halo is part of the cost: its
   context pixels are computed but not output. Also timed with inference.decode_once: false.
3. The ratio of the two is printed last as `infer_efficiency <ratio>` (goal >= 0.8), with its ceilings:
   the halo's share, and decoding the 13 bands alone compared with the forward pass.
4. The thesis scheme (predict_patch_blend, 256/128, the same number of pixels per forward pass) against
   the large windows (predict_windows), both producing the scene's class map from the normalised input
   in memory, so that only the schemes' costs differ.

--quick: a 512 px scene and a tiny U-Net (runs on a CPU in well under a minute). Default: the thesis'
64-channel U-Net, window 1024, halo 64, batch 4, a 2560 px scene, on CUDA when available.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from rasterio.windows import Window

from pipeline.bands import BANDS, CLASS_NAMES
from pipeline.config import parse_config
from pipeline.data.decoded import DecodedScene
from pipeline.data.layout import discover_scenes, find_auxiliary
from pipeline.data.normalise import Normaliser
from pipeline.data.reader import SceneReader
from pipeline.demo import generate_demo
from pipeline.inference.predictor import Predictor, pad_to_multiple, pick_device
from pipeline.inference.readahead import read_ahead
from pipeline.inference.source import array_input, scene_input
from pipeline.inference.tiling import predict_patch_blend, predict_windows, window_tiles
from pipeline.model.checkpoint import save_checkpoint
from pipeline.model.unet import ModelSpec, UNet
from pipeline.stages import infer

TILE = "32TNS"
QUICK = {"size": 512, "base_channels": 8, "depth": 3, "window": 256, "halo": 32, "batch_size": 2}
FULL = {"size": 2560, "base_channels": 64, "depth": 4, "window": 1024, "halo": 64, "batch_size": 4}


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prepare_scene(workdir: Path, size: int) -> Path:
    out = workdir / f"scene-{size}"
    if not (out / "extracted_data").is_dir():
        generate_demo(out, scenes=1, size=size, seed=5)
    return out


def fit_normaliser(extracted: Path) -> Normaliser:
    """Constants from a decimated read: their values do not change the speed."""
    scene = discover_scenes(extracted, TILE)[0]
    with SceneReader(scene, TILE, find_auxiliary(extracted, TILE)) as reader:
        coarse = reader.grid.scaled(8)
        window = Window(0, 0, coarse.width, coarse.height)
        bands, valid = reader.read_bands(window, factor=8)
        dem = reader.read_layer("dem", window, factor=8)
    return Normaliser.fit(bands[:, valid], dem[valid])


def forward_throughput(predictor: Predictor, batch: int, height: int, width: int, seconds: float = 3.0) -> float:
    """Pixels/s of the bare network on random device input of the given shape (after warm-up)."""
    x = pad_to_multiple(torch.randn(batch, predictor.in_channels, height, width, device=predictor.device),
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
    return runs * batch * height * width / (time.perf_counter() - start)


def peak_memory_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small scene and tiny model (CPU, < 1 minute)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--workdir", type=Path, default=Path("build/bench-infer"))
    parser.add_argument("--size", type=int, help="scene size in px (default: 512 with --quick, else 2560)")
    args = parser.parse_args()
    p = dict(QUICK if args.quick else FULL)
    if args.size:
        p["size"] = args.size
    device = pick_device(args.device)
    root = prepare_scene(args.workdir.resolve(), p["size"])
    extracted = root / "extracted_data"
    normaliser = fit_normaliser(extracted)
    torch.manual_seed(0)
    spec = ModelSpec(len(BANDS) + 1, len(CLASS_NAMES), p["base_channels"], p["depth"])
    model = UNet(spec).eval()
    checkpoint = root.parent / f"model-{p['base_channels']}x{p['depth']}.pt"
    save_checkpoint(checkpoint, {"spec": spec.to_dict(), "model": model.state_dict(),
                                 "channels": [*BANDS, "DEM"], "classes": list(CLASS_NAMES),
                                 "normalisation": normaliser.to_dict(), "epoch": 0})
    config = parse_config({
        "tile_id": TILE, "paths": {"extracted_data": str(extracted), "results": str(root / "results")},
        "dataset": {"include_dem": True},
        "inference": {"enable": True, "checkpoint": str(checkpoint), "window": p["window"], "halo": p["halo"],
                      "batch_size": p["batch_size"], "device": args.device, "quicklooks": False},
    }, root)
    loaded = infer.load_predictor(config)
    predictor = loaded.predictor
    scene = discover_scenes(extracted, TILE)[0]
    size, window, halo, batch = p["size"], p["window"], p["halo"], p["batch_size"]
    print(f"device {device}; U-Net {p['base_channels']} channels x {p['depth']} levels; scene {size} px; "
          f"window {window} + halo {halo}; batch {batch}; {loaded.readers} reader thread(s); "
          f"torch threads {torch.get_num_threads()}")

    reference = forward_throughput(predictor, batch, window, window)
    print(f"forward only ({batch} x {window}^2 random input): {reference / 1e6:.3f} Mpx/s")

    infer.infer_scene(scene, config, loaded, force=True)  # warm-up: file cache, cuDNN algorithm choice
    seconds = min(timed(lambda: infer.infer_scene(scene, config, loaded, force=True)) for _ in range(2))
    end_to_end = size * size / seconds
    print(f"end to end (infer_scene, reading and writing included): {end_to_end / 1e6:.3f} Mpx/s "
          f"({seconds:.2f} s per scene)")
    print(f"  peak resident memory so far (the infer stage's own): {peak_memory_gib():.2f} GiB")
    per_window = parse_config({**config.model_dump(mode="json"),
                               "inference": {**config.inference.model_dump(mode="json"), "decode_once": False}},
                              root)
    t_per_window = timed(lambda: infer.infer_scene(scene, per_window, loaded, force=True))
    print(f"  the same with inference.decode_once: false (JPEG 2000 decoded again for every window): "
          f"{size * size / t_per_window / 1e6:.3f} Mpx/s ({t_per_window:.2f} s per scene)")

    tiles = window_tiles(size, size, window, halo)
    computed = sum(int(t.padded.height) * int(t.padded.width) for t in tiles)
    print(f"halo overhead: {computed / size**2:.3f} px computed per px written "
          f"(bound on the ratio: {size**2 / computed:.3f})")

    def decode() -> None:
        with DecodedScene(scene, TILE) as decoded:
            decoded.read_dn(Window(0, size - 1, size, 1))  # waits for the last strip of every band

    t_decode = timed(decode)
    print(f"decoding the 13 bands once (JPEG 2000 + resampling to 10 m): {size**2 / t_decode / 1e6:.3f} Mpx/s "
          f"= {size**2 / t_decode / reference:.3f} x the forward pass (a ceiling for the ratio)")

    auxiliary = find_auxiliary(extracted, TILE)
    with DecodedScene(scene, TILE) as decoded:
        decoded.read_dn(Window(0, size - 1, size, 1))
        source = scene_input(scene, TILE, auxiliary, normaliser, decoded)
        t_read = timed(lambda: [None for _ in read_ahead(source, [t.padded for t in tiles], loaded.readers,
                                                         2 * batch)])
        print(f"reading and normalising the decoded windows only: {size**2 / t_read / 1e6:.3f} Mpx/s "
              f"(forward only on the same windows: {reference * size**2 / computed / 1e6:.3f} Mpx/s)")
        with source() as read:
            inputs, valid = read(Window(0, 0, size, size))
    in_memory = array_input(inputs, valid)

    def large_windows() -> None:
        for _ in predict_windows(in_memory, size, size, predictor, window, halo, batch, loaded.readers):
            pass

    patches_per_batch = batch * max(1, (window // 256) ** 2)
    large_windows()  # warm-up for this input's shapes
    t_windows = timed(large_windows)
    t_blend = timed(lambda: predict_patch_blend(in_memory, size, size, predictor, 256, 128, patches_per_batch,
                                                loaded.readers))
    print(f"class map of the scene from memory (scheme cost only): large windows {t_windows:.2f} s, thesis "
          f"256/128 patch blend {t_blend:.2f} s ({patches_per_batch} patches per pass): "
          f"speed-up {t_blend / t_windows:.2f}x")
    print(f"peak resident memory {peak_memory_gib():.2f} GiB (with the scene's input in memory for the comparison)")
    print(f"infer_efficiency {end_to_end / reference:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
