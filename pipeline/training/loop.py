"""One training run: epochs of optimisation and validation, checkpoints, history, resume, stop signals.

Validation metrics come from one confusion matrix accumulated over the whole validation set (summed
over processes), never from an average of per-batch ratios (the thesis reported accuracy 1.0002).
Rank 0 alone writes checkpoints, history and plots.

The training folder holds one set: last.pt, best.pt, history.json, loss.png, iou.png (SET_FILES). Each
epoch writes them in that order, each atomically, and last.pt comes first: it is the commit, holding the
history, so whatever a kill leaves behind it, resuming (or finding the training finished) rebuilds the
others from last.pt (`repair`). A set that belongs to another config or dataset is moved aside to
previous-<UTC time it was saved>/ before a new training starts; only --force replaces it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from pipeline.bands import CLASS_NAMES
from pipeline.config import PipelineConfig
from pipeline.data.writer import atomic_path, write_json
from pipeline.errors import DataError, SnowpipeError
from pipeline.metrics import class_scores, json_number
from pipeline.model.busy import BusyTimer, write_busy
from pipeline.model.checkpoint import read_checkpoint, restore_rng, rng_state, save_checkpoint, vouch_for
from pipeline.model.unet import ModelSpec, UNet
from pipeline.plots import plot_training_curves
from pipeline.progress import make_progress, say
from pipeline.training.batches import worker_batches
from pipeline.training.board import FOLDER as BOARD_FOLDER
from pipeline.training.board import PREVIEW_PATCHES, TrainingBoard
from pipeline.training.data import IGNORE, Augmenter, PatchDataset, class_weights
from pipeline.training.distributed import Processes, barrier, sum_all
from pipeline.training.losses import segmentation_loss
from pipeline.training.selection import describe_score, load_scheduler, make_scheduler, selection_score, step_scheduler
from pipeline.training.signals import EXIT_REQUEUE, StopRequest, report_progress
from pipeline.workers import ignore_stop_signals

N_CLASSES = len(CLASS_NAMES)
SET_FILES = ("last.pt", "best.pt", "history.json", "loss.png", "iou.png")  # one epoch's writes, in order
CURVES = ("loss.png", "iou.png")
LAST_FIX = "delete it, or run the train stage with --force to train anew"


class TrainingInterrupted(SnowpipeError):
    """A stop signal arrived: last.pt is saved; running the stage again resumes."""

    exit_code = EXIT_REQUEUE


class TrainingFailed(SnowpipeError):
    """The loss diverged (NaN) or the set-up cannot train."""


@dataclass
class Progress:
    """What resuming needs besides the model and optimiser."""

    epoch: int = 0  # finished epochs
    best_score: float = -math.inf  # the best epoch's training.select_by score, higher is better
    bad_epochs: int = 0
    finished: bool = False  # stopped early: more epochs would not help
    history: list[dict] = field(default_factory=list)
    step: int = 0  # optimisation steps done in the unfinished epoch (a stop signal arrived during it)
    partial: list[float] | None = None  # that epoch's summed training loss and step count so far


def best_epoch(history: list[dict]) -> int | None:
    """The epoch with the best selection score: the last record flagged best (best.pt holds it)."""
    return max((r["epoch"] for r in history if r.get("best")), default=None)


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
    def __init__(self, config: PipelineConfig, manifest: dict, procs: Processes, config_hash: str,
                 legacy_hashes: Iterable[str] = ()) -> None:
        """`legacy_hashes`: identities an older snowpipe gave this same training; its last.pt still resumes."""
        settings = self.settings = config.training
        self.config, self.manifest, self.procs, self.config_hash = config, manifest, procs, config_hash
        self.legacy_hashes = set(legacy_hashes) - {config_hash}
        self.legacy = False  # resumed from a last.pt that carries a legacy identity
        self.run_id: str | None = uuid.uuid4().hex[:16]  # shared by this training's last.pt and best.pt
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
            # torch's stubs for Module.to omit its documented to(memory_format=...) form
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.learning_rate,
                                           weight_decay=settings.weight_decay, eps=1e-6, amsgrad=True)
        self.scheduler = make_scheduler(self.optimizer, settings.schedule, settings.epochs, settings.warmup_epochs,
                                        settings.lr_factor, settings.lr_patience)
        self.amp = settings.mixed_precision and self.cuda
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        weights = class_weights(manifest, settings.class_weights)
        self.weights = weights.to(procs.device) if weights is not None else None
        self.state = Progress()
        self.sample: tuple[np.ndarray, np.ndarray] | None = None  # validation patches for TensorBoard
        folder = config.path("dataset")
        augment = Augmenter(settings.augmentation, max(1, manifest["patch_size"] // 2))
        self.train_set = PatchDataset(folder, "train", augment, settings.seed)
        val_set = PatchDataset(folder, "validation")
        self.val_set = Subset(val_set, range(procs.rank, len(val_set), procs.world))  # exact shards, no padding
        self.sampler: DistributedSampler[int] = DistributedSampler(
            self.train_set, num_replicas=procs.world, rank=procs.rank, shuffle=True, seed=settings.seed)
        self.busy = BusyTimer(procs.device)  # forward / backward against the task's wall time (snowpipe report)
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
            "run": self.run_id,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "progress": {"best_score": self.state.best_score, "bad_epochs": self.state.bad_epochs,
                         "finished": self.state.finished, "step": self.state.step, "partial": self.state.partial},
            "history": self.state.history,
            "metrics": self.state.history[-1] if self.state.history else None,
        }

    def start(self, force: bool = False) -> bool:
        """Resume last.pt when it was written for this config and dataset (True), after repairing the set from
        it; otherwise start anew (False), with a previous set moved aside unless `force` replaces it.

        Every process reads; rank 0 alone moves or repairs files, and the others wait for it.
        """
        last = self.out / "last.pt"
        if force:
            if self.procs.main and last.is_file():
                say(f"train: --force: a new training replaces the model in {self.out}")
            return False
        if self.settings.resume == "auto" and last.is_file():
            saved = read_checkpoint(last, self.procs.device, fix=LAST_FIX)
            if saved.get("config_hash") in {self.config_hash, *self.legacy_hashes}:
                self._load(saved)
                if self.procs.main:
                    self.repair(saved)
                barrier(self.procs)
                return True
            reason = f"{last} belongs to another config or dataset"
        elif self.settings.resume == "never":
            reason = "training.resume is never"
        else:
            reason = f"{self.out} holds a model but no last.pt"
        barrier(self.procs)  # nobody still reads last.pt while it moves
        if self.procs.main:
            moved = self.set_aside()
            if moved:
                say(f"train: {reason}; the previous model is kept in {moved}/; starting a new training")
        barrier(self.procs)
        return False

    def _load(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        load_scheduler(self.scheduler, saved["scheduler"], self.optimizer)
        self.scaler.load_state_dict(saved["scaler"])
        restore_rng(saved["rng"])
        progress = saved["progress"]
        # a last.pt from before training.select_by kept the best validation loss as `best_loss`
        best_score = progress["best_score"] if "best_score" in progress else -progress["best_loss"]
        self.state = Progress(saved["epoch"], best_score, progress["bad_epochs"], progress["finished"],
                              list(saved["history"]), progress.get("step", 0), progress.get("partial"))
        self.run_id = saved.get("run")  # None for a checkpoint of the previous format: its best.pt has none either
        self.legacy = saved.get("config_hash") != self.config_hash

    def repair(self, saved: dict[str, Any]) -> list[str]:
        """Make history.json, best.pt and the curves agree with last.pt (`saved`); returns what was rewritten.

        A kill after last.pt was published and before the rest of its epoch's writes leaves them one epoch
        behind; last.pt holds everything needed to redo them.
        """
        last, fixed = self.out / "last.pt", []
        history = saved["history"]
        try:
            current = json.loads((self.out / "history.json").read_text())
        except (OSError, ValueError):
            current = None
        if current != history:
            write_json(self.out / "history.json", history)
            fixed.append("history.json")
        best = best_epoch(history)
        if best is not None and not self._best_holds(saved.get("run"), best):
            if saved["epoch"] == best and not saved["progress"].get("step"):
                with atomic_path(self.out / "best.pt") as tmp:
                    shutil.copyfile(last, tmp)
                vouch_for(self.out / "best.pt")  # a copy of last.pt, which was just read and checked
                fixed.append("best.pt")
            else:
                say(f"train: warning: {self.out / 'best.pt'} does not hold epoch {best} of this training and "
                    f"{last} cannot replace it; infer uses best.pt, so run the train stage with --force to redo it")
        published = last.stat().st_mtime
        curves = [self.out / name for name in CURVES]
        if history and any(not p.is_file() or p.stat().st_mtime < published for p in curves):
            plot_training_curves(history, self.out)
        if fixed:
            say(f"train: repaired {' and '.join(fixed)} from {last} (epoch {saved['epoch']}): a run was stopped "
                f"while saving")
        return fixed

    def _best_holds(self, run: str | None, epoch: int) -> bool:
        try:
            best = read_checkpoint(self.out / "best.pt", "cpu", mmap=True)
        except DataError:
            return False
        return best.get("run") == run and best.get("epoch") == epoch

    def set_aside(self) -> Path | None:
        """Move the set to previous-<UTC time last.pt (else the newest file) was saved>/; returns that folder.

        Deterministic name, last.pt moved last: a run killed while moving finishes the move into the same
        folder next time, rather than splitting the set.
        """
        present = [self.out / name for name in SET_FILES if (self.out / name).is_file()]
        if not present:
            return None
        events = self.out / BOARD_FOLDER
        saved = present[0].stat().st_mtime if present[0].name == "last.pt" else max(p.stat().st_mtime
                                                                                       for p in present)
        stamp = datetime.fromtimestamp(saved, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        folder, n = self.out / f"previous-{stamp}", 1
        while any((folder / p.name).exists() for p in present):
            n += 1
            folder = self.out / f"previous-{stamp}-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        if events.is_dir():  # its curves belong to the set
            events.rename(folder / BOARD_FOLDER)
        for path in reversed(present):
            path.rename(folder / path.name)
        return folder

    def adopt_identity(self) -> None:
        """Rewrite last.pt with this version's identity when it was resumed through a legacy one."""
        if self.legacy and self.procs.main:
            save_checkpoint(self.out / "last.pt", self.checkpoint())
        self.legacy = False
        barrier(self.procs)

    def save(self, best: bool) -> None:
        """Rank 0 writes the set in SET_FILES order (see `repair`); every rank waits for it, so no process runs
        ahead or exits while it saves."""
        if self.procs.main:
            state = self.checkpoint()
            save_checkpoint(self.out / "last.pt", state)
            report_progress(self.state.epoch, self.state.step)
            if best:
                save_checkpoint(self.out / "best.pt", state)
            write_json(self.out / "history.json", self.state.history)
            plot_training_curves(self.state.history, self.out)
        self.legacy = False
        barrier(self.procs)

    # --- one epoch ---------------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return segmentation_loss(self.settings.loss, logits, target, self.weights, IGNORE, self.settings.focal_gamma,
                                 reduction)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.procs.device, non_blocking=True)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.procs.device, non_blocking=True)

    def train_epoch(self, stop: StopRequest) -> tuple[float, int]:
        """One epoch of optimisation; resumed mid-epoch (after a stop signal) it does only the steps left."""
        settings, procs, state = self.settings, self.procs, self.state
        self.sampler.set_epoch(state.epoch)
        self.train_set.epoch = state.epoch
        per_process = settings.batch_size // procs.world
        order = list(self.sampler)  # this epoch's patches for this process, in order
        steps = math.ceil(len(order) / per_process)
        steps = min(steps, settings.steps_per_epoch) if settings.steps_per_epoch else steps
        # Steps already taken before a stop signal: skip their patches (the same ones when the number of
        # processes is unchanged), so a resumed epoch has exactly as many optimisation steps as any other.
        done = min(state.step, steps)
        loader = DataLoader(self.train_set, batch_size=per_process, sampler=order[done * per_process:],
                            num_workers=settings.workers, pin_memory=self.cuda, drop_last=False,
                            persistent_workers=False, worker_init_fn=ignore_stop_signals)
        self.network.train()
        total = torch.zeros(2, device=procs.device)
        if state.partial and procs.main:  # the loss summed over all processes before the stop
            total += torch.tensor(state.partial, device=procs.device)
        with make_progress(transient=True) as bar_view:
            bar = bar_view.add_task(f"train: epoch {state.epoch + 1}", total=steps, completed=done,
                                    visible=procs.main)
            with worker_batches(loader) as batches:
                for step in range(done, steps):
                    try:
                        x, y = next(batches)
                    except StopIteration:
                        break
                    except RuntimeError as exc:
                        self._stop_if_loader_died(stop, exc, step, steps, total)
                        raise
                    x, y = self._to_device(x, y)
                    with self.busy.measure():
                        with torch.autocast(device_type=procs.device.type, dtype=torch.float16, enabled=self.amp):
                            loss = self._loss(self.network(x), y)
                        if not torch.isfinite(loss):
                            raise TrainingFailed(f"the training loss became {loss.item()} at epoch "
                                                 f"{state.epoch + 1}, step {step + 1}: lower "
                                                 f"training.learning_rate or check the dataset")
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
                        sum_all(total, procs)
                        state.step, state.partial = step + 1, total.tolist()
                        raise TrainingInterrupted(self._interrupted_message(stop, steps))
        sum_all(total, procs)
        state.step, state.partial = steps, total.tolist()  # every step taken, not validated yet (see _epochs)
        return (total[0] / total[1].clamp(min=1)).item(), steps

    def _stop_if_loader_died(self, stop: StopRequest, exc: RuntimeError, steps_done: int, steps: int,
                             total: torch.Tensor) -> None:
        """A data-loading worker that dies while a stop is handled must not lose the job: scancel signals every
        process of the job, and one still starting (before worker_init_fn ignores the signal) dies of it
        ("DataLoader worker exited unexpectedly"). The steps taken are saved as after any stop signal. One
        process only: under DDP the other ranks wait in a collective, and srun's --kill-on-bad-exit ends them."""
        if stop.requested and not self.procs.distributed:
            self.state.step, self.state.partial = steps_done, total.tolist()
            raise TrainingInterrupted(self._interrupted_message(stop, steps)) from exc

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether any process was asked to stop. One process asks no device: a device value read on
        the host would make the CPU wait for the GPU at every step."""
        if not self.procs.distributed:
            return stop.requested
        flag = sum_all(torch.tensor([float(stop.requested)], device=self.procs.device), self.procs)
        return flag.item() > 0

    def _interrupted_message(self, stop: StopRequest, steps: int = 0) -> str:
        self.save(best=False)
        name = {10: "SIGUSR1", 15: "SIGTERM"}.get(stop.signal or 0, "a stop signal")
        state = self.state
        partial = f" and {state.step} of {steps} steps of epoch {state.epoch + 1}" if state.step else ""
        return (f"training stopped by {name} during epoch {state.epoch + 1}: {self.out / 'last.pt'} holds "
                f"{state.epoch} finished epoch(s){partial}; run the train stage again (or requeue) to resume")

    @torch.inference_mode()
    def validate(self, stop: StopRequest | None = None) -> tuple[float, np.ndarray]:
        procs = self.procs
        self.network.eval()
        matrix = torch.zeros(N_CLASSES * N_CLASSES, dtype=torch.int64, device=procs.device)
        loss_sum = torch.zeros(2, dtype=torch.float64, device=procs.device)
        loader = DataLoader(self.val_set, batch_size=max(1, self.settings.batch_size // procs.world),
                            num_workers=self.settings.workers, pin_memory=self.cuda,
                            worker_init_fn=ignore_stop_signals)
        self.sample = None
        with worker_batches(loader) as batches:
            while True:
                try:
                    x, y = next(batches)
                except StopIteration:
                    break
                except RuntimeError as exc:
                    if stop is not None and self.state.partial is not None:
                        self._stop_if_loader_died(stop, exc, self.state.step, self.state.step,
                                                  torch.tensor(self.state.partial))
                    raise
                x, y = self._to_device(x, y)
                with self.busy.measure(), \
                        torch.autocast(device_type=procs.device.type, dtype=torch.float16, enabled=self.amp):
                    logits = self.network(x)
                if self.sample is None and procs.main:  # a few patches for TensorBoard's picture of this epoch
                    self.sample = (y[:PREVIEW_PATCHES].cpu().numpy(), logits[:PREVIEW_PATCHES].argmax(1).cpu().numpy())
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
        board = TrainingBoard(self.out, state.epoch) if settings.tensorboard and self.procs.main else None
        try:
            return self._epochs(board)
        finally:
            if board is not None:
                board.close()
            if self.procs.main:  # rank 0's GPU stands for the others (snowpipe report's gpu_busy)
                write_busy(self.config.path("results"), "train", self.busy)

    def _epochs(self, board: TrainingBoard | None) -> Progress:
        settings, state = self.settings, self.state
        with StopRequest() as stop:
            while state.epoch < settings.epochs and not state.finished:
                start = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                train_loss, steps = self.train_epoch(stop)
                val_loss, matrix = self.validate(stop)
                state.step, state.partial = 0, None
                step_scheduler(self.scheduler, val_loss)
                state.epoch += 1
                metrics = epoch_metrics(matrix)
                score = selection_score(settings.select_by, val_loss, metrics)
                best = score > state.best_score
                state.best_score, state.bad_epochs = (score, 0) if best else (state.best_score, state.bad_epochs + 1)
                stopped_early = state.bad_epochs > settings.early_stopping_patience
                state.finished = stopped_early
                state.history.append({
                    "epoch": state.epoch, "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
                    "lr": lr, "steps": steps, "seconds": round(time.perf_counter() - start, 2),
                    "pixel_accuracy": json_number(np.trace(matrix) / max(matrix.sum(), 1)),
                    "val_pixels": int(matrix.sum()),
                    "val_metrics": metrics, "best": best,
                })
                if board is not None:  # before the checkpoint: a kill between the two redoes this epoch's events
                    board.epoch(state.history[-1], self.sample)
                self.save(best)
                if self.procs.main:
                    iou = ", ".join(f"{c} {v:.3f}" for c, v in metrics["iou"].items() if v is not None)
                    say(f"  epoch {state.epoch}/{settings.epochs}: train loss {train_loss:.4f}, val loss "
                        f"{val_loss:.4f}{' (best)' if best else ''}, IoU {iou} ({time.perf_counter() - start:.1f} s)")
                if stopped_early and self.procs.main:
                    say(f"  early stopping: no better {describe_score(settings.select_by, state.best_score)} "
                        f"for {state.bad_epochs} epochs")
                if stop.requested:
                    raise TrainingInterrupted(self._interrupted_message(stop))
        return state
