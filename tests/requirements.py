"""What a test needs from the machine it runs on, and what happens when the machine lacks it.

`need(condition, reason)` is the one way a test says so. When a test's real part cannot run here (accounting
through slurmdbd + MariaDB, a tmpfs mount, root, sshd, SLURM), the test skips with the reason on a developer's
machine and FAILS with it under CI (`CI=true`: .ci/run sets it, CI systems set it too). A CI that passes by
skipping has tested nothing, so CI must provide every real part.

Only hardware this machine lacks may skip under CI: a test marked `gpu` (HARDWARE_MARKERS) skips where torch sees
no CUDA device (tests/conftest.py). Any other skip under CI, however it was raised (`pytest.skip`, `skipif`,
`importorskip`), becomes a failure in conftest.py's report hook, so a new skip cannot slip past this module; and
the session ends with the count of skipped tests by marker.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Generator

import pytest

HARDWARE_MARKERS = {"gpu": "a CUDA GPU (torch.cuda.is_available() is false here)"}
"""Markers of hardware a machine may lack: the only tests that may skip under CI, and only for that reason."""


def in_ci() -> bool:
    """True when `CI` is set to a true value (`true`, `1`, `yes`, `on`), as .ci/run and CI systems set it."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def ci_refusal(reason: str) -> str:
    """The failure a test gets under CI instead of a skip."""
    return (f"CI=true: this test cannot run its real part here and CI allows no skip for it: {reason} "
            f"(only tests marked {', '.join(HARDWARE_MARKERS)} may skip under CI; locally this skips)")


def need(condition: bool, reason: str) -> None:
    """Go on when `condition` holds; else skip with `reason` locally, fail with it under CI."""
    if condition:
        return
    if in_ci():
        pytest.fail(ci_refusal(reason), pytrace=False)
    pytest.skip(reason)


@functools.cache
def private_mounts() -> str | None:
    """None when `unshare -m` gives this process a private mount namespace (root, or user namespaces) in which a
    test may mount a real tmpfs; else why not."""
    if shutil.which("unshare") is None:
        return "`unshare` is not installed (Debian package util-linux)"
    done = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if done.returncode:
        return f"`unshare -m true` failed (exit {done.returncode}): {done.stderr.strip() or 'no output'}"
    return None


def need_private_mounts() -> None:
    """A real tmpfs mounted in a private mount namespace (a full or read-only folder for one subprocess)."""
    why = private_mounts()
    need(why is None, f"needs `unshare -m` to mount a tmpfs: {why}")


def need_root(what: str) -> None:
    """`what` (mounting a tmpfs, switching to another user) needs root."""
    need(os.geteuid() == 0, f"{what} needs root (running as uid {os.geteuid()})")


@functools.cache
def cuda_available() -> bool:
    import torch  # only for tests marked gpu: torch takes seconds to import

    return bool(torch.cuda.is_available())


# ---------------------------------------------------------------- hooks (imported into tests/conftest.py)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `gpu` skips where torch sees no CUDA device: the one skip CI allows."""
    if item.get_closest_marker("gpu") is not None and not cuda_available():
        pytest.skip(f"needs {HARDWARE_MARKERS['gpu']}")


def _skip_reason(longrepr: object) -> str:
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return str(reason).removeprefix("Skipped: ")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI a skip is a failure with its reason, unless the test is marked for hardware this machine lacks."""
    report = yield
    if report.skipped and in_ci() and not hasattr(report, "wasxfail") \
            and not any(item.get_closest_marker(marker) for marker in HARDWARE_MARKERS):
        report.outcome = "failed"
        report.longrepr = ci_refusal(_skip_reason(report.longrepr))
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector
                               ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """A whole module skipped at import (`importorskip`, `skip(allow_module_level=True)`) fails under CI too."""
    report = yield
    if report.skipped and in_ci():
        report.outcome = "failed"
        report.longrepr = ci_refusal(_skip_reason(report.longrepr))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    """The session's last word on skips: how many, by marker (hardware markers first), so CI shows what it left."""
    registered = [line.split(":")[0].strip() for line in config.getini("markers")]
    order = [*HARDWARE_MARKERS, *(name for name in registered if name not in HARDWARE_MARKERS)]
    counts: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        keywords = getattr(report, "keywords", None) or {}
        counts[next((name for name in order if name in keywords), "unmarked")] += 1
    shown = ", ".join(f"{name} {counts[name]}" for name in [*order, "unmarked"] if counts[name]) or "none"
    allowed = f" (CI=true: only tests marked {', '.join(HARDWARE_MARKERS)} may skip)" if in_ci() else ""
    terminalreporter.write_line(f"skipped tests by marker: {shown}{allowed}")
