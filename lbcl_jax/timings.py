"""What a run costs: `Timings` (the wall seconds of one invocation, per phase, and its compile
time), the process's peak resident memory over a stretch of it (`reset_peak_rss`,
`peak_rss_bytes`) and its page faults (`minor_faults`), and how the process's C heap serves
XLA's buffers (`set_malloc_policy`, `release_free_heap`, `huge_pages_environ`): what keeps the
memory from creeping up without paying a fault per page of every step's buffers.

Importing it does not load JAX (the driver sets the heap's policy before JAX starts)."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import re
import resource
import sys
import time


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
      import jax  # pylint: disable=g-import-not-at-top
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
      else:  # the end of an outermost phase: what it freed goes back (the "reuse" policy)
        release_free_heap()

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


# glibc's mallopt parameters (malloc.h) and the most M_MMAP_THRESHOLD takes on 64-bit
# (HEAP_MAX_SIZE / 2).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024

# How a run's process allocates (config.process.malloc):
#   "reuse": blocks up to 32 MiB (glibc's largest mmap threshold) from the heap and no
#     trimming while a phase runs, so a step's buffers are the last step's pages; the free
#     heap goes back to the OS at the end of each phase and after each stage's first
#     (compiling) step (`release_free_heap`).
#   "return": glibc's mmap threshold fixed at config.process.mmap_threshold_bytes: blocks of at
#     least that size get mappings of their own, unmapped when freed.
#   "glibc": glibc's own (dynamic) settings.
MALLOC_POLICIES = ("reuse", "return", "glibc")
_policy = "glibc"  # the policy in force in this process (process-wide, as malloc is)


@functools.cache
def _libc():
  """glibc's `mallopt` and `malloc_trim`, or None off glibc (macOS, musl); loaded once."""
  try:
    libc = ctypes.CDLL(None)
    mallopt, trim = libc.mallopt, libc.malloc_trim
  except (OSError, AttributeError):
    return None
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  trim.argtypes = [ctypes.c_size_t]
  return mallopt, trim


def set_malloc_policy(policy: str, mmap_threshold_bytes: int = 128 * 1024) -> str:
  """Sets how this process's C heap serves XLA's buffers; returns the policy in force ("glibc"
  where it could not be set: off glibc, or a refused value).

  A training step allocates its buffers and frees them at its end, every step. Under "return"
  (issue 28's policy, `set_mmap_threshold`) each block of 128 KiB or more is a mapping of its
  own, unmapped when freed, so the next step faults its pages back in, zeroed: a SmolLM2 step
  faulted 680 thousand pages against 330 thousand under glibc's own settings, and ran 7-23 %
  slower than under them (fresh processes alternating, fixed-shape step; BENCHMARKS, "The C
  heap"). "reuse" fixes the threshold at its largest, 32 MiB, so those blocks come from the
  heap, and turns glibc's own trimming off (M_TRIM_THRESHOLD at its most), so the heap keeps
  the pages between steps; what a phase freed goes back to the OS when `release_free_heap`
  runs (the driver calls it at each phase's end and after a stage's compiling step), against
  the fragmented heap that compiles leave (what "return" was made for). A block above 32 MiB
  (XLA:CPU's one working block per execution, 1.26 GB for SmolLM2's step) is mapped on its
  own under every policy: serving it from the heap too (one arena, no mappings) cut the faults
  further but raised a 9-task run's peak RSS from 3.8 to 6.2 GiB. "glibc" leaves glibc's
  settings alone.
  """
  global _policy
  if policy not in MALLOC_POLICIES:
    raise ValueError(f"unknown malloc policy {policy!r}; expected one of {MALLOC_POLICIES}")
  if policy == "glibc":
    return _policy
  if policy == "return":
    if set_mmap_threshold(mmap_threshold_bytes):
      _policy = "return"
    return _policy
  # Setting either turns glibc's dynamic thresholds off, so both are set: blocks up to the
  # largest threshold from the heap, and the heap never trimmed by glibc itself.
  libc = _libc()
  if (libc is not None and libc[0](_M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)
      and libc[0](_M_TRIM_THRESHOLD, 2**31 - 1)):
    _policy = "reuse"
  return _policy


