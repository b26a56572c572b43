"""T5-small with the paper's and O-LoRA's settings (LB-CL, order 1 of the standard benchmark).

q and v adapters of rank 8, AdamW at a constant 1e-3, one epoch per task, global batch 64,
source 512 / target 50 tokens, greedy decoding scored by exact match.

  python -m lbcl_jax.main --config=configs/t5_small.py --workdir=$WORKDIR \
      --config.data.data_dir=/path/to/CL_Benchmark
"""

from lbcl_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.method = "lbcl"
  config.order = "1"
  config.model.family = "t5"
  # HF hub id or a local directory holding config.json + model.safetensors.
  config.model.path = "t5-small"
  config.adapters.rank = 8
  config.adapters.targets = "qv"
  config.data.source = "local"
  # O-LoRA's CL_Benchmark directory (or set data.source="hf" to sample from the hub).
  config.data.data_dir = "CL_Benchmark"
  config.data.max_source_length = 512
  config.data.max_target_length = 50
  config.optim.learning_rate = 1e-3
  config.optim.num_epochs = 1
  config.optim.global_batch_size = 64
  config.eval.mode = "generate"
  config.eval.max_new_tokens = 50
  return config
