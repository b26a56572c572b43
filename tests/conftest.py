"""Shared pytest fixtures: where ../shared lives, and skipping cleanly when it does not; one
persistent XLA compilation cache for the whole run."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_dir() -> pathlib.Path:
  """The read-only shared/ folder beside the checkout (override with LBCL_SHARED_DIR)."""
  return pathlib.Path(os.environ.get("LBCL_SHARED_DIR", REPO_ROOT.parent / "shared"))


def require_shared(*parts: str) -> pathlib.Path:
  """Returns shared/<parts>, or skips the test with the reason when it is absent."""
  path = shared_dir().joinpath(*parts)
  if not path.exists():
    pytest.skip(f"{path} is absent: this test needs the project's shared/ data beside the checkout")
  return path


@pytest.fixture
def cl_benchmark_dir() -> pathlib.Path:
  return require_shared("cl_benchmark")


@pytest.fixture
def t5_tokenizer_dir() -> pathlib.Path:
  return require_shared("t5_tokenizer")


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch", reason="HF parity tests need torch")


@pytest.fixture(scope="module")
def transformers(torch):
  del torch
  return pytest.importorskip("transformers", reason="HF parity tests need transformers")


@pytest.fixture(scope="module")
def one_torch_thread():
  """torch on one thread for a module: its two intra-op threads busy-wait against JAX's thread
  pool on a 2-core machine (HF generate ran 30x slower after a JAX computation)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
  except ImportError:
    yield
    return
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def persistent_compilation_cache(tmp_path_factory):
  """One persistent XLA cache for the run: both pytest-xdist workers and every `main` process
  a test starts (through the environment) read and write it.

  Most tests build a tiny model and jit its functions anew (in process or in a fresh `main`
  process), so without it each one compiles what another test did: the same train step,
  the same evaluation. A cached program is the same executable, so results are unchanged
  (the resume tests compare runs bit for bit with it on). SIGKILLs in tests land between
  train steps (`debug.kill_at_step`), never inside a compilation, so no entry is left half
  written; a damaged entry would only cost a warning and a compile. The directory is the
  run's own (pytest's per-run base, which xdist's workers share), so a run never reads a past
  run's entries, and the previous settings are restored afterwards.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # the run's base, above each worker's own
  path = base / "xla_cache"
  path.mkdir(exist_ok=True)
  settings = {"jax_compilation_cache_dir": str(path),
              "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": -1}
  previous = {k: getattr(jax.config, k) for k in settings}
  env = {k.upper(): str(v) for k, v in settings.items()}
  previous_env = {k: os.environ.get(k) for k in env}
  for k, v in settings.items():
    jax.config.update(k, v)
  os.environ.update(env)
  # The cache is set up once per process (maybe already, without a directory): again.
  compilation_cache.reset_cache()
  yield path
  for k, v in previous.items():
    jax.config.update(k, v)
  for k, v in previous_env.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  compilation_cache.reset_cache()
