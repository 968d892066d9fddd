"""One error base class: every user-facing failure says what ran, what came back, and the fix."""

import errno

from pipeline.contract.formats import EXIT_CONFIG, EXIT_FAILED, EXIT_OUTPUT


class SnowpipeError(Exception):
    """A problem the user can fix (bad config, missing data, unreadable file).

    The CLI prints the message as one plain line and exits non-zero, without a traceback.
    """

    exit_code = EXIT_FAILED


class ConfigError(SnowpipeError):
    """pipeline-config.yml is invalid; the message lists every problem with its key path."""

    exit_code = EXIT_CONFIG


class DataError(SnowpipeError):
    """Input data is missing, unreadable or inconsistent (names the file or date)."""


class SceneError(DataError):
    """One scene cannot be processed; with several scenes the others still run."""

    def __init__(self, scene: str, message: str) -> None:
        super().__init__(f"scene {scene}: {message}")
        self.scene = scene  # the scene id, {TILE}_{YYYYMMDDTHHMMSS}
        self.detail = message


class OutputError(SnowpipeError):
    """An output cannot be written: disk full, quota, read-only or forbidden folder (names it and the fix).

    `errno` is the cause when an OSError told it (ENOSPC, EROFS, ...); it survives pickling (a pool worker's
    error reaches the parent with it)."""

    exit_code = EXIT_OUTPUT

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    @property
    def stops_every_output(self) -> bool:
        """A full disk, a quota or a read-only file system: no other output of the stage could be written either,
        so a per-scene stage stops instead of trying every other scene (a forbidden folder may be one scene's)."""
        return self.errno in STOPPING_ERRNOS


USER_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}
STOPPING_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def output_error(exc: OSError, target: object, needed: int | None = None) -> OutputError | None:
    """The one-line OutputError for an OSError a user can fix (full disk, read-only folder), else None."""
    reason = USER_ERRNOS.get(exc.errno or 0)
    if reason is None:
        return None
    where = exc.filename or target
    size = f" ({needed / 1e6:.1f} MB needed)" if needed else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space there or point the config's paths at a larger disk"
    else:
        fix = "make the folder writable for you or point the config's paths elsewhere"
    return OutputError(f"cannot write {where}: {reason}{size}; {fix}", exc.errno)
