"""Errors a user can act on, and the exit codes ``main.py`` maps outcomes to.

``UserError`` (a ValueError) covers every refusal of bad input: a config value, a
config variant, a missing file, a ``--checkpoint`` choice, a workdir holding another
run. ``main.py`` prints its message as one line and exits 2; anything else is a bug
and keeps its traceback.
"""

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_PREEMPTED = 143   # 128 + SIGTERM, what a scheduler expects of a preempted job


class UserError(ValueError):
  """Bad input, named with what would be valid; nothing was written."""


class NotFoundError(UserError, FileNotFoundError):
  """A workdir, checkpoint or file the user named does not exist."""


class CorruptCheckpointError(UserError):
  """A checkpoint directory that cannot be read; the message names the file."""


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss or state; nothing of it was saved."""
