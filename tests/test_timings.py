"""The C heap's policies (`timings.set_malloc_policy`). "return" (`set_mmap_threshold`): a
large block is mapped on its own even after a larger one was freed (which raises glibc's
dynamic threshold above it). "reuse": the pages a step freed serve the next step's blocks (no
fresh page faults) until `release_free_heap` hands them back."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from lbcl_jax import timings

def _probe(source: str, arg: str) -> list[str]:
  """Runs `source` in a fresh process (malloc's settings are process-wide) with glibc's own
  settings unless the probe sets some; its stdout's words."""
  env = dict(os.environ)
  for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
    env.pop(name, None)
  return subprocess.run([sys.executable, "-c", source, arg], env=env, capture_output=True,
                        text=True, check=True, timeout=120).stdout.split()


_PROBE = """
import ctypes, sys
from lbcl_jax import timings
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mapped(n):
  # glibc's chunk header (the size_t before the block) sets bit 2 on a block of its own mapping.
  p = libc.malloc(n)
  flags = ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value
  libc.free(p)
  return bool(flags & 2)

if sys.argv[1] == "fixed":
  assert timings.set_mmap_threshold(128 * 1024)
libc.free(libc.malloc(8 << 20))  # a freed 8 MiB mapping: the dynamic threshold rises to it
print(mapped(1 << 20))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
@pytest.mark.parametrize("mode, mapped", [("fixed", True), ("dynamic", False)])
def test_a_fixed_threshold_maps_large_blocks_after_a_larger_free(mode, mapped):
  out = _probe(_PROBE, mode)
  assert out[-1] == str(mapped)


def test_zero_leaves_the_threshold_alone():
  assert timings.set_mmap_threshold(0) is False


_REUSE_PROBE = """
import ctypes, sys
from lbcl_jax import timings
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
BLOCK, COUNT = 4 << 20, 16  # a step's buffers: 64 MiB in blocks below 32 MiB

def rss():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024

def step():  # allocate, touch, free, as a train step does with its buffers
  blocks = [libc.malloc(BLOCK) for _ in range(COUNT)]
  for p in blocks:
    ctypes.memset(p, 1, BLOCK)
  for p in reversed(blocks):
    libc.free(p)

print(timings.set_malloc_policy(sys.argv[1]))
libc.free(libc.malloc(BLOCK))  # glibc's dynamic threshold rises to a block's size
step()
before = timings.minor_faults()
step()
faults = timings.minor_faults() - before
held = rss()
released = timings.release_free_heap()
print(faults, held - rss(), released)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
@pytest.mark.parametrize("policy", ["reuse", "return", "glibc"])
def test_reuse_serves_the_next_step_from_the_pages_the_last_one_freed(policy):
  out = _probe(_REUSE_PROBE, policy)
  in_force, faults, dropped, released = out[-4], int(out[-3]), int(out[-2]), out[-1]
  assert in_force == policy
  pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
  if policy == "reuse":
    # The second step's blocks are the first one's pages; they stay resident until released.
    assert faults < pages // 20, faults
    assert released == "True" and dropped > (48 << 20), dropped
  else:
    # Mapped on their own ("return") or trimmed off the heap's top (glibc): fresh pages again.
    assert faults > pages // 2, faults
    assert released == "False" and abs(dropped) < (16 << 20), dropped


def test_an_unknown_policy_is_refused():
  with pytest.raises(ValueError, match="'fast'"):
    timings.set_malloc_policy("fast")
