"""rsync that survives a dropped connection: `python -m pipeline.submit.transfer -- rsync ARGS...`.

The submit playbook sends data through it. A transfer cut by the network (rsync exit 10, 12, 30, 35, or 255 with
a lost connection) is run again after 2, 4, 8 ... seconds; rsync's `--partial` keeps what arrived, and its quick
check skips complete files, so a retry sends only the rest. A refusal that waiting cannot fix (host key, login,
permissions) stops at once. Either way the last failure is one line naming the fix.

`--keep-completed` (before `--`): a folder of the destination that holds a snowpipe completion record
(`.snowpipe-complete.json`: a stage finished it there, e.g. the masks an annotate job of a run wrote into the
shared `data/annotated_masks/`) is never replaced from the laptop. The destination is listed first with the same
rsync, options and connection, and each such folder is excluded from the copy. Folders without a record (the
user's own masks) are updated as before; rsync never deletes on the destination (no `--delete`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from pipeline.records import RECORD_NAME

TRANSIENT_CODES = {10, 12, 30, 35, 255}  # socket I/O, protocol stream, timeouts, the ssh connection itself
PERMANENT_SIGNS = ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED", "Permission denied",
                   "Could not resolve hostname", "No such file or directory")
ATTEMPTS = 4
FIRST_DELAY_S = 2.0


def transient(code: int, stderr: str) -> bool:
    return code in TRANSIENT_CODES and not any(sign in stderr for sign in PERMANENT_SIGNS)


def run_rsync(argv: list[str], attempts: int = ATTEMPTS, first_delay: float = FIRST_DELAY_S,
              ) -> tuple[int, str, str]:
    """Run rsync until it succeeds, fails for good, or `attempts` are used; (exit code, all stdout, last stderr)."""
    output: list[str] = []
    delay = first_delay
    for attempt in range(1, attempts + 1):
        done = subprocess.run(argv, capture_output=True, text=True)
        output.append(done.stdout)
        if done.returncode == 0 or not transient(done.returncode, done.stderr) or attempt == attempts:
            return done.returncode, "".join(output), done.stderr
        reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        print(f"transfer interrupted ({reason}); retry {attempt}/{attempts - 1} in {delay:.0f} s", file=sys.stderr,
              flush=True)
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")  # the loop returns on its last attempt


KEEP_COMPLETED = "--keep-completed"


class ListingFailed(Exception):
    """The destination could not be listed: nothing is sent, since nothing there could be protected."""


def completed_folders(command: list[str]) -> tuple[int, list[str], str]:
    """(exit code, names, stderr): the destination's top-level folders that hold a completion record, listed by the
    same rsync command with the source dropped (`--list-only`). A destination that does not exist holds none."""
    listing = [*command[:-2], "--list-only", "--include=/*/", f"--include=/*/{RECORD_NAME}", "--exclude=*",
               command[-1]]
    code, stdout, stderr = run_rsync(listing)
    if code == 23 and "No such file or directory" in stderr:
        return 0, [], ""
    names = []
    for line in stdout.splitlines():
        parts = line.split(None, 4)  # permissions, size, date, time, name
        folder, _, file = parts[-1].partition("/") if len(parts) == 5 else ("", "", "")
        if file == RECORD_NAME:
            names.append(folder)
    return code, sorted(names), stderr


def keep_completed(command: list[str]) -> tuple[list[str], str]:
    """The rsync command with the destination's completed folders excluded, and a line naming those the source also
    has (empty when none)."""
    code, names, stderr = completed_folders(command)
    if code != 0:
        last = (stderr.strip().splitlines() or [f"exit {code}"])[-1]
        raise ListingFailed(f"cannot list {command[-1]} to keep the folders a stage completed there ({last}); nothing "
                         f"was sent: check the connection, then submit again")
    source = Path(command[-2])
    clashing = [name for name in names if (source / name).exists()]
    note = ""
    if clashing:
        shown = ", ".join(clashing[:5]) + (f" and {len(clashing) - 5} more" if len(clashing) > 5 else "")
        note = (f"kept {len(clashing)} folder(s) of {command[-1]} that a snowpipe stage completed there ({shown}; "
                f"{RECORD_NAME}): not replaced by this machine's copy. To send yours instead, delete them there first")
    return [*command[:-2], *(f"--exclude=/{name}/" for name in names), *command[-2:]], note


def main(argv: list[str]) -> int:
    if "--" not in argv or not argv[argv.index("--") + 1:]:
        print(f"usage: python -m pipeline.submit.transfer [{KEEP_COMPLETED}] -- rsync ARGS... SOURCE DEST",
              file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1:]
    note = ""
    if KEEP_COMPLETED in argv[:argv.index("--")]:
        try:
            command, note = keep_completed(command)
        except ListingFailed as problem:
            print(problem, file=sys.stderr)
            return 1
    code, stdout, stderr = run_rsync(command)
    sys.stdout.write(stdout)
    if note:
        print(note, flush=True)
    if code != 0:
        last = (stderr.strip().splitlines() or [""])[-1]
        kind = "after retries" if transient(code, stderr) else "and cannot be retried"
        print(f"rsync to {command[-1]} failed {kind} (exit {code}: {last}); check the connection and the "
              f"inventory's host, user and key, then submit again: what arrived is kept", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
