"""User-facing errors.

Every mistake a user can make (a bad config key, a missing file, a corrupt cache, a target of the
wrong shape) raises a subclass of :class:`MtlcvError` with a one-line message that names the
file, key or value and what was expected. The CLI prints that line and exits with code 2; it
never shows a traceback for such errors.
"""


class MtlcvError(Exception):
    """Base class of every error caused by user input (exit code 2 in the CLI)."""

    exit_code = 2


class ConfigError(MtlcvError):
    """A configuration key, value or type is invalid."""


class DataError(MtlcvError):
    """A dataset file, folder or sample is missing, corrupt or of the wrong shape."""


class CheckpointError(MtlcvError):
    """A checkpoint or run directory is missing or unreadable."""


class TrainingError(MtlcvError):
    """Training cannot go on (e.g. a loss became NaN); the last epoch's checkpoint is intact."""


class Preempted(MtlcvError):
    """Training stopped on request (SIGTERM) after writing a checkpoint; resume to continue.

    Not a mistake: the CLI prints the message without "error" and exits with 75 (``EX_TEMPFAIL``
    of sysexits.h, "try again later"), distinct from errors (2), Ctrl-C (130) and a kill (137).
    """

    exit_code = 75
