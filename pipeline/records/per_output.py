"""The one sequence by which a per-scene stage writes an output folder (a scene's decoded bands, masks or
predictions): under the folder's lock, reclaim what crashed writers left, skip a complete output, else build it
in a private folder, write the record last and publish the folder whole. See docs/architecture.md
("Publishing outputs", "One writer at a time")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline import records
from pipeline.locks import output_lock
from pipeline.records.publish import building, reclaim_partials

Build = Callable[[Path], dict[str, Any]]  # fills the private folder; returns the record's summary


def produce(folder: Path, key: records.RecordKey, build: Build, *, what: str, required: Sequence[str],
            owned: Sequence[str], outputs: Sequence[str] | None = None, force: bool = False,
            before_publish: Callable[[], None] | None = None) -> dict[str, Any] | None:
    """Make `folder` a complete output for `key`; return the record's summary, or None when it already was.

    `what` names the writer in the lock (who is waiting for whom); `required`: the files a complete output has;
    `owned`: name patterns of the files the stage writes (never carried over from an old folder); `outputs`:
    the files the record vouches for (None: every file `build` wrote); `before_publish`: called once the folder
    is built, before it replaces the old one (to wait for its readers). Completeness is checked inside the lock,
    so of two runs on one output the second finds the first one's work and skips it.
    """
    with output_lock(folder, what):
        reclaim_partials(folder)
        if not force and records.is_complete(folder, key, required=required):
            return None
        with building(folder, owned=tuple(owned)) as partial:
            summary = build(partial)
            names = list(outputs) if outputs is not None else sorted(
                entry.name for entry in partial.iterdir() if entry.is_file() and not entry.name.startswith("."))
            records.write_record(partial, key, names, **summary)
            if before_publish is not None:
                before_publish()
    return summary
