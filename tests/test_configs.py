"""Every shipped config file loads, sets only fields `base_config` declares, and validates."""

from __future__ import annotations

import importlib.util
import re

import pytest

from conftest import REPO_ROOT
from lbcl_jax import config_lib

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.py"))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _flat(config, prefix=""):
  """{'model.path': ..., ...}: every leaf field by its dotted name."""
  out = {}
  for key, value in config.items():
    name = prefix + key
    out.update(_flat(value, name + ".") if hasattr(value, "items") else {name: value})
  return out


def test_every_config_is_found():
  assert {p.stem for p in CONFIGS} >= {"default", "t5_small", "t5_base", "t5_large",
                                       "flan_t5_small", "minilm_cl_benchmark"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_sets_only_declared_fields_and_validates(path, tmp_path):
  config = _load(path)
  # A misspelt field in a config file would add a key here instead of setting the real one.
  assert _flat(config).keys() == _flat(config_lib.base_config()).keys(), path.name
  # Directories are the user's; point them at ones that exist and check everything else.
  config.data.data_dir = str(tmp_path)
  if config_lib.looks_local(config.model.path):
    config.model.path = str(tmp_path)
  config_lib.validate(config)


def test_t5_configs_differ_only_in_model_and_sharding():
  small, base, large = (_flat(_load(REPO_ROOT / "configs" / f"{n}.py"))
                        for n in ("t5_small", "t5_base", "t5_large"))
  assert (small["model.path"], base["model.path"], large["model.path"]) == (
      "t5-small", "t5-base", "t5-large")
  assert small["method"] == "lbcl" and small["order"] == "1"
  assert large["model.dtype"] == "bfloat16" and large["mesh.fsdp"] == -1
  assert small["model.dtype"] == "float32"
  sharding = {"model.path", "model.dtype", "mesh.data", "mesh.fsdp"}
  for other in (base, large):
    assert {k for k in small if small[k] != other[k]} <= sharding
  assert {k for k in base if base[k] != large[k]} == {"model.path"}


def test_model_path_may_name_a_gguf_file(tmp_path):
  """A .gguf checkpoint is a file, every other local checkpoint a directory."""
  config = _load(REPO_ROOT / "configs" / "smollm2_cl.py")
  config.data.data_dir = str(tmp_path)
  gguf_file = tmp_path / "model.gguf"
  gguf_file.write_bytes(b"GGUF")
  config.model.path = str(gguf_file)
  config_lib.validate(config)
  config.model.path = str(tmp_path / "missing.gguf")
  with pytest.raises(ValueError, match="no such model file"):
    config_lib.validate(config)
  config.model.path = str(tmp_path / "missing_dir")
  with pytest.raises(ValueError, match="no such model directory"):
    config_lib.validate(config)


@pytest.mark.parametrize("field, value, message", [
    ("eval.label_space", "all", "config.eval.label_space='all'"),
    ("eval.extra_label_spaces", "task,every", "'every' is not one of"),
    ("eval.split", "validation", "needs config.data.validation_examples > 0"),
    ("eval.split", "dev", "config.eval.split='dev'"),
    ("adapters.dropout", 1.0, "config.adapters.dropout=1.0: must be < 1"),
    ("adapters.orth_reg_weight", -0.5, "config.adapters.orth_reg_weight=-0.5"),
    ("injection.layers", "layer_(4", "config.injection.layers='layer_(4'"),
])
def test_validate_names_the_bad_field(field, value, message):
  config = config_lib.default_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    config_lib.validate(config)
