"""What every stage shares: its declared needs, per-scene outcomes and the failure policy."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeGuard

from rich.progress import Progress, TaskID

from pipeline.data.layout import Scene
from pipeline.errors import OutputError, SceneError, SnowpipeError
from pipeline.progress import make_progress, say
from pipeline.registry import StageInfo

__all__ = ["StageInfo", "SceneOutcome", "StageReport", "StageFailed", "enforce_policy", "run_scenes"]


@dataclass
class SceneOutcome:
    scene: str  # the scene id (or "model" for train)
    status: str  # "done", "skipped" (already complete) or "failed"
    seconds: float = 0.0
    message: str = ""
    details: dict = field(default_factory=dict)


@dataclass
class StageReport:
    stage: str
    outcomes: list[SceneOutcome] = field(default_factory=list)
    seconds: float = 0.0
    output: str = ""
    note: str = ""

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[SceneOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def summary(self) -> str:
        parts = [f"{self.count('done')} done", f"{self.count('skipped')} already complete"]
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        text = f"{self.stage}: {', '.join(parts)} in {self.seconds:.1f} s"
        if self.note:
            text += f"; {self.note}"
        return text + (f" -> {self.output}" if self.output else "")


class StageFailed(SnowpipeError):
    """Some scenes failed and the config says to fail (on_scene_error: fail)."""


def _others(report: StageReport) -> str:
    """What became of the scenes that did not fail, said only when true ("the other scenes finished" was said
    when none did)."""
    others = len(report.outcomes) - len(report.failed)
    if not others:
        return "no scene finished"
    return f"the other {others} scene(s) finished" if others > 1 else "the other scene finished"


def enforce_policy(report: StageReport, on_scene_error: str, section: str) -> None:
    if report.failed and on_scene_error == "fail":
        lines = "\n  ".join(f"{o.scene}: {o.message}" for o in report.failed)
        hint = (f"; set {section}.on_scene_error: skip to continue without them"
                if len(report.failed) < len(report.outcomes) else "")
        raise StageFailed(f"{report.stage} failed for {len(report.failed)} scene(s):\n  {lines}\n"
                          f"({_others(report)}{hint})")


def raise_if_failed(report: StageReport) -> None:
    """For stages without an error policy (decode, infer): every scene was tried; name the failed ones."""
    if report.failed:
        lines = "\n  ".join(f"{o.scene}: {o.message}" for o in report.failed)
        raise StageFailed(f"{report.stage} failed for {len(report.failed)} scene(s):\n  {lines}\n"
                          f"({_others(report)}; rerun to retry only the missing ones)")


def stops_the_stage(exc: BaseException) -> TypeGuard[OutputError]:
    """A full disk, a quota or a read-only file system under the outputs: every other scene would fail alike."""
    return isinstance(exc, OutputError) and exc.stops_every_output


def stage_stopped(report: StageReport, scene: str, exc: OutputError, left: int) -> OutputError:
    """The one line (exit 74) of a per-scene stage stopped by `exc` at `scene`, `left` other scenes not done."""
    untried = f" ({left} other scene(s) not done)" if left else ""
    return OutputError(f"{report.stage} stopped at scene {scene}{untried}: {exc}", exc.errno)


def failure_message(exc: SnowpipeError) -> str:
    """The error without the "scene ID:" prefix, since outcomes are listed by scene anyway."""
    return exc.detail if isinstance(exc, SceneError) else str(exc)


def usable_cpus() -> int:
    """CPUs this process may use (a SLURM job's allocation, not the whole node)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_threads(workers: int) -> int:
    """Threads for each parallel worker, so that workers x threads matches the CPUs we may use."""
    return max(1, usable_cpus() // max(1, workers))


ProgressCallback = Callable[[int, int], None]


def describe(outcome: SceneOutcome) -> str:
    """One line per scene: what a per-scene stage found (coverage, class shares) or why it failed."""
    if outcome.status == "failed":
        return f"  {outcome.scene}: FAILED: {outcome.message}"
    if outcome.status == "skipped":
        return f"  {outcome.scene}: already complete (use --force to redo)"
    if "class_fraction" not in outcome.details:
        return f"  {outcome.scene}: {outcome.details.get('summary', 'done')} ({outcome.seconds:.1f} s)"
    fractions = outcome.details["class_fraction"]
    return (f"  {outcome.scene}: coverage {outcome.details['coverage']:.0%}, background {fractions[0]:.1%}, "
            f"snow {fractions[1]:.1%}, clouds {fractions[2]:.1%}, water {fractions[3]:.1%} "
            f"({outcome.seconds:.1f} s)")


def run_scenes(report: StageReport, scenes: list[Scene], work: Callable[[Scene, ProgressCallback], SceneOutcome],
               progress: Progress | None = None) -> None:
    """Process scenes one after the other in this process, with a bar per scene's windows.

    A scene's SnowpipeError becomes its failed outcome, so the other scenes still run; except a full disk, a
    quota or a read-only file system (`stops_the_stage`), which stops the stage at once with one OutputError.
    """
    with progress or make_progress() as bars:
        scene_bar = bars.add_task(f"{report.stage}: scenes", total=len(scenes))
        for scene in scenes:
            window_bar = bars.add_task(f"  {scene.id}", total=None)

            def on_window(done: int, total: int, bar: TaskID = window_bar) -> None:
                bars.update(bar, completed=done, total=total)

            try:
                outcome = work(scene, on_window)
            except SnowpipeError as exc:
                if stops_the_stage(exc):
                    left = len(scenes) - len(report.outcomes) - 1
                    raise stage_stopped(report, scene.id, exc, left) from exc
                outcome = SceneOutcome(scene.id, "failed", message=failure_message(exc))
            bars.remove_task(window_bar)
            report.outcomes.append(outcome)
            say(describe(outcome))
            bars.advance(scene_bar)
