"""Stage 4, train: the U-Net on the dataset's patches, resumable, on one or several GPUs (or the CPU).

Writes {results}/training/last.pt (every epoch), best.pt (best training.select_by score), history.json
(one record per finished epoch) and loss / IoU curves, as one set that resuming repairs from last.pt (see
training/loop.py); a set of another config or dataset is moved aside to previous-<time>/, never overwritten
(--force replaces it). Started under torchrun or srun with several
tasks it trains with DistributedDataParallel; the global batch is split over the processes, so an
epoch has the same number of optimisation steps as on one process.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext

from pipeline.config import PipelineConfig
from pipeline.data.writer import remove_temporaries
from pipeline.locks import output_lock
from pipeline.progress import say
from pipeline.registry import STAGES
from pipeline.stages.base import SceneOutcome, StageReport
from pipeline.training import distributed
from pipeline.training.data import read_manifest
from pipeline.training.loop import Trainer, best_epoch

INFO = STAGES["train"]
# Keys that may change between a run and its resumption (continue for more epochs, other hardware).
RESUMABLE_KEYS = {"enable", "epochs", "resume", "workers", "device", "early_stopping_patience", "tensorboard"}


def training_hash(config: PipelineConfig, manifest: dict, inputs_key: str = "inputs") -> str:
    """Identity of a training: its settings (minus resumable keys) and the exact dataset (its manifest's
    `inputs` and `config`; `inputs_key="legacy_inputs"` gives the identity an older snowpipe computed)."""
    settings = {k: v for k, v in config.training.model_dump(mode="json").items() if k not in RESUMABLE_KEYS}
    dataset = {"inputs": manifest.get(inputs_key), "config": manifest.get("config")}
    text = json.dumps({"training": settings, "dataset": dataset}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def legacy_hashes(config: PipelineConfig, manifest: dict) -> list[str]:
    """Identities this training had before its dataset manifest was upgraded in place (which keeps the old
    `inputs` as `legacy_inputs`): a last.pt carrying one still resumes, and is saved with the new identity."""
    return [training_hash(config, manifest, "legacy_inputs")] if "legacy_inputs" in manifest else []


def run(config: PipelineConfig, dates: list[str] | None = None, force: bool = False) -> StageReport:
    start = time.perf_counter()
    out = config.path("results") / "training"
    report = StageReport(INFO.name, output=str(out))
    manifest = read_manifest(config.path("dataset"))
    procs = distributed.start(config.training.device)
    # Rank 0 alone writes, so it alone holds the training folder's lock; the other ranks wait for it at the
    # first collective. Temporaries of a job killed while saving are removed under the lock.
    lock = output_lock(out, "train") if procs.main else nullcontext()
    try:
        with lock:
            if procs.main:
                remove_temporaries(out)
            return _train(config, manifest, procs, force, report, start)
    finally:
        distributed.stop()


def _train(config: PipelineConfig, manifest: dict, procs: distributed.Processes, force: bool, report: StageReport,
           start: float) -> StageReport:
    """Resume, skip or train, with the training folder locked."""
    trainer = Trainer(config, manifest, procs, training_hash(config, manifest), legacy_hashes(config, manifest))
    resumed = trainer.start(force)
    if resumed and (trainer.state.finished or trainer.state.epoch >= config.training.epochs):
        trainer.adopt_identity()
        report.outcomes.append(SceneOutcome("model", "skipped"))
        report.note = f"finished after {trainer.state.epoch} epochs (use --force to train again)"
        return report
    if procs.main:
        where = "new training"
        if resumed:
            step = trainer.state.step
            where = f"resuming after epoch {trainer.state.epoch}" + (f" (and {step} steps of the next)"
                                                                    if step else "")
        say(f"  {where}: {len(trainer.train_set)} train / {len(trainer.val_set) * procs.world} validation "
            f"patches, {procs.world} process(es) on {procs.device}, U-Net base {trainer.spec.base_channels} "
            f"depth {trainer.spec.depth}")
    state = trainer.fit()
    report.outcomes.append(SceneOutcome("model", "done", time.perf_counter() - start))
    chosen = best_epoch(state.history) or state.history[-1]["epoch"]
    best = next(r for r in state.history if r["epoch"] == chosen)
    iou = ", ".join(f"{c} {v:.3f}" for c, v in best["val_metrics"]["iou"].items() if v is not None)
    report.note = (f"{state.epoch} epochs; best by {config.training.select_by} at epoch {best['epoch']}: "
                   f"val loss {best['val_loss']:.4f}, IoU {iou}")
    report.seconds = time.perf_counter() - start
    return report
