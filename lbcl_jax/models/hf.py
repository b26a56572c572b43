"""Hugging Face checkpoint I/O, and the model-family registry's public names.

A *family* (T5, BERT, ...) knows how to turn a `config.json` dict into its config, build its
Flax module and convert tensors between HF's names/layout and its Flax params; the registry
(`Family`, `register_family`, `get_family`, `family_of_model`) and the checkpoint errors live in
`lbcl_jax.models.registry` and are re-exported here, the names families and callers use. Each
family registers at the bottom of its own module (`t5.py`, `bert.py`, `llama.py`), imported on
demand by `get_family`; neither the registry nor hf.py imports a family module, so a family
module may import hf.py without a cycle. Single `.gguf` files are read by
`lbcl_jax.models.gguf`, which imports the registry, not hf.py.

Checkpoints are directories with `config.json` plus `model.safetensors`, a sharded
`model.safetensors.index.json`, or `pytorch_model.bin` (torch imported only then). Any
problem with a checkpoint raises `CheckpointError` (a `ValueError`), or
`CheckpointNotFoundError` (also a `FileNotFoundError`) for a missing directory or file; the
message names the file and, for a tensor, its key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import pickle
import re
import shutil
import tempfile
from typing import Any, Mapping

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from lbcl_jax import files
from lbcl_jax.models import gguf
from lbcl_jax.models import registry

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"

# The registry's names, re-exported: families register, and callers catch checkpoint errors,
# through hf.
CheckpointError = registry.CheckpointError
CheckpointNotFoundError = registry.CheckpointNotFoundError
Family = registry.Family
register_family = registry.register_family
get_family = registry.get_family
registered_model_types = registry.registered_model_types
family_of_model = registry.family_of_model
# The registry's own dict (code that registers a family for a while, such as a test, removes it
# again through it).
_FAMILIES = registry._FAMILIES  # pylint: disable=protected-access


# ------------------------------------------------------------------------------- helpers


def convert_tensor(tensors: Mapping[str, np.ndarray], key: str, expected_shape: tuple,
                   dtype: Any, *, source: str, transpose: bool = False) -> np.ndarray:
  """`tensors[key]` checked against `expected_shape` (after transposing) and cast to `dtype`.

  A helper other families can use too. Raises CheckpointError naming `source` and `key`.
  """
  if key not in tensors:
    raise CheckpointError(f"{source}: missing tensor {key!r}")
  array = np.asarray(tensors[key])
  if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
    raise CheckpointError(f"{source}: tensor {key!r} has dtype {array.dtype}, expected floats")
  if transpose:
    array = array.T
  if tuple(array.shape) != tuple(expected_shape):
    hf_shape = tuple(reversed(expected_shape)) if transpose else tuple(expected_shape)
    raise CheckpointError(
        f"{source}: tensor {key!r} has shape {tuple(np.asarray(tensors[key]).shape)}, "
        f"expected {hf_shape} for this config")
  return np.ascontiguousarray(array.astype(np.dtype(dtype)))


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class LayoutTensor:
  """One tensor of a family's HF state dict: its name, our param path, its HF shape, and
  whether it is a transposed kernel (HF `[out, in]`, Flax `(in, out)`)."""

  hf_name: str
  path: tuple[str, ...]
  shape: tuple[int, ...]
  transpose: bool = False


def tensors_by_layout(params: Mapping[str, Any], layout: list[LayoutTensor]) -> dict[str, np.ndarray]:
  """HF tensors of `params` (boxed or not, a `{'params': ...}` wrapper tolerated) by a family's
  layout. Arrays keep their dtype and are C-contiguous (as safetensors needs). A missing or
  misshaped param raises; so does a param the layout does not name, rather than being
  silently dropped."""
  params = nn.meta.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  flat = dict(flax.traverse_util.flatten_dict(params))
  out: dict[str, np.ndarray] = {}
  for t in layout:
    if t.path not in flat:
      raise KeyError(f"params lack {'/'.join(t.path)} (needed for HF tensor {t.hf_name!r})")
    array = np.asarray(jax.device_get(flat.pop(t.path)))
    if t.transpose:
      array = array.T
    if tuple(array.shape) != t.shape:
      raise ValueError(f"param {'/'.join(t.path)} has HF shape {array.shape}, expected {t.shape}")
    out[t.hf_name] = np.ascontiguousarray(array)
  if flat:
    raise ValueError(f"params have leaves with no HF name: {sorted('/'.join(p) for p in flat)}")
  return out


def _read_config(directory: pathlib.Path) -> dict:
  path = directory / CONFIG_NAME
  if not path.is_file():
    raise CheckpointNotFoundError(f"{path}: no {CONFIG_NAME} in the checkpoint directory")
  try:
    cfg = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(cfg, dict):
    raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
  return cfg


def _family_for_config(cfg: dict, config_path: pathlib.Path) -> Family:
  model_type = cfg.get("model_type")
  if model_type is None:
    raise CheckpointError(f"{config_path}: key 'model_type' is missing")
  try:
    family = get_family(model_type)
  except KeyError:
    raise CheckpointError(
        f"{config_path}: unsupported model_type {model_type!r} (key 'model_type'); "
        f"supported: {list(registered_model_types())}") from None
  architectures = cfg.get("architectures") or []
  if family.supported_architectures and architectures:
    unsupported = [a for a in architectures if a not in family.supported_architectures]
    if unsupported:
      raise CheckpointError(
          f"{config_path}: unsupported architecture {unsupported[0]!r} (key 'architectures'); "
          f"the {family.name} family loads {list(family.supported_architectures)}")
  return family


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  import safetensors  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  if not path.is_file():
    raise CheckpointNotFoundError(f"{path}: weights file not found")
  try:
    return safetensors.numpy.load_file(str(path))
  except (safetensors.SafetensorError, OSError, ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e


def _load_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  if not path.is_file():
    raise CheckpointNotFoundError(f"{path}: weights file not found")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError(f"{path}: reading pytorch_model.bin needs torch installed") from e
  try:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
  except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
    raise CheckpointError(f"{path}: cannot read torch checkpoint ({e})") from e
  if not isinstance(state, Mapping):
    raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
  out = {}
  for key, tensor in state.items():
    if not isinstance(tensor, torch.Tensor):
      raise CheckpointError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
      # numpy has no bf16: reinterpret the bits as ml_dtypes.bfloat16.
      out[key] = tensor.view(torch.int16).numpy().view(jnp.bfloat16)
    else:
      out[key] = tensor.numpy()
  return out


def _load_sharded(index_path: pathlib.Path, loader) -> dict[str, np.ndarray]:
  try:
    index = json.loads(index_path.read_text(encoding="utf-8"))
    weight_map = index["weight_map"]
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{index_path}: not valid JSON ({e})") from e
  except (KeyError, TypeError) as e:
    raise CheckpointError(f"{index_path}: key 'weight_map' is missing") from e
  if not isinstance(weight_map, dict):
    raise CheckpointError(f"{index_path}: key 'weight_map' must map tensor names to files")
  tensors = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = index_path.parent / shard
    shard_tensors = loader(shard_path)
    for key, file in weight_map.items():
      if file == shard and key not in shard_tensors:
        raise CheckpointError(f"{shard_path}: missing tensor {key!r} listed in {index_path.name}")
    tensors.update(shard_tensors)
  return tensors


def _load_tensors(directory: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of the checkpoint in `directory` and the file they were read from."""
  candidates = (
      (SAFETENSORS_NAME, _load_safetensors),
      (SAFETENSORS_INDEX_NAME, lambda p: _load_sharded(p, _load_safetensors)),
      (TORCH_NAME, _load_torch),
      (TORCH_INDEX_NAME, lambda p: _load_sharded(p, _load_torch)),
  )
  for name, loader in candidates:
    path = directory / name
    if path.is_file():
      return loader(path), str(path)
  raise CheckpointNotFoundError(
      f"{directory}: no weights file (looked for {', '.join(n for n, _ in candidates)})")


