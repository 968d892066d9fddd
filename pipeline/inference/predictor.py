"""One forward pass of a batch of windows: padding, flips (TTA), half precision, softmax probabilities.

The U-Net halves the resolution `depth` times, so every input side must be a multiple of 2**depth;
windows are reflect-padded up to it and the probabilities cropped back, so any window size works.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.model.busy import BusyTimer
from pipeline.model.unet import UNet

# Test-time augmentation: identity, flip H, flip W, flip both (the thesis' "rotations" were these flips).
FLIPS: tuple[tuple[int, ...], ...] = ((), (-2,), (-1,), (-2, -1))


def pick_device(setting: str) -> torch.device:
    """"auto" is CUDA where there is one; asking for CUDA without one is a config problem, not a crash."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("inference.device is cuda but no CUDA device is visible (set it to auto or cpu, "
                          "or run the stage in a GPU job)")
    return torch.device(setting)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom and right sides of (N, C, h, w) up to multiples of `multiple` by reflection.

    Reflection needs the padding to be shorter than the side; tiny windows fall back to repeating the edge.
    """
    h, w = x.shape[-2:]
    dh, dw = -h % multiple, -w % multiple
    if not (dh or dw):
        return x
    mode = "reflect" if dh < h and dw < w else "replicate"
    return F.pad(x, (0, dw, 0, dh), mode=mode)


class Predictor:
    """A model in eval mode on its device; `probabilities` maps input windows to class probabilities."""

    def __init__(self, model: UNet, device: torch.device, tta: bool = False) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.model = model.to(device).eval()
        if self.cuda:
            # torch's stubs for Module.to omit its documented to(memory_format=...) form
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.multiple = 2 ** model.spec.depth
        self.classes = model.spec.classes
        self.in_channels = model.spec.in_channels
        self.flips = FLIPS if tta else FLIPS[:1]
        self.busy = BusyTimer(device)  # the network's share of the task's time (snowpipe report)

    def to_device(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(batch).to(self.device)
        return x.half() if self.cuda else x.float()  # autocast computes in float16 on CUDA anyway

    @torch.inference_mode()
    def probabilities(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (N, classes, h, w) float32 on the device for inputs (N, C, h, w)."""
        x = self.to_device(batch)
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.multiple)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        total: torch.Tensor | None = None
        with self.busy.measure():
            for dims in self.flips:
                with torch.autocast("cuda", dtype=torch.float16, enabled=self.cuda):
                    logits = self.model(x.flip(dims) if dims else x)
                probs = logits.float().softmax(dim=1)
                probs = probs.flip(dims) if dims else probs
                total = probs if total is None else total.add_(probs)
        assert total is not None
        if len(self.flips) > 1:
            total /= len(self.flips)
        return total[..., :h, :w]

    @torch.inference_mode()
    def forward_only(self, x: torch.Tensor) -> None:
        """The bare network on a device tensor: the reference the efficiency benchmark divides by."""
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.cuda):
            self.model(x)
