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

def _probe(source: str, arg: str, environ=None) -> list[str]:
  """Runs `source` in a fresh process (malloc's settings are process-wide) with glibc's own
  settings unless the probe or `environ` sets some; its stdout's words."""
  env = dict(os.environ)
  for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
    env.pop(name, None)
  if environ is not None:
    env = environ
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


_HUGE_PROBE = """
import ctypes, sys
from lbcl_jax import timings
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
BLOCK = 256 << 20  # XLA:CPU's one working block a step, above every mmap threshold

def step():
  p = libc.malloc(BLOCK)
  ctypes.memset(p, 1, BLOCK)
  libc.free(p)

print(timings.set_malloc_policy(sys.argv[1]))
step()
before = timings.minor_faults()
step()
print(timings.huge_pages_in_force(), timings.minor_faults() - before)
"""

_NO_HUGE_PAGES = timings.huge_pages_environ({}) is None


@pytest.mark.skipif(_NO_HUGE_PAGES, reason="needs glibc >= 2.35 and the kernel's transparent "
                    "huge pages in 'madvise' mode (where they are 'always', nothing changes)")
@pytest.mark.parametrize("policy", ["reuse", "return"])
def test_huge_pages_environ_backs_a_steps_large_block_with_huge_pages(policy):
  """Under the environment `huge_pages_environ` gives, the block a step maps afresh faults
  about once per 2 MiB instead of once per 4 KiB page, whatever the heap's policy."""
  pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
  plain_env = dict(os.environ)
  plain_env.pop("GLIBC_TUNABLES", None)
  in_force, faults = _probe(_HUGE_PROBE, policy, environ=plain_env)[-2:]
  assert in_force == "False" and int(faults) > pages // 2, faults
  huge_env = timings.huge_pages_environ(plain_env)
  assert huge_env["GLIBC_TUNABLES"] == f"{timings.HUGE_PAGES_TUNABLE}=1"
  in_force, faults = _probe(_HUGE_PROBE, policy, environ=huge_env)[-2:]
  # 128 faults of 2 MiB; the kernel falls back to small pages only where it has no huge one.
  assert in_force == "True" and int(faults) < pages // 8, faults


def test_huge_pages_environ_keeps_the_users_tunables(monkeypatch):
  monkeypatch.setattr(timings, "_thp_mode", lambda: "madvise")
  monkeypatch.setattr(timings, "_glibc_version", lambda: (2, 36))
  env = timings.huge_pages_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
                 "HOME": "/h"}
  # A value the user chose stands (0: off), and the started process has nothing to do again.
  assert timings.huge_pages_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert timings.huge_pages_environ(env) is None
  assert timings.huge_pages_in_force(env)
  assert not timings.huge_pages_in_force({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})


@pytest.mark.parametrize("mode, glibc", [("always", (2, 36)), ("never", (2, 36)), (None, None),
                                         ("madvise", (2, 34)), ("madvise", None)])
def test_huge_pages_environ_is_none_where_it_cannot_help(monkeypatch, mode, glibc):
  """"always": every large block gets them already; "never", no such setting (not Linux), a
  glibc without the tunable or no glibc: the tunable cannot give them."""
  monkeypatch.setattr(timings, "_thp_mode", lambda: mode)
  monkeypatch.setattr(timings, "_glibc_version", lambda: glibc)
  assert timings.huge_pages_environ({}) is None
  assert timings.huge_pages_in_force({}) == (mode == "always")
