"""TensorBoard scalars and hyper-parameters without TensorFlow.

`MetricWriter` logs every scalar through absl and, on the writing process, appends it to a
TensorBoard event file (`events.out.tfevents.*` in the workdir) through tensorboardX, which
needs only protobuf. clu's writer would import TensorFlow, which the core install lacks.

Hyper-parameters go to TensorBoard's HPARAMS plugin in the same event file (so the run's
scalars and its config sit in one place), and to the log.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from absl import logging


def _hparam_value(v: Any) -> bool | int | float | str:
  if isinstance(v, (bool, int, float, str)):
    return v
  return json.dumps(v)


class MetricWriter:
  """Scalars and hyper-parameters to the log and (unless `just_logging`) to TensorBoard.

  Args:
    logdir: the directory of the event file.
    just_logging: only log (processes other than the first of a multi-host run).
  """

  def __init__(self, logdir: str, *, just_logging: bool = False):
    self._tb = None
    if not just_logging:
      # Imported here: tensorboardX pulls in protobuf, which a `--help` need not pay for.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=30)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records the run's hyper-parameters (nested values as JSON strings)."""
    flat = {k: _hparam_value(v) for k, v in hparams.items()}
    logging.info("[Hyperparameters] %s", flat)
    if self._tb is not None:
      from tensorboardX import summary  # pylint: disable=g-import-not-at-top
      # The experiment and session-start summaries of the HPARAMS plugin; its metric list is
      # empty because the run's metrics are ordinary scalars below.
      experiment, session_start, _ = summary.hparams(flat, {})
      self._tb.file_writer.add_summary(experiment)
      self._tb.file_writer.add_summary(session_start)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Records `scalars` at `step`."""
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(scalars.items())))
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, float(value), int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
