"""benchmarks/machine.py: which CPU a benchmark figure came from."""

from __future__ import annotations

import machine

SAPPHIRE = """processor\t: 0
vendor_id\t: GenuineIntel
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
                                f"(AVX2, AVX-512, AMX, BF16), {d['usable_cores']} cores")
