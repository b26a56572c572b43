"""Llama-3-8B with LB-CL at the paper's settings, sharded as benchmarks/scale_plan.py planned.

q and v adapters of rank 8, AdamW at a constant 1e-3 (clipped at 1.0), one epoch per task,
global batch 64, prompts of 512 / answers of 50 tokens, greedy decoding scored by exact match.
bf16 compute and a bf16 frozen base (16 GB), every parameter, adapter and optimizer state split
over an fsdp axis of every device (`mesh.fsdp = -1`); each block's gathered weights are gathered
again for the backward pass instead of held (`model.remat = "weights"`). On 16-32 GiB chips
(TPU v5e, v4) with 8 or 16 rows a device, recompute the blocks instead
(`--config.model.remat=full`): BENCHMARKS.md's "Pod scale on paper" has the plan, and
launch/llama3_8b.sh the commands for a TPU pod slice and a GPU cluster.

  python -m lbcl_jax.main --config=configs/llama3_8b.py --workdir=$WORKDIR \
      --config.data.data_dir=/path/to/CL_Benchmark

The weights are gated on the Hugging Face hub (accept the licence, then `huggingface-cli
login`), or name a local directory with `--config.model.path`.
"""

from lbcl_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.method = "lbcl"
  config.order = "1"
  config.model.family = "llama"
  config.model.path = "meta-llama/Meta-Llama-3-8B"
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.model.remat = "weights"
  config.adapters.rank = 8
  config.adapters.targets = "qv"
  config.data.source = "local"
  config.data.data_dir = "CL_Benchmark"
  config.data.max_source_length = 512
  config.data.max_target_length = 50
  config.optim.learning_rate = 1e-3
  config.optim.grad_clip = 1.0
  config.optim.num_epochs = 1
  config.optim.global_batch_size = 64
  config.eval.mode = "generate"
  config.eval.max_new_tokens = 50
  config.eval.batch_size = 64
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 1
  return config
