"""flan-t5-small (T5 v1.1 shape: gated-GELU, untied head) with the paper's LB-CL settings.

With no weights at hand (as on this project's CI machines), `--config.model.random_init=True
--config.model.path=../shared/t5_tokenizer/flan-t5-small` trains the same shape from random
weights, which is what the benchmarks time.
"""

from lbcl_jax import config_lib


def get_config():
  return config_lib.t5_benchmark_config("google/flan-t5-small")
