"""User errors: one base class, one exit code per kind, one line on stderr.

A ``FedrunError`` is something the user can fix (a key, a path, a file); the message names the
key or path and says how. ``fedrun.__main__`` prints it as one ``fedrun: error: ...`` line, with
no traceback, and exits with the class's ``exit_code``. Anything else that escapes is a bug in
fedrun and keeps its traceback (exit code 1).

The codes let a scheduler or a wrapper script tell the kinds apart without parsing text; every
one of them means "retrying the same command fails the same way", so keep
``torchrun --max-restarts`` small (see docs/guide.md "Restarts and resume").

=========  ==========================  =====================================================
exit code  class                       raised when
=========  ==========================  =====================================================
2          ConfigError, PartitionError  a key, a value or the command line is wrong; a
                                        partition cannot be drawn with the given fed.* keys
3          DataError                   a data set is missing or unreadable (data.*)
4          RunDirError, ReportError    the run directory cannot be used as asked (run.*);
                                        ``fedrun report`` cannot read a run dir's files
5          CheckpointError             no usable checkpoint, or one of another config
6          MetricsError                scores cannot be set up (eval.*, Inception weights)
7          TrainingDivergedError       fed.max_bad_rounds rounds in a row without a usable
                                        client update (non-finite losses or weights)
=========  ==========================  =====================================================
"""

from __future__ import annotations


class FedrunError(Exception):
    """Base of every user error. ``exit_code`` is what ``python -m fedrun`` exits with."""

    exit_code: int = 2


class ConfigError(FedrunError, ValueError):
    """A user error in the configuration or the command line. The message names the key."""

    exit_code = 2


class PartitionError(ConfigError):
    """The requested partition cannot be drawn; the message names the fed.* key to change."""


class DataError(FedrunError):
    """A data set is missing or unusable. The message names the path/key and the fix."""

    exit_code = 3


class RunDirError(FedrunError):
    """The run directory cannot be used as asked; the message says how to fix it."""

    exit_code = 4


class ReportError(RunDirError):
    """``fedrun report`` cannot use a run dir (no summary.json, a file that does not parse). The
    message names the file and the fix."""


class CheckpointError(FedrunError):
    """No usable checkpoint, or one from another configuration. The message says what to do."""

    exit_code = 5


class MetricsError(FedrunError):
    """Scores cannot be computed (e.g. missing Inception weights). The message says the fix."""

    exit_code = 6


class TrainingDivergedError(FedrunError):
    """Too many rounds in a row without a single usable client update."""

    exit_code = 7
