"""How busy the model kept its device: time in forward / backward against the task's wall time.

Train and infer each write one small JSON (`{results}/busy/<stage>[-task<N>].json`) that `snowpipe report` reads as
the stage's GPU busy fraction. On CUDA each measured span is a pair of CUDA events recorded on the stream, so
measuring adds no sync point: the events are read once, when the file is written (a stage ends with a sync
anyway). On the CPU the work is synchronous and `time.perf_counter` measures it.
"""

from __future__ import annotations

import os
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


class BusyTimer:
    """Add up the time spans the model computes; `summary()` sets them against the wall time since creation."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.started = time.perf_counter()
        self.busy_s = 0.0
        self.spans = 0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

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
        return {"stage": stage, "device": "cuda" if self.cuda else "cpu",
                "method": "cuda events" if self.cuda else "perf_counter", "spans": self.spans,
                "busy_s": round(self.busy_s, 3), "wall_s": round(wall, 3),
                "busy_fraction": round(min(self.busy_s / wall, 1.0), 4) if wall > 0 else None}


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
