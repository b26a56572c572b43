"""LB-CL in JAX/Flax: parameter-efficient continual learning with SVD adapters.

Importing the package stays light (jax, flax, optax only); models, data and the driver
live in submodules that pull in heavier dependencies on demand.
"""

from lbcl_jax.projection import orthogonal_projection
from lbcl_jax.projection import scale_by_orthogonal_projection

__version__ = "0.1.0"

__all__ = ["orthogonal_projection", "scale_by_orthogonal_projection", "__version__"]
