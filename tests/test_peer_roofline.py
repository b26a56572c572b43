"""Issue 33's roofline and XLA:CPU option sweep: the FLOP counters of benchmarks/peer_step.py
against analytic counts, and benchmarks/cpu_options.py's flag discovery."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_options
import peer_step

# A two-layer MLP, loss = sum((tanh(x @ w1) @ w2) ** 2), gradients wrt w1 and w2 only.
B, D, H, O = 16, 48, 64, 24
# Forward: x @ w1 (2BDH), h @ w2 (2BHO). Backward: dw2 = h^T dy (2BHO), dh = dy w2^T (2BOH),
# dw1 = x^T dpre (2BDH); no dx (x is not differentiated).
MLP_FLOPS = 4 * B * D * H + 6 * B * H * O


def _mlp_arrays():
  rng = np.random.default_rng(0)
  return (rng.standard_normal((B, D), dtype=np.float32),
          rng.standard_normal((D, H), dtype=np.float32) * 0.1,
          rng.standard_normal((H, O), dtype=np.float32) * 0.1)


def _jax_mlp_grad():
  def loss(w1, w2, x):
    return jnp.sum((jnp.tanh(x @ w1) @ w2) ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def test_xla_cost_analysis_counts_a_matmul_as_2mnk():
  m, k, n = 32, 80, 24
  compiled = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
  assert peer_step.xla_flops(compiled) == pytest.approx(2 * m * n * k, rel=1e-6)


def test_xla_flops_accepts_a_list_and_a_missing_count():
  class Fake:
    def __init__(self, cost):
      self.cost = cost

    def cost_analysis(self):
      return self.cost

  assert peer_step.xla_flops(Fake([{"flops": 12.0}])) == 12.0
  assert peer_step.xla_flops(Fake({"flops": 7.0})) == 7.0
  assert np.isnan(peer_step.xla_flops(Fake([])))
  assert np.isnan(peer_step.xla_flops(Fake(None)))


def test_jaxpr_and_xla_counts_of_an_mlp_step_match_the_analytic_count():
  x, w1, w2 = _mlp_arrays()
  grad = _jax_mlp_grad()
  # The jaxpr count is exact: matmuls only, before XLA's rewrites.
  assert peer_step.jaxpr_matmul_flops(jax.make_jaxpr(grad)(w1, w2, x)) == MLP_FLOPS
  # XLA's count adds the elementwise ops (tanh' , squares, ...): a few percent over it here
  # (B*H and B*O elements against 2*D or 2*H multiply-adds per element).
  xla = peer_step.xla_flops(grad.lower(w1, w2, x).compile())
  assert MLP_FLOPS <= xla <= 1.10 * MLP_FLOPS


def test_jaxpr_count_goes_into_scan_bodies_times_their_length():
  def f(w, xs):
    return jax.lax.scan(lambda c, x: (c + x @ w, None), jnp.zeros((4, 8)), xs)[0]
  jaxpr = jax.make_jaxpr(f)(jnp.ones((6, 8)), jnp.ones((5, 4, 6)))
  assert peer_step.jaxpr_matmul_flops(jaxpr) == 5 * 2 * 4 * 8 * 6


def test_flop_counter_mode_counts_the_mlp_step_as_jax_does():
  torch = pytest.importorskip("torch", reason="the PyTorch FLOP count needs torch")
  x, w1, w2 = (torch.from_numpy(a) for a in _mlp_arrays())
  w1.requires_grad_(True)
  w2.requires_grad_(True)

  def fwd_bwd():
    torch.sum((torch.tanh(x @ w1) @ w2) ** 2).backward()

  assert peer_step.torch_flops(fwd_bwd) == MLP_FLOPS
  assert w1.grad is not None  # the backward ran under the counter


def test_torch_count_includes_cpu_attention():
  torch = pytest.importorskip("torch", reason="the PyTorch FLOP count needs torch")
  b, h, s, d = 2, 4, 64, 32
  q = torch.randn(b, h, s, d, requires_grad=True)
  k, v = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
  mask = torch.ones(s, s, dtype=torch.bool).tril()
  fwd = 2 * (2 * b * h * s * s * d)  # q @ k^T and p @ v over the full S x S
  run = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
  assert peer_step.torch_flops(run) == fwd
  # Backward, by the registry's formula (flash attention's): q @ k^T recomputed, dv = p^T do,
  # dp = do v^T, dq = ds k, dk = ds^T q -- five S x S matmuls, whichever inputs need a
  # gradient (an explicit-matmul backward, as ours' jaxpr, has the four without the recompute).
  assert peer_step.torch_flops(lambda: run().sum().backward()) == fwd + 5 * fwd // 2


def test_matmul_peak_reports_both_libraries_and_the_better_one():
  pytest.importorskip("torch", reason="the peak is timed in torch too")
  peak = peer_step.matmul_peak([64, 128], reps=2)
  for lib in ("jax", "torch"):
    assert set(peak[lib]) == {"64", "128"}
    assert all(r["gflops"] > 0 for r in peak[lib].values())
  assert peak["peak_gflops"] == max(peak["jax_best_gflops"], peak["torch_best_gflops"])
  lib, n = peak["peak_from"].split(" n=")
  assert peak[lib][n]["gflops"] == peak["peak_gflops"]


def test_roofline_row_divides_flops_by_the_median_and_the_peak():
  stack = type("S", (), dict(flops=4e9, flops_counter="xla_cost_analysis", matmul_flops=2e9,
                             matmul_flops_counter="jaxpr_dot_general"))()
  row = peer_step.roofline_row(stack, median_s=0.5, peak_gflops=16.0)
  assert row["achieved_gflops"] == pytest.approx(8.0)
  assert row["fraction_of_peak"] == pytest.approx(0.5)
  assert row["matmul_achieved_gflops"] == pytest.approx(4.0)
  assert row["matmul_fraction_of_peak"] == pytest.approx(0.25)


# ----------------------------------------------------------------------------- cpu_options


def test_flag_discovery_reports_an_unknown_flag_unsupported_and_the_baseline_supported():
  base = cpu_options.probe_flags("")
  assert base["status"] == "supported", base
  unknown = cpu_options.probe_flags("--xla_cpu_no_such_option_for_this_test=true")
  assert unknown["status"] == "unsupported", unknown
  # A known flag with a value it refuses is a parse error too, not a failure.
  bad_value = cpu_options.probe_flags("--xla_cpu_use_xnnpack=maybe")
  assert bad_value["status"] == "unsupported", bad_value


def test_classify_separates_parse_errors_from_crashes():
  ok = cpu_options.classify_probe(0, cpu_options.PROBE_OK + "\n", "")
  assert ok["status"] == "supported"
  dep = cpu_options.classify_probe(
      0, cpu_options.PROBE_OK, '"xla_cpu_use_thunk_runtime" is no longer supported and ...')
  assert dep["status"] == "supported" and dep["deprecated"]
  assert cpu_options.classify_probe(
      -6, "", "F... Unknown flag in XLA_FLAGS: --xla_x=1")["status"] == "unsupported"
  assert cpu_options.classify_probe(-11, "", "Segmentation fault")["status"] == "error"
  # Exit 0 without the probe's answer is not support.
  assert cpu_options.classify_probe(0, "", "")["status"] == "error"


def test_candidates_needing_bf16_are_skipped_without_it():
  bf16 = [c for c in cpu_options.CANDIDATES if "bfloat16" in (c.dtype, c.dot_dtype)]
  assert any(c.dtype == "float32" for c in bf16)  # bf16 matmul operands alone count too
  assert bf16
  no_ext = {"vector_extensions": ["AVX2"]}
  amx = {"vector_extensions": ["AVX2", "AVX-512", "AMX", "BF16"]}
  assert all(cpu_options.hardware_skip(c, no_ext) for c in bf16)
  assert not any(cpu_options.hardware_skip(c, amx) for c in bf16)
  assert cpu_options.hardware_skip(cpu_options.CANDIDATES[0], no_ext) is None


def test_bf16_peak_times_bf16_products_and_says_so():
  pytest.importorskip("torch", reason="the peak is timed in torch too")
  peak = peer_step.matmul_peak([64], reps=1, dtype="bfloat16")
  assert peak["dtype"] == "bfloat16"
  assert peak["jax"]["64"]["gflops"] > 0 and peak["torch"]["64"]["gflops"] > 0


def test_dot_dtype_reaches_ours_and_names_its_own_output():
  from lbcl_jax.models import llama  # pylint: disable=g-import-not-at-top

  import core_overhead  # pylint: disable=g-import-not-at-top
  import driver_utils as du  # pylint: disable=g-import-not-at-top

  args = peer_step.parse_args(["--dot-dtype", "bfloat16"])
  assert args.output.name == "peer_step_bf16.json"
  plain = peer_step.parse_args([])
  assert plain.output.name == "peer_step.json"
  # Ours' backbone gets the option as the driver's loader applies it.
  model = llama.LlamaForCausalLM(llama.config_from_hf(du.TINY_LLAMA))
  for a in (args, plain):
    backbone = core_overhead.backbone_for(model, None, dot_dtype=a.dot_dtype)
    assert backbone.model.config.dot_dtype == a.dot_dtype
