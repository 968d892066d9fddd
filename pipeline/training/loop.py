"""One training run: epochs of optimisation and validation, checkpoints, history, resume, stop signals.

Validation metrics come from one confusion matrix accumulated over the whole validation set (summed
over processes), never from an average of per-batch ratios (the thesis reported accuracy 1.0002).
Rank 0 alone writes checkpoints, history and plots.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from pipeline.bands import CLASS_NAMES
from pipeline.config import PipelineConfig
from pipeline.data.writer import write_json
from pipeline.errors import SnowpipeError
from pipeline.metrics import class_scores, json_number
from pipeline.model.checkpoint import read_checkpoint, save_checkpoint
from pipeline.model.unet import ModelSpec, UNet
from pipeline.plots import plot_training_curves
from pipeline.progress import make_progress, say
from pipeline.training.data import IGNORE, Augmenter, PatchDataset, class_weights
from pipeline.training.distributed import Processes, barrier, sum_all
from pipeline.training.signals import EXIT_REQUEUE, StopRequest

N_CLASSES = len(CLASS_NAMES)


class TrainingInterrupted(SnowpipeError):
    """A stop signal arrived: last.pt is saved; running the stage again resumes."""

    exit_code = EXIT_REQUEUE


class TrainingFailed(SnowpipeError):
    """The loss diverged (NaN) or the set-up cannot train."""


@dataclass
class Progress:
    """What resuming needs besides the model and optimiser."""

    epoch: int = 0  # finished epochs
    best_loss: float = math.inf
    bad_epochs: int = 0
    finished: bool = False  # stopped early: more epochs would not help
    history: list[dict] = field(default_factory=list)


def epoch_metrics(matrix: np.ndarray) -> dict[str, Any]:
    """Per-class IoU, Dice, precision, recall and binary pixel accuracy from one confusion matrix."""
    scores = class_scores(matrix)
    total = matrix.sum()
    metrics: dict[str, Any] = {name: {} for name in ("iou", "dice", "precision", "recall", "accuracy")}
    for i, cls in enumerate(CLASS_NAMES):
        for name in ("iou", "dice", "precision", "recall"):
            metrics[name][cls] = json_number(scores[cls][name])
        errors = matrix[i, :].sum() + matrix[:, i].sum() - 2 * matrix[i, i]
        metrics["accuracy"][cls] = json_number(1 - errors / total) if total else None
    return metrics


class Trainer:
    def __init__(self, config: PipelineConfig, manifest: dict, procs: Processes, config_hash: str) -> None:
        settings = self.settings = config.training
        self.config, self.manifest, self.procs, self.config_hash = config, manifest, procs, config_hash
        self.out = config.path("results") / "training"
        if settings.batch_size % procs.world:
            raise TrainingFailed(f"training.batch_size {settings.batch_size} must be divisible by the "
                                 f"{procs.world} processes (it is the global batch)")
        torch.manual_seed(settings.seed)
        self.spec = ModelSpec(len(manifest["channels"]), N_CLASSES, settings.model.base_channels,
                              settings.model.depth)
        self.cuda = procs.device.type == "cuda"
        self.model = UNet(self.spec).to(procs.device)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.learning_rate,
                                           weight_decay=settings.weight_decay, eps=1e-6, amsgrad=True)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=settings.lr_factor, patience=settings.lr_patience)
        self.amp = settings.mixed_precision and self.cuda
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        weights = class_weights(manifest, settings.class_weights)
        self.weights = weights.to(procs.device) if weights is not None else None
        self.state = Progress()
        folder = config.path("dataset")
        augment = Augmenter(settings.augmentation, max(1, manifest["patch_size"] // 2))
        self.train_set = PatchDataset(folder, "train", augment, settings.seed)
        val_set = PatchDataset(folder, "validation")
        self.val_set = Subset(val_set, range(procs.rank, len(val_set), procs.world))  # exact shards, no padding
        self.sampler = DistributedSampler(self.train_set, num_replicas=procs.world, rank=procs.rank,
                                          shuffle=True, seed=settings.seed)
        self.network = (DistributedDataParallel(self.model, device_ids=[procs.local_rank] if self.cuda else None)
                        if procs.distributed else self.model)

    # --- checkpoints -------------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "model": self.model.state_dict(),
            "channels": self.manifest["channels"],
            "classes": list(CLASS_NAMES),
            "normalisation": self.manifest["normalisation"],
            "patch_size": self.manifest["patch_size"],
            "epoch": self.state.epoch,
            "config_hash": self.config_hash,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "progress": {"best_loss": self.state.best_loss, "bad_epochs": self.state.bad_epochs,
                         "finished": self.state.finished},
            "history": self.state.history,
            "metrics": self.state.history[-1] if self.state.history else None,
        }

    def resume(self, path: Path) -> bool:
        """Continue from last.pt when it was written for this config and dataset."""
        saved = read_checkpoint(path, self.procs.device)
        if saved.get("config_hash") != self.config_hash:
            if self.procs.main:
                say(f"train: {path} belongs to another config or dataset; starting a new training")
            return False
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"]["torch"].cpu())
        np.random.set_state(saved["rng"]["numpy"])
        random.setstate(saved["rng"]["python"])
        progress = saved["progress"]
        self.state = Progress(saved["epoch"], progress["best_loss"], progress["bad_epochs"], progress["finished"],
                              list(saved["history"]))
        return True

    def save(self, best: bool) -> None:
        """Rank 0 writes; every rank waits for it, so no process runs ahead or exits while it saves."""
        if self.procs.main:
            state = self.checkpoint()
            save_checkpoint(self.out / "last.pt", state)
            if best:
                save_checkpoint(self.out / "best.pt", state)
            write_json(self.out / "history.json", self.state.history)
            plot_training_curves(self.state.history, self.out)
        barrier(self.procs)

    # --- one epoch ---------------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, weight=self.weights, ignore_index=IGNORE, reduction=reduction)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.procs.device, non_blocking=True)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.procs.device, non_blocking=True)

    def train_epoch(self, stop: StopRequest) -> tuple[float, int]:
        settings, procs = self.settings, self.procs
        self.sampler.set_epoch(self.state.epoch)
        self.train_set.epoch = self.state.epoch
        loader = DataLoader(self.train_set, batch_size=settings.batch_size // procs.world, sampler=self.sampler,
                            num_workers=settings.workers, pin_memory=self.cuda, drop_last=False,
                            persistent_workers=False)
        steps = len(loader) if not settings.steps_per_epoch else min(len(loader), settings.steps_per_epoch)
        self.network.train()
        total = torch.zeros(2, device=procs.device)
        with make_progress(transient=True) as bar_view:
            bar = bar_view.add_task(f"train: epoch {self.state.epoch + 1}", total=steps, visible=procs.main)
            for step, (x, y) in enumerate(loader):
                if step >= steps:
                    break
                x, y = self._to_device(x, y)
                with torch.autocast(device_type=procs.device.type, dtype=torch.float16, enabled=self.amp):
                    loss = self._loss(self.network(x), y)
                if not torch.isfinite(loss):
                    raise TrainingFailed(f"the training loss became {loss.item()} at epoch {self.state.epoch + 1}, "
                                         f"step {step + 1}: lower training.learning_rate or check the dataset")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if settings.gradient_clip:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), settings.gradient_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                total += torch.stack([loss.detach(), torch.ones((), device=procs.device)])
                bar_view.advance(bar)
                if self._stop_agreed(stop):
                    raise TrainingInterrupted(self._interrupted_message(stop))
        sum_all(total, procs)
        return (total[0] / total[1].clamp(min=1)).item(), steps

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether any process was asked to stop. One process asks no device: a device value read on
        the host would make the CPU wait for the GPU at every step."""
        if not self.procs.distributed:
            return stop.requested
        flag = sum_all(torch.tensor([float(stop.requested)], device=self.procs.device), self.procs)
        return flag.item() > 0

    def _interrupted_message(self, stop: StopRequest) -> str:
        self.save(best=False)
        name = {10: "SIGUSR1", 15: "SIGTERM"}.get(stop.signal or 0, "a stop signal")
        return (f"training stopped by {name} during epoch {self.state.epoch + 1}: {self.out / 'last.pt'} holds "
                f"{self.state.epoch} finished epoch(s); run the train stage again (or requeue) to resume")

    @torch.inference_mode()
    def validate(self) -> tuple[float, np.ndarray]:
        procs = self.procs
        self.network.eval()
        matrix = torch.zeros(N_CLASSES * N_CLASSES, dtype=torch.int64, device=procs.device)
        loss_sum = torch.zeros(2, dtype=torch.float64, device=procs.device)
        loader = DataLoader(self.val_set, batch_size=max(1, self.settings.batch_size // procs.world),
                            num_workers=self.settings.workers, pin_memory=self.cuda)
        for x, y in loader:
            x, y = self._to_device(x, y)
            with torch.autocast(device_type=procs.device.type, dtype=torch.float16, enabled=self.amp):
                logits = self.network(x)
            valid = y != IGNORE
            weight = self.weights[y[valid]].sum() if self.weights is not None else valid.sum()
            loss_sum += torch.stack([self._loss(logits, y, "sum").double(), weight.double()])
            index = y[valid] * N_CLASSES + logits.argmax(1)[valid]
            matrix += torch.bincount(index, minlength=N_CLASSES * N_CLASSES)
        sum_all(matrix, procs)
        sum_all(loss_sum, procs)
        return (loss_sum[0] / loss_sum[1].clamp(min=1)).item(), matrix.view(N_CLASSES, N_CLASSES).cpu().numpy()

    # --- the run -----------------------------------------------------------------------------------
    def fit(self) -> Progress:
        settings, state = self.settings, self.state
        with StopRequest() as stop:
            while state.epoch < settings.epochs and not state.finished:
                start = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                train_loss, steps = self.train_epoch(stop)
                val_loss, matrix = self.validate()
                self.scheduler.step(val_loss)
                state.epoch += 1
                best = val_loss < state.best_loss
                state.best_loss, state.bad_epochs = (val_loss, 0) if best else (state.best_loss, state.bad_epochs + 1)
                stopped_early = state.bad_epochs > settings.early_stopping_patience
                state.finished = stopped_early
                metrics = epoch_metrics(matrix)
                state.history.append({
                    "epoch": state.epoch, "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
                    "lr": lr, "steps": steps, "seconds": round(time.perf_counter() - start, 2),
                    "pixel_accuracy": json_number(np.trace(matrix) / max(matrix.sum(), 1)),
                    "val_pixels": int(matrix.sum()),
                    "val_metrics": metrics, "best": best,
                })
                self.save(best)
                if self.procs.main:
                    iou = ", ".join(f"{c} {v:.3f}" for c, v in metrics["iou"].items() if v is not None)
                    say(f"  epoch {state.epoch}/{settings.epochs}: train loss {train_loss:.4f}, val loss "
                        f"{val_loss:.4f}{' (best)' if best else ''}, IoU {iou} ({time.perf_counter() - start:.1f} s)")
                if stopped_early and self.procs.main:
                    say(f"  early stopping: no better validation loss for {state.bad_epochs} epochs")
                if stop.requested:
                    raise TrainingInterrupted(self._interrupted_message(stop))
        return state
