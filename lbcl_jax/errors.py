"""What counts as bad input, as opposed to a bug.

`InputError` (a `ValueError`) marks a problem with what the user gave: a config value, a data
file, a model checkpoint, a workdir or a run checkpoint. Its message names the file, key or
value and says what was expected. The command lines (`lbcl_jax.main`, `lbcl_jax.export`) print
it with `exit_with` as one `error: ...` line and exit with status 2; any other exception is a
bug and keeps its traceback.
"""

import os
import sys
from typing import NoReturn

EXIT_BAD_INPUT = 2


def exit_with(message: str, status: int = EXIT_BAD_INPUT, prefix: str = "error", *,
              from_thread: bool = False) -> NoReturn:
  """Reports bad input (or another expected stop) as one `prefix: message` line on stderr and
  exits with `status`. `from_thread`: end the whole process at once (`os._exit`), as a
  watchdog thread must while the main thread is blocked; `sys.exit` would end only the thread."""
  line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
  print(f"{prefix}: {line}", file=sys.stderr, flush=True)
  if from_thread:
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)


class InputError(ValueError):
  """Bad input: the message names the file, key or value and what was expected."""


class Diverged(Exception):
  """The training loss became NaN or infinite, or collapsed (`config.optim.stop_on_collapse`);
  the message names the task, the step or steps and the value."""


class Preempted(Exception):
  """The run was asked to stop (SIGTERM) and saved a checkpoint to resume from."""
