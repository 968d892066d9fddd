"""Publish a stage's output folder whole: built under a private name, swapped in with its record.

A scene's masks, a scene's predictions and the dataset are each built in a partial folder beside the
target (`.NAME.partial-HOST-PID`), their completion record written last inside it, and only then put
in place of the target in one rename. So an interrupted stage never leaves outputs that could pass for
complete ones (or for masks a user supplied), and two writers never share a temporary name. Partial
folders of dead runs are reclaimed by the next writer, which holds the output's lock
(pipeline/locks.py) and so knows that no live process owns them.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline import faults
from pipeline.data.writer import held, remove_folder, swap_folder
from pipeline.errors import OutputError
from pipeline.interrupts import uninterrupted
from pipeline.processes import bytes_under
from pipeline.progress import say

PARTIAL = ".partial-"


def partial_folder(target: Path) -> Path:
    """This process's private build folder for `target`."""
    return target.with_name(f".{target.name}{PARTIAL}{socket.gethostname()}-{os.getpid()}")


def reclaim_partials(target: Path) -> int:
    """Remove build folders that interrupted runs left beside `target`; call only while holding its lock.

    Returns the bytes really freed and says it when anything was freed; a folder that cannot be removed whole
    (an immutable file, a busy `.nfs*` file) is named with the file that holds it, and only what went counts.
    """
    if not target.parent.is_dir():
        return 0
    aside = target.with_name(f".{target.name}.old.tmp")
    if aside.is_dir() and not target.exists():  # killed between the two renames of a swap: the old one is it
        aside.rename(target)
        say(f"  restored {target} from {aside.name}, where an interrupted run had moved it aside")
    freed = 0
    # Only the names partial_folder gives (`.NAME.partial-HOST-PID`): a user's `.NAME.partial-notes` stays.
    ours = re.compile(re.escape(f".{target.name}{PARTIAL}") + r".+-[0-9]+")
    for stale in [*(entry for entry in target.parent.iterdir() if ours.fullmatch(entry.name)), aside]:
        if stale.is_symlink():
            if stale == aside and target.exists():  # a symlinked folder a swap replaced: the link, not its folder
                remove_folder(stale)
            continue
        if not stale.is_dir():
            continue
        before = bytes_under(stale)
        stuck = remove_folder(stale)
        freed += before - (bytes_under(stale) if stuck else 0)
        if stuck is not None and stale != aside:  # the aside is named by the swap that needs its name
            say(f"  warning: {held(stale, *stuck)}")
    if freed:
        say(f"  reclaimed {freed / 1e6:.1f} MB left by an interrupted run beside {target}")
    return freed


def _keep_foreign_files(target: Path, partial: Path, owned: tuple[str, ...]) -> None:
    """Files of the old folder that the stage never writes (a user's notes, thesis .jp2 masks) survive the
    swap: hard-linked into the new folder, so a crash at any point loses none of them. Files matching the
    stage's own names (`owned` patterns) are not carried over: an old probabilities.tif must not sit beside
    a new model's mask."""
    if not target.is_dir():
        return
    for entry in target.iterdir():
        if entry.name.startswith(".") or (partial / entry.name).exists() or \
                any(fnmatch.fnmatch(entry.name, pattern) for pattern in owned):
            continue
        if entry.is_file() and not entry.is_symlink():
            try:
                os.link(entry, partial / entry.name)
            except OSError:
                shutil.copy2(entry, partial / entry.name)
        else:
            shutil.copytree(entry, partial / entry.name, symlinks=True) if entry.is_dir() else \
                os.symlink(os.readlink(entry), partial / entry.name)


@contextmanager
def building(target: Path, owned: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty private folder; when the block succeeds it replaces `target`, otherwise it is removed
    (also on Ctrl-C and SIGTERM, which the CLI turns into KeyboardInterrupt). `owned`: name patterns of the
    files the stage writes, never carried over from the old folder."""
    partial = partial_folder(target)
    try:  # a stop signal waits for the folder's creation, the swap and the removal (pipeline/interrupts.py)
        with uninterrupted():
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        yield partial
        _keep_foreign_files(target, partial, owned)
        with uninterrupted():
            swap_folder(partial, target)
    except OutputError as exc:  # name the file where the user will look for it, not in the removed private folder
        _discard(partial, target)
        raise OutputError(str(exc).replace(str(partial), str(target)), exc.errno) from exc
    except BaseException:
        _discard(partial, target)
        raise


def _discard(partial: Path, target: Path) -> None:
    """Remove the private folder of a failed or stopped build, to the end even if a stop signal comes now."""
    with uninterrupted():
        faults.reached(f"discarding {target.name}")
        shutil.rmtree(partial, ignore_errors=True)
