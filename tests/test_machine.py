"""benchmarks/machine.py: which CPU a benchmark figure came from."""

from __future__ import annotations

import json

import pytest

import machine

SAPPHIRE = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Some Other Name
flags\t\t: fpu sse2
"""

ZEN2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma bmi2
"""

ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics
"""


def test_intel_with_amx_lists_every_extension_of_the_first_processor():
  d = machine.describe(SAPPHIRE)
  assert d["cpu_model"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
  assert d["vector_extensions"] == ["AVX2", "AVX-512", "AMX", "BF16"]
  assert d["usable_cores"] >= 1 and d["logical_cores"] >= d["usable_cores"]


def test_amd_avx2_only_and_arm_have_no_avx512():
  assert machine.describe(ZEN2)["vector_extensions"] == ["AVX2"]
  assert machine.describe(ZEN2)["cpu_model"] == "AMD EPYC 7B12"
  arm = machine.describe(ARM)
  assert arm["vector_extensions"] == []
  assert "no AVX2" in machine.summary(arm)


def test_without_cpuinfo_the_extensions_are_unknown_not_none_found():
  d = machine.describe("")
  assert d["vector_extensions"] is None
  assert d["cpu_model"]  # platform's name stands in
  assert "extensions unknown" in machine.summary(d)


def test_summary_names_model_extensions_and_cores():
  d = machine.describe(SAPPHIRE)
  assert machine.summary(d) == (f"Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz "
                                f"(family 6 model 143; AVX2, AVX-512, AMX, BF16), "
                                f"{d['usable_cores']} cores")


GENERIC_ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu avx2 avx512f avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC
"""


def test_a_generic_model_name_is_told_apart_by_family_and_model():
  # Cloud VMs name the CPU "AMD EPYC" whatever its generation: the first processor's family
  # and model numbers say which (25 / 17: Zen 4); without them (ARM, old records) none.
  d = machine.describe(GENERIC_ZEN4)
  assert d["cpu_id"] == "family 25 model 17"
  assert machine.summary(d).startswith("AMD EPYC (family 25 model 17; AVX2, AVX-512, BF16), ")
  assert machine.describe(ZEN2)["cpu_id"] is None
  assert machine.describe(ARM)["cpu_id"] is None
  old_record = {k: v for k, v in d.items() if k != "cpu_id"}
  assert machine.summary(old_record).startswith("AMD EPYC (AVX2, AVX-512, BF16), ")


def test_write_record_writes_whole_records_or_nothing(tmp_path, capsys):
  out = tmp_path / "results" / "bench.json"  # its folder is made
  machine.write_record(out, {"step_ms": [1.5, 2.0], "machine": {"cpu_model": "X"}})
  assert json.loads(out.read_text()) == {"step_ms": [1.5, 2.0], "machine": {"cpu_model": "X"}}
  assert capsys.readouterr().out.strip() == f"wrote {out}"
  with pytest.raises(TypeError):  # a record that cannot be written leaves the last one
    machine.write_record(out, {"step_ms": object()})
  assert json.loads(out.read_text())["step_ms"] == [1.5, 2.0]
  assert [p.name for p in out.parent.iterdir()] == ["bench.json"]


def test_an_accelerator_is_named_beside_the_cpu_and_the_cpu_platform_is_not():
  gpu = {"platform": "gpu", "kind": "NVIDIA H200", "count": 1}
  d = machine.describe(SAPPHIRE, accelerator=gpu)
  assert d["accelerator"] == gpu
  assert machine.summary(d).endswith("cores, with 1 x NVIDIA H200 (gpu)")
  host = machine.describe(SAPPHIRE, accelerator={"platform": "cpu", "kind": "cpu", "count": 1})
  assert "accelerator" not in host and "with" not in machine.summary(host)
