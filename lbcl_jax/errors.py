"""What counts as bad input, as opposed to a bug.

`InputError` (a `ValueError`) marks a problem with what the user gave: a config value, a data
file, a model checkpoint, a workdir or a run checkpoint. Its message names the file, key or
value and says what was expected. `lbcl_jax.main` prints it as one `error: ...` line and exits
with status 2; any other exception is a bug and keeps its traceback.
"""


class InputError(ValueError):
  """Bad input: the message names the file, key or value and what was expected."""


class Diverged(Exception):
  """The training loss became NaN or infinite; the message names the task, step and value."""


class Preempted(Exception):
  """The run was asked to stop (SIGTERM) and saved a checkpoint to resume from."""
