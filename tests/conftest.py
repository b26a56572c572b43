"""Shared pytest fixtures: where ../shared lives, and skipping cleanly when it does not."""

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
