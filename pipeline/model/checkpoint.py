"""Checkpoints: one dict saved atomically with torch.save; enough to rebuild, resume and normalise.

Keys: format, spec (ModelSpec), model (state dict), channels (input channel names), classes,
normalisation (the dataset manifest's constants), epoch (finished epochs), config_hash, metrics,
and for resuming: optimizer, scheduler, scaler, rng, early_stopping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.data.writer import atomic_path
from pipeline.errors import DataError
from pipeline.model.unet import ModelSpec, UNet

FORMAT = "snowpipe-unet-1"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a job killed while saving never leaves a truncated checkpoint."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def read_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"checkpoint {path} not found: run the train stage first, or set the checkpoint path")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # torch raises many types for corrupt files
        raise DataError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{path} is not a snowpipe checkpoint (format {FORMAT})")
    return state


def check_compatible(state: dict[str, Any], channels: list[str], classes: list[str], path: Path) -> None:
    """A checkpoint must expect exactly the data's input channels and classes; name both when not."""
    if list(state["channels"]) != list(channels):
        raise DataError(
            f"checkpoint {path} expects {len(state['channels'])} input channels ({', '.join(state['channels'])}) "
            f"but the data has {len(channels)} ({', '.join(channels)}): use a checkpoint trained on this kind "
            f"of dataset (dataset.include_dem must match)"
        )
    if list(state["classes"]) != list(classes):
        raise DataError(f"checkpoint {path} predicts classes {state['classes']} but snowpipe expects {classes}")


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[UNet, dict[str, Any]]:
    """The network in eval mode on `device`, and the checkpoint's metadata."""
    state = read_checkpoint(path, device)
    model = UNet(ModelSpec(**state["spec"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state
