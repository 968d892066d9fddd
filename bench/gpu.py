"""Training and inference throughput of the U-Net on one device (meant for a real GPU).

usage: python bench/gpu.py [--device auto|cpu|cuda] [--base-channels 64] [--depth 4] [--seconds 4]

Measured on random input already on the device, so the numbers are the network's own ceiling:
1. training: optimisation steps per second as the train stage takes them (AdamW, class-weighted cross
   entropy, mixed precision and channels-last on CUDA, gradient clipping), batch 16 of 256 px patches;
2. inference: forward passes as the infer stage makes them (float16, channels-last, no gradient) for
   batches of 1024 px windows, at a few batch sizes;
3. peak device memory of each.
Prints one line per measurement, in megapixels per second; the demo's and the scene's figures are in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from infer_efficiency import forward_throughput, synchronise  # bench/ is on sys.path when run as a script

from pipeline.bands import BANDS, CLASS_NAMES
from pipeline.inference.predictor import Predictor, pick_device
from pipeline.model.unet import ModelSpec, UNet


def repeat(step, device: torch.device, seconds: float) -> float:
    """Seconds per call of `step`, after two warm-up calls, over at least `seconds`."""
    for _ in range(2):
        step()
    synchronise(device)
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        step()
        runs += 1
    synchronise(device)
    return (time.perf_counter() - start) / runs


def peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a on CPU"
    gib = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return f"{gib:.1f} GiB"


def training_throughput(spec: ModelSpec, device: torch.device, batch: int, size: int, seconds: float) -> float:
    cuda = device.type == "cuda"
    model = UNet(spec).to(device).train()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, amsgrad=True)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    weights = torch.tensor([0.5, 1.0, 1.0, 3.0], device=device)
    x = torch.randn(batch, spec.in_channels, size, size, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.classes, (batch, size, size), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = F.cross_entropy(model(x).float(), y, weight=weights)
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimiser)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimiser)
        scaler.update()

    return repeat(step, device, seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--base-channels", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    torch.backends.cudnn.benchmark = True
    spec = ModelSpec(len(BANDS) + 1, len(CLASS_NAMES), args.base_channels, args.depth)
    print(f"device {name}; torch {torch.__version__}; U-Net {spec.base_channels} channels x {spec.depth} levels")

    batch, size = 16, 256
    seconds = training_throughput(spec, device, batch, size, args.seconds)
    print(f"training: {1 / seconds:.1f} steps/s of {batch} x {size}^2 = {batch * size * size / seconds / 1e6:.2f} "
          f"Mpx/s; peak memory {peak_memory(device)}")

    predictor = Predictor(UNet(spec).eval(), device)
    for batch in (1, 2, 4, 8):
        pixels_per_second = forward_throughput(predictor, batch, 1024, 1024, args.seconds / 2)
        print(f"inference forward: batch {batch} x 1024^2: {pixels_per_second / 1e6:.2f} Mpx/s; "
              f"peak memory {peak_memory(device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
