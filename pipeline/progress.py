"""Progress bars and one-line summaries: readable in a terminal and in a SLURM log file."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False)


def make_progress(transient: bool = False) -> Progress:
    """A bar per loop (scenes, windows, patches); in a log file rich prints only the final state."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not console.is_terminal,
    )


def say(message: str) -> None:
    """One plain line for the user (stderr, so stdout stays machine-readable where it matters)."""
    console.print(message, markup=False, soft_wrap=True)
