"""T5-large with the paper's and O-LoRA's settings (LB-CL, order 1 of the standard benchmark).

q and v adapters of rank 8, AdamW at a constant 1e-3, one epoch per task, global batch 64,
source 512 / target 50 tokens, greedy decoding scored by exact match; bf16 compute,
parameters sharded over fsdp.

  python -m lbcl_jax.main --config=configs/t5_large.py --workdir=$WORKDIR \
      --config.data.data_dir=/path/to/CL_Benchmark
"""

from lbcl_jax import config_lib


def get_config():
  return config_lib.t5_benchmark_config("t5-large", shard_params=True)
