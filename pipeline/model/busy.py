"""How busy the model kept its device: time in forward / backward against the task's wall time.

Train and infer each write one small JSON (`{results}/busy/<stage>[-task<N>].json`) that `snowpipe report` reads as
the stage's GPU busy fraction. On CUDA each measured span is a pair of CUDA events recorded on the stream, so
measuring adds no sync point: the events are read once, when the file is written (a stage ends with a sync
anyway). On the CPU the work is synchronous and `time.perf_counter` measures it. Where `nvidia-smi` exists, a
second opinion comes beside it: its GPU utilization sampled once a second for the task (`NvidiaSmiSampler`; the
share of time a kernel ran, whoever launched it), as `nvidia_smi_utilization`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.data.writer import write_json

BUSY_FOLDER = "busy"
"""Under the results folder: one file per stage and array task."""
FOLD_EVERY = 512
"""Event pairs kept before those already done on the device are added up (a query, not a sync)."""


class NvidiaSmiSampler:
    """`nvidia-smi --query-gpu=utilization.gpu -lms 1000` for one device, read on a daemon thread; `stop()` ends it
    and returns the mean utilization (0..1) and the number of samples. Nothing runs where nvidia-smi is absent."""

    def __init__(self, index: int, period_ms: int = 1000, command: str = "nvidia-smi") -> None:
        self.samples: list[float] = []
        self.process: subprocess.Popen[str] | None = None
        found = shutil.which(command)
        if found is None:
            return
        try:
            self.process = subprocess.Popen(
                [found, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(index),
                 "-lms", str(period_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return
        self.thread = threading.Thread(target=self._read, name="nvidia-smi", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.samples.append(float(line.strip().rstrip("%").strip()) / 100.0)
            except ValueError:
                continue  # "[N/A]" or a header: not a sample

    def stop(self) -> tuple[float | None, int]:
        if self.process is None:
            return None, 0
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.thread.join(timeout=5)
        samples = list(self.samples)
        return (round(sum(samples) / len(samples), 4) if samples else None), len(samples)


class BusyTimer:
    """Add up the time spans the model computes; `summary()` sets them against the wall time since creation."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.started = time.perf_counter()
        self.busy_s = 0.0
        self.spans = 0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.sampler = NvidiaSmiSampler(device.index or 0) if self.cuda else None

    @contextmanager
    def measure(self) -> Iterator[None]:
        """The model's work inside this block counts as busy."""
        self.spans += 1
        if not self.cuda:
            start = time.perf_counter()
            try:
                yield
            finally:
                self.busy_s += time.perf_counter() - start
            return
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        try:
            yield
        finally:
            end.record()
            self._pending.append((begin, end))
            if len(self._pending) >= FOLD_EVERY:
                self._fold(wait=False)

    def _fold(self, wait: bool) -> None:
        """Add up the spans the device has finished (all of them, after a sync, when `wait`)."""
        if wait and self._pending:
            self._pending[-1][1].synchronize()
        keep = []
        for begin, end in self._pending:
            if end.query():
                self.busy_s += begin.elapsed_time(end) / 1000.0
            else:
                keep.append((begin, end))
        self._pending = keep

    def summary(self, stage: str) -> dict[str, object]:
        """busy_s, wall_s and their ratio, with how they were measured."""
        self._fold(wait=True)
        wall = time.perf_counter() - self.started
        utilization, samples = self.sampler.stop() if self.sampler is not None else (None, 0)
        return {"stage": stage, "device": "cuda" if self.cuda else "cpu",
                "method": "cuda events" if self.cuda else "perf_counter", "spans": self.spans,
                "busy_s": round(self.busy_s, 3), "wall_s": round(wall, 3),
                "busy_fraction": round(min(self.busy_s / wall, 1.0), 4) if wall > 0 else None,
                "nvidia_smi_utilization": utilization, "nvidia_smi_samples": samples}


def busy_file(results: Path, stage: str) -> Path:
    """`train.json`, or `infer-task3.json` for array task 3 (the same name in a local run and on the cluster)."""
    task = os.environ.get("SLURM_ARRAY_TASK_ID", "")
    return results / BUSY_FOLDER / (f"{stage}-task{task}.json" if task.isdigit() else f"{stage}.json")


def write_busy(results: Path, stage: str, timer: BusyTimer) -> Path | None:
    """Write the stage's busy summary (atomically) and return where; nothing when the model never ran (every
    output was complete already), so that an earlier measurement stays."""
    if not timer.spans:
        return None
    target = busy_file(results, stage)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, timer.summary(stage))
    return target