def release_free_heap() -> bool:
  """Under the "reuse" policy, hands the heap's free pages back to the OS (`malloc_trim`);
  returns whether it did. Between a phase's steps the pages stay, so that the next step reuses
  them; at a phase's end what it compiled and freed should not stay resident."""
  if _policy != "reuse":
    return False
  libc = _libc()
  if libc is None:
    return False
  libc[1](0)
  return True


def minor_faults() -> int:
  """The process's minor page faults so far: pages the kernel had to map (and zero) on first
  touch, which a step that reuses its buffers does not pay again."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# glibc's tunable (2.35 and later) that has malloc ask the kernel for transparent huge pages
# (madvise) for its mappings and its heap; glibc reads it once, when a process starts.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode(path: str = _THP_ENABLED) -> str | None:
  """The kernel's transparent-huge-page mode for anonymous memory ("always", "madvise",
  "never"), or None where there is no such setting (not Linux)."""
  try:
    with open(path) as f:
      match = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return None
  return match.group(1) if match else None


def _glibc_version() -> tuple[int, ...] | None:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, OSError, ValueError):  # not glibc (macOS, musl)
    return None
  return tuple(int(x) for x in re.findall(r"\d+", version)) if name == "glibc" else None


def _tunables(environ) -> dict[str, str]:
  items = (kv.partition("=") for kv in environ.get("GLIBC_TUNABLES", "").split(":") if kv)
  return {k: v for k, _, v in items}


def huge_pages_environ(environ=None) -> dict[str, str] | None:
  """The environment a process should start with so that malloc backs its large blocks with
  transparent huge pages, or None where it already does or cannot: the kernel gives them to
  every large block anyway ("always") or never, glibc is older than 2.35 or absent, or
  GLIBC_TUNABLES already names the tunable (the user's choice stands).

  XLA:CPU allocates an execution's working memory as one block and frees it at its end: 1.26
  GB for a SmolLM2 step, mapped and unmapped by glibc every step, so the kernel faults and
  zeroes 325 thousand 4 KiB pages a step; in huge pages, about 1.2 thousand faults (BENCHMARKS,
  "The C heap"). The kernel's default mode on most distributions is "madvise", where only
  memory that asks gets huge pages; this tunable makes glibc ask. It cannot be set in a
  running process: the driver starts its command again under it (`main.py`).
  """
  environ = os.environ if environ is None else environ
  if _thp_mode() != "madvise" or (_glibc_version() or (0,)) < (2, 35):
    return None
  tunables = _tunables(environ)
  if HUGE_PAGES_TUNABLE in tunables:
    return None
  out = dict(environ)
  out["GLIBC_TUNABLES"] = ":".join(
      [*(f"{k}={v}" for k, v in tunables.items()), f"{HUGE_PAGES_TUNABLE}=1"])
  return out


def huge_pages_in_force(environ=None) -> bool:
  """Whether malloc's large blocks get transparent huge pages in this process: the kernel's
  mode is "always", or "madvise" with glibc's tunable at 1 in the environment the process
  started with (glibc >= 2.35)."""
  environ = os.environ if environ is None else environ
  mode = _thp_mode()
  if mode == "always":
    return True
  return (mode == "madvise" and (_glibc_version() or (0,)) >= (2, 35)
          and _tunables(environ).get(HUGE_PAGES_TUNABLE) == "1")


def set_mmap_threshold(nbytes: int) -> bool:
  """Fixes glibc's mmap threshold at `nbytes` for this process; returns whether it was set
  (False for 0, which leaves the threshold alone, and off glibc: macOS, musl).

  glibc serves a block of at least the threshold with a mapping of its own and unmaps it when
  it is freed. Left alone the threshold is dynamic: each such block freed raises it to the
  block's size, up to 32 MiB, so XLA's buffers soon come from the heap, which the programs a
  long run compiles for new shapes leave fragmented, and the resident memory grows stage by
  stage. Fixed, large buffers go back to the OS when XLA frees them, and come back as fresh
  pages: it doubles a SmolLM2 step's page faults (the "reuse" policy of `set_malloc_policy`
  keeps the memory down without that).
  """
  if not nbytes:
    return False
  libc = _libc()
  if libc is None:
    return False
  return bool(libc[0](_M_MMAP_THRESHOLD, int(nbytes)))
