"""The machine a benchmark ran on: CPU model, vector extensions, cores.

Speed ratios between XLA:CPU and PyTorch (oneDNN) move with the CPU (AVX2 against AVX-512, AMX
and BF16 units), so every benchmark JSON carries `describe()` and every table names its machine
by `summary()`. Linux's /proc/cpuinfo is read; elsewhere the model is `platform.processor()` and
the extensions are unknown (an empty list, not "none").
"""

from __future__ import annotations

import os
import pathlib
import platform
from typing import Any, Optional

# cpuinfo flag -> the name tables use, in the order they are listed.
EXTENSIONS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("amx_tile", "AMX"),
              ("avx512_bf16", "BF16"))


def parse_cpuinfo(text: str) -> tuple[Optional[str], Optional[set[str]]]:
  """(model name, flags) of the first processor in a /proc/cpuinfo text (None where absent;
  ARM's cpuinfo names its flags `Features`)."""
  model = flags = None
  for line in text.splitlines():
    key, sep, value = line.partition(":")
    key = key.strip()
    if not sep:
      if model is not None and flags is not None:
        break  # the first processor's block is done
      continue
    if key == "model name" and model is None:
      model = value.strip()
    elif key in ("flags", "Features") and flags is None:
      flags = set(value.split())
  return model, flags


def describe(cpuinfo: Optional[str] = None) -> dict[str, Any]:
  """The CPU model, its vector extensions (None: unknown on this OS), the logical cores and
  the cores this process may use."""
  if cpuinfo is None:
    try:
      cpuinfo = pathlib.Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
      cpuinfo = ""
  model, flags = parse_cpuinfo(cpuinfo)
  usable = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count())
  return {
      "cpu_model": model or platform.processor() or platform.machine(),
      "vector_extensions": (None if flags is None
                            else [name for flag, name in EXTENSIONS if flag in flags]),
      "logical_cores": os.cpu_count(),
      "usable_cores": usable,
      "arch": platform.machine(),
  }


def summary(desc: Optional[dict[str, Any]] = None) -> str:
  """One line for a table: "Intel(R) Xeon(R) Processor (AVX2, AVX-512, AMX, BF16), 2 cores"."""
  d = describe() if desc is None else desc
  ext = d["vector_extensions"]
  ext_text = "extensions unknown" if ext is None else (", ".join(ext) or "no AVX2")
  return f"{d['cpu_model']} ({ext_text}), {d['usable_cores']} cores"
