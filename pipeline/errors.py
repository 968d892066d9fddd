"""One error base class: every user-facing failure says what ran, what came back, and the fix."""


class SnowpipeError(Exception):
    """A problem the user can fix (bad config, missing data, unreadable file).

    The CLI prints the message as one plain line and exits non-zero, without a traceback.
    """

    exit_code = 1


class ConfigError(SnowpipeError):
    """pipeline-config.yml is invalid; the message lists every problem with its key path."""

    exit_code = 2


class DataError(SnowpipeError):
    """Input data is missing, unreadable or inconsistent (names the file or date)."""


class SceneError(DataError):
    """One scene cannot be processed; with several scenes the others still run."""

    def __init__(self, date: str, message: str) -> None:
        super().__init__(f"scene {date}: {message}")
        self.date = date
        self.detail = message
