"""all-MiniLM-L6-v2 (label-name scoring) on a local CL_Benchmark directory.

  python -m lbcl_jax.main --config=configs/minilm_cl_benchmark.py --workdir=/tmp/minilm_cl \
      --config.data.data_dir=../shared/cl_benchmark

The default order is the paper's order 1 with yahoo replaced by yelp (the project's local copy of
the benchmark has no yahoo); `--config.order=1` runs it as published on a full copy. Model and
optimizer settings are the embedded default's (`config_lib.default_config`).
"""

from lbcl_jax import config_lib


def get_config():
  config = config_lib.default_config()
  config.order = "dbpedia,amazon,yelp,agnews"
  config.data.source = "local"
  config.data.data_dir = "../shared/cl_benchmark"
  # A CPU-sized slice of the benchmark; set both to 0 for the whole files.
  config.data.train_per_class = 100
  config.data.max_test_examples = 500
  config.data.max_source_length = 128
  config.data.max_target_length = 16
  # Up to 14 classes x 100 sentences per task: one epoch.
  config.optim.num_epochs = 1
  config.optim.global_batch_size = 32
  config.checkpoint.every_steps = 100
  return config
