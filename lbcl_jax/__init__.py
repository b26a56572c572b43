"""LB-CL in JAX/Flax: parameter-efficient continual learning with SVD adapters.

Importing the package loads nothing heavy: the optax transform (`orthogonal_projection`,
`scale_by_orthogonal_projection`) loads JAX on first use, so that the driver's command line
can answer a flag error, or restart itself under glibc's huge-page setting
(`timings.huge_pages_environ`), before JAX starts. Models, data and the driver live in
submodules that pull in heavier dependencies on demand.
"""

import importlib

__version__ = "0.1.0"

__all__ = ["orthogonal_projection", "scale_by_orthogonal_projection", "__version__"]

_LAZY = {"orthogonal_projection": "lbcl_jax.projection",
         "scale_by_orthogonal_projection": "lbcl_jax.projection"}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'lbcl_jax' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_LAZY])
