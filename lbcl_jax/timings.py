"""What a run costs: `Timings` (the wall seconds of one invocation, per phase, and its compile
time) and the process's peak resident memory over a stretch of it (`reset_peak_rss`,
`peak_rss_bytes`), which `set_mmap_threshold` keeps from creeping up."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import resource
import sys
import time

import jax


class Timings:
  """Wall seconds of this invocation per phase, and how much of them JAX spent compiling.

  A phase entered inside another pauses the outer one, so the phases add up to the time spent
  inside them. `compile` (tracing, lowering and XLA compilation, from JAX's own monitoring
  events) overlaps the phases it happened in.
  """

  _compile_seconds = 0.0
  _listening = False

  def __init__(self):
    self.seconds: dict[str, float] = collections.defaultdict(float)
    if not Timings._listening:
      # One process-wide listener (JAX cannot scope one to a run); runs read deltas of it.
      jax.monitoring.register_event_duration_secs_listener(Timings._on_event)
      Timings._listening = True
    self._compile_start = Timings._compile_seconds
    self._stack: list[list] = []  # [name, start] of the open phases, innermost last

  @staticmethod
  def _on_event(name: str, seconds: float, **_) -> None:
    if name.startswith("/jax/core/compile/"):
      Timings._compile_seconds += seconds

  @contextlib.contextmanager
  def phase(self, name: str):
    now = time.perf_counter()
    if self._stack:
      outer = self._stack[-1]
      self.seconds[outer[0]] += now - outer[1]
    self._stack.append([name, now])
    try:
      yield
    finally:
      now = time.perf_counter()
      self.seconds[name] += now - self._stack.pop()[1]
      if self._stack:
        self._stack[-1][1] = now

  def as_dict(self) -> dict[str, float]:
    """Seconds per phase so far, the open phases up to now included."""
    seconds = dict(self.seconds)
    now = time.perf_counter()
    for name, start in self._stack:
      seconds[name] = seconds.get(name, 0.0) + now - start
    out = {k: round(v, 3) for k, v in seconds.items()}
    out["compile"] = round(Timings._compile_seconds - self._compile_start, 3)
    return out


def compile_seconds() -> float:
  """The process's seconds of JAX compilation so far (tracing, lowering and XLA compilation;
  counted once a `Timings` exists): a stretch's compile time is the difference across it."""
  return Timings._compile_seconds


def reset_peak_rss() -> bool:
  """Starts a new peak-RSS window: Linux resets the process's high-water mark (VmHWM) to its
  current RSS on writing "5" to /proc/self/clear_refs. False where that is not possible (not
  Linux, or no permission): `peak_rss_bytes` then reads the process's peak since it started."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_bytes() -> int:
  """The process's peak resident memory in bytes since the last `reset_peak_rss` (or since it
  started)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024  # reported in kB
  except OSError:
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, else kB


# glibc's M_MMAP_THRESHOLD (malloc.h) and the most it takes on 64-bit (HEAP_MAX_SIZE / 2).
_M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024


def set_mmap_threshold(nbytes: int) -> bool:
  """Fixes glibc's mmap threshold at `nbytes` for this process; returns whether it was set
  (False for 0, which leaves the threshold alone, and off glibc: macOS, musl).

  glibc serves a block of at least the threshold with a mapping of its own and unmaps it when
  it is freed. Left alone the threshold is dynamic: each such block freed raises it to the
  block's size, up to 32 MiB, so XLA's buffers soon come from the heap, which the programs a
  long run compiles for new shapes leave fragmented, and the resident memory grows stage by
  stage. Fixed, large buffers go back to the OS when XLA frees them. The training step was not
  slower for it (BENCHMARKS, "The long benchmark").
  """
  if not nbytes:
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):  # no C library to load, or not glibc's
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  return bool(mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
