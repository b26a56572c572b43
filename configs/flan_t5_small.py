"""flan-t5-small (T5 v1.1 shape: gated-GELU, untied head) with the paper's LB-CL settings.

With no weights at hand (as on this project's CI machines), `--config.model.random_init=True
--config.model.path=../shared/t5_tokenizer/flan-t5-small` trains the same shape from random
weights, which is what the benchmarks time.
"""

from lbcl_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.method = "lbcl"
  config.order = "1"
  config.model.family = "t5"
  config.model.path = "google/flan-t5-small"
  config.adapters.rank = 8
  config.data.source = "local"
  config.data.data_dir = "CL_Benchmark"
  config.data.max_source_length = 512
  config.data.max_target_length = 50
  config.optim.learning_rate = 1e-3
  config.optim.global_batch_size = 64
  config.eval.max_new_tokens = 50
  return config