def looks_like_hub_id(name: str) -> bool:
  """A Hugging Face hub id ("org/name" or "name"), as opposed to a path: the one rule the
  loaders and the config check share."""
  return (re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None
          and not name.startswith((".", "~")))


def _snapshot_download(repo_id: str) -> pathlib.Path:
  """Fetches config + weights of a hub repo: safetensors if it has them, else torch .bin."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors as hf_errors  # pylint: disable=g-import-not-at-top
  try:
    directory = pathlib.Path(huggingface_hub.snapshot_download(
        repo_id, allow_patterns=["*.json", "*.safetensors"]))
    if not any((directory / n).is_file() for n in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME)):
      directory = pathlib.Path(huggingface_hub.snapshot_download(
          repo_id, allow_patterns=["*.json", "pytorch_model*.bin"]))
  except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
    raise CheckpointNotFoundError(f"{repo_id}: not a local directory and not downloadable "
                                  f"from the Hugging Face hub ({e})") from e
  return directory


def _resolve(path_or_hub_id: str | os.PathLike) -> pathlib.Path:
  """A local checkpoint directory; strings that look like hub ids are downloaded."""
  path = pathlib.Path(path_or_hub_id).expanduser()
  if path.is_dir():
    return path
  if path.exists():
    raise CheckpointNotFoundError(f"{path}: not a directory (expected a checkpoint directory)")
  if isinstance(path_or_hub_id, str) and looks_like_hub_id(path_or_hub_id):
    return _snapshot_download(path_or_hub_id)
  raise CheckpointNotFoundError(f"{path}: checkpoint directory not found")


def _is_gguf(path: str | os.PathLike) -> bool:
  """Whether `path` names a single GGUF file (read by `lbcl_jax.models.gguf`)."""
  path = pathlib.Path(path).expanduser()
  return path.suffix.lower() == ".gguf" and not path.is_dir()


def from_pretrained(path_or_hub_id: str | os.PathLike, dtype: Any = jnp.float32,
                    param_dtype: Any = None) -> tuple[nn.Module, dict]:
  """Loads a HF checkpoint: `(model, params)` with `params` the nested dict below 'params'.

  Args:
    path_or_hub_id: a directory with config.json and weights, or a hub repo id (fetched
      with `huggingface_hub.snapshot_download`; safetensors preferred over .bin), or a
      `.gguf` file (read by `lbcl_jax.models.gguf`).
    dtype: compute dtype of the model.
    param_dtype: dtype of the returned params; None means float32 (f32 master weights even
      when the checkpoint or the compute is bf16).

  Raises:
    CheckpointNotFoundError: missing directory, config.json or weights file.
    CheckpointError: garbled config/weights, unsupported model type or architecture, or a
      missing/unexpected/misshaped tensor (the message names the file and the key).
  """
  param_dtype = jnp.float32 if param_dtype is None else param_dtype
  if _is_gguf(path_or_hub_id):
    return gguf.from_pretrained(path_or_hub_id, dtype=dtype, param_dtype=param_dtype)
  directory = _resolve(path_or_hub_id)
  cfg = _read_config(directory)
  config_path = directory / CONFIG_NAME
  family = _family_for_config(cfg, config_path)
  try:
    config = family.config_from_hf(cfg, dtype=dtype, param_dtype=param_dtype)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{config_path}: {e}") from e
  tensors, source = _load_tensors(directory)
  params = family.params_from_hf(tensors, config, source=source)
  return family.make_model(config), params


# --------------------------------------------------------------------------- writing


def save_pretrained(model: nn.Module, params: Mapping[str, Any],
                    path: str | os.PathLike) -> pathlib.Path:
  """Writes `config.json` + `model.safetensors` that transformers' `from_pretrained` loads.

  The files are written into a temporary directory next to `path` which then replaces
  `path` (an existing directory is swapped out and removed), so readers never see a
  half-written checkpoint.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  _, family = family_of_model(model)
  target = pathlib.Path(path).expanduser().resolve()
  target.parent.mkdir(parents=True, exist_ok=True)
  cfg = family.config_to_hf(model.config)
  tensors = {k: np.ascontiguousarray(v)
             for k, v in family.params_to_hf(nn.meta.unbox(params), model.config).items()}
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
  try:
    (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n",
                                   encoding="utf-8")
    # transformers refuses safetensors files without a 'format' entry.
    safetensors.numpy.save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is an ordinary directory.
    files.replace_directory(tmp, target)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return target


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(path_or_hub_id: str | os.PathLike):
  """A transformers tokenizer via `AutoTokenizer.from_pretrained`.

  A directory holding only a SentencePiece `spiece.model` (no tokenizer.json / config) is
  loaded with `T5Tokenizer.from_pretrained`, which AutoTokenizer cannot do without a config
  naming the tokenizer class.
  """
  if _is_gguf(path_or_hub_id):
    return gguf.load_tokenizer(path_or_hub_id)
  import transformers  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path_or_hub_id).expanduser()
  if path.is_dir():
    has_config = any((path / n).is_file() for n in
                     ("tokenizer.json", "tokenizer_config.json", CONFIG_NAME))
    if not has_config and (path / "spiece.model").is_file():
      return transformers.T5Tokenizer.from_pretrained(str(path))
  elif path.exists() or not looks_like_hub_id(str(path_or_hub_id)):
    raise CheckpointNotFoundError(f"{path}: tokenizer directory not found")
  return transformers.AutoTokenizer.from_pretrained(str(path_or_hub_id))
