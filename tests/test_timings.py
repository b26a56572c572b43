"""`timings.set_mmap_threshold`: with it, a large block is mapped on its own even after a
larger one was freed (which raises glibc's dynamic threshold above it)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from lbcl_jax import timings

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
  env = dict(os.environ)
  env.pop("MALLOC_MMAP_THRESHOLD_", None)  # glibc's own threshold unless the probe sets one
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True,
                       text=True, check=True, timeout=120).stdout.split()
  assert out[-1] == str(mapped)


def test_zero_leaves_the_threshold_alone():
  assert timings.set_mmap_threshold(0) is False
