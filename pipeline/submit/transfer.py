"""rsync that survives a dropped connection: `python -m pipeline.submit.transfer -- rsync ARGS...`.

The submit playbook sends data through it. A transfer cut by the network (rsync exit 10, 12, 30, 35, or 255 with
a lost connection) is run again after 2, 4, 8 ... seconds; rsync's `--partial` keeps what arrived, and its quick
check skips complete files, so a retry sends only the rest. A refusal that waiting cannot fix (host key, login,
permissions) stops at once. Either way the last failure is one line naming the fix.
"""

from __future__ import annotations

import subprocess
import sys
import time

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


def main(argv: list[str]) -> int:
    if "--" not in argv or not argv[argv.index("--") + 1:]:
        print("usage: python -m pipeline.submit.transfer -- rsync ARGS...", file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1:]
    code, stdout, stderr = run_rsync(command)
    sys.stdout.write(stdout)
    if code != 0:
        last = (stderr.strip().splitlines() or [""])[-1]
        kind = "after retries" if transient(code, stderr) else "and cannot be retried"
        print(f"rsync to {command[-1]} failed {kind} (exit {code}: {last}); check the connection and the "
              f"inventory's host, user and key, then submit again: what arrived is kept", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
