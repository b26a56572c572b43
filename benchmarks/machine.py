"""The machine a benchmark ran on: CPU model, vector extensions, cores.

Speed ratios between XLA:CPU and PyTorch (oneDNN) move with the CPU (AVX2 against AVX-512, AMX
and BF16 units), so every benchmark JSON carries `describe()` and every table names its machine
by `summary()`. Linux's /proc/cpuinfo is read; elsewhere the model is `platform.processor()` and
the extensions are unknown (an empty list, not "none").
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
from typing import Any, Mapping, Optional

# cpuinfo flag -> the name tables use, in the order they are listed.
EXTENSIONS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("amx_tile", "AMX"),
              ("avx512_bf16", "BF16"))


def parse_cpuinfo(text: str) -> tuple[Optional[str], Optional[set[str]]]:
  """(model name, flags) of the first processor in a /proc/cpuinfo text (None where absent;
  ARM's cpuinfo names its flags `Features`)."""
  return _model_and_flags(_first_processor(text))


def _model_and_flags(fields: Mapping[str, str]) -> tuple[Optional[str], Optional[set[str]]]:
  flags = fields.get("flags", fields.get("Features"))
  return fields.get("model name"), (None if flags is None else set(flags.split()))


def _first_processor(text: str) -> dict[str, str]:
  """The first processor's `key: value` lines of a /proc/cpuinfo text."""
  fields: dict[str, str] = {}
  for line in text.splitlines():
    key, sep, value = line.partition(":")
    key = key.strip()
    if not sep:
      if fields:
        break  # the first processor's block is done
      continue
    fields.setdefault(key, value.strip())
  return fields


def x86_id(text: str) -> Optional[str]:
  """"family F model M" of the first processor (x86 only, else None): cloud VMs often name the
  CPU only "AMD EPYC" or "Intel(R) Xeon(R) Processor", and the family and model numbers are
  what tell its generation (family 25 model 17: AMD Zen 4; family 6 model 143: Intel Sapphire
  Rapids)."""
  return _x86_id(_first_processor(text))


def _x86_id(fields: Mapping[str, str]) -> Optional[str]:
  family, model = fields.get("cpu family"), fields.get("model")
  if not (family and model and family.isdigit() and model.isdigit()):
    return None
  return f"family {family} model {model}"


def describe(cpuinfo: Optional[str] = None,
             accelerator: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """The CPU model, its vector extensions (None: unknown on this OS), the logical cores and
  the cores this process may use; and `accelerator`, a run's `{"platform", "kind", "count"}`
  (its results' `devices`), where that platform is not the CPU."""
  if cpuinfo is None:
    try:
      cpuinfo = pathlib.Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
      cpuinfo = ""
  fields = _first_processor(cpuinfo)  # parsed once; both readings come from it
  model, flags = _model_and_flags(fields)
  ident = _x86_id(fields)
  usable = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count())
  out = {
      "cpu_model": model or platform.processor() or platform.machine(),
      # x86 "family F model M" (None elsewhere): the generation behind a generic model name.
      "cpu_id": ident,
      "vector_extensions": (None if flags is None
                            else [name for flag, name in EXTENSIONS if flag in flags]),
      "logical_cores": os.cpu_count(),
      "usable_cores": usable,
      "arch": platform.machine(),
  }
  if accelerator and accelerator.get("platform") != "cpu":
    out["accelerator"] = dict(accelerator)
  return out


def summary(desc: Optional[dict[str, Any]] = None) -> str:
  """One line for a table: "AMD EPYC (family 25 model 17; AVX2, AVX-512, BF16), 2 cores", and
  ", with 1 x NVIDIA H200 (gpu)" where the record names an accelerator."""
  d = describe() if desc is None else desc
  ext = d["vector_extensions"]
  ext_text = "extensions unknown" if ext is None else (", ".join(ext) or "no AVX2")
  ident = d.get("cpu_id")  # absent from records written before it existed
  acc = d.get("accelerator")
  return (f"{d['cpu_model']} ({f'{ident}; ' if ident else ''}{ext_text}), "
          f"{d['usable_cores']} cores"
          + (f", with {acc['count']} x {acc['kind']} ({acc['platform']})" if acc else ""))


def write_record(path: pathlib.Path, doc: Mapping[str, Any]) -> None:
  """Writes a benchmark's JSON record whole or not at all (a stopped run leaves the last one),
  and says where."""
  from lbcl_jax import files  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  files.atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
  print(f"wrote {path}")
