"""What counts as bad input, as opposed to a bug.

`InputError` (a `ValueError`) marks a problem with what the user gave: a config value, a data
file, a model checkpoint, a workdir or a run checkpoint. Its message names the file, key or
value and says what was expected. `lbcl_jax.main` prints it as one `error: ...` line and exits
with status 2; any other exception is a bug and keeps its traceback.
"""


class InputError(ValueError):
  """Bad input: the message names the file, key or value and what was expected."""
