"""Hugging Face checkpoint I/O and the model-family registry.

A *family* (T5, BERT, ...) knows how to turn a `config.json` dict into its config, build its
Flax module and convert tensors between HF's names/layout and its Flax params. Families are
keyed by `config.json`'s `model_type`; T5 registers itself here for 't5', other families call
`register_family` from their own module (which `from_pretrained` imports on demand for the
model types listed in `_FAMILY_MODULES`).

Checkpoints are directories with `config.json` plus `model.safetensors`, a sharded
`model.safetensors.index.json`, or `pytorch_model.bin` (torch imported only then). Any
problem with a checkpoint raises `CheckpointError` (a `ValueError`), or
`CheckpointNotFoundError` (also a `FileNotFoundError`) for a missing directory or file; the
message names the file and, for a tensor, its key.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import pickle
import re
import shutil
import tempfile
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from lbcl_jax.errors import InputError
from lbcl_jax.models import t5 as t5_lib

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"


class CheckpointError(InputError):
  """A checkpoint directory, config or tensor is unusable; the message says which and why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """The checkpoint directory, its config.json or its weights file does not exist."""


@dataclasses.dataclass(frozen=True)
class Family:
  """How one model family maps to and from Hugging Face checkpoints.

  Attributes:
    name: a short name, e.g. 't5'.
    config_from_hf: `(cfg_dict, *, dtype, param_dtype) -> config`; raise ValueError on bad
      fields.
    config_to_hf: `config -> dict`, a config.json that transformers loads (with
      'architectures' and 'model_type').
    make_model: `config -> nn.Module`.
    params_from_hf: `(tensors, config, *, source) -> params` (unboxed nested dict below
      'params'); raise ValueError naming `source` and the key for a missing, unexpected or
      misshaped tensor.
    params_to_hf: `(params, config) -> {hf_key: np.ndarray}` in HF's layout.
    supported_architectures: the HF `architectures` entries this family can load.
    model_class: the Flax module class `make_model` returns (lets `save_pretrained` find the
      family of a model); optional.
  """

  name: str
  config_from_hf: Callable[..., Any]
  config_to_hf: Callable[[Any], dict]
  make_model: Callable[[Any], nn.Module]
  params_from_hf: Callable[..., Any]
  params_to_hf: Callable[[Any, Any], dict]
  supported_architectures: tuple[str, ...] = ()
  model_class: Optional[type] = None


_FAMILIES: dict[str, Family] = {}
# Modules that register a family when imported; imported lazily so hf.py does not depend on
# them (and they may import hf.py to register).
_FAMILY_MODULES = {"bert": "lbcl_jax.models.bert", "llama": "lbcl_jax.models.llama"}


def register_family(model_type: str, family: Family) -> None:
  """Registers (or replaces) the family for config.json's `model_type`."""
  _FAMILIES[model_type] = family


def get_family(model_type: str) -> Family:
  """The family registered for `model_type`, importing its module if known; KeyError if none."""
  if model_type not in _FAMILIES and model_type in _FAMILY_MODULES:
    try:
      importlib.import_module(_FAMILY_MODULES[model_type])
    except ImportError:
      pass  # Reported below as an unsupported model type.
  if model_type not in _FAMILIES:
    raise KeyError(model_type)
  return _FAMILIES[model_type]


def registered_model_types() -> tuple[str, ...]:
  return tuple(sorted(set(_FAMILIES) | set(_FAMILY_MODULES)))


def family_of_model(model: nn.Module) -> tuple[str, Family]:
  """(model_type, family) of a Flax model built by one of the registered families."""
  for model_type, family in _FAMILIES.items():
    if family.model_class is not None and isinstance(model, family.model_class):
      return model_type, family
  raise ValueError(f"no registered family builds {type(model).__name__} models")


# ------------------------------------------------------------------------------- helpers


def _to_numpy(array: Any) -> np.ndarray:
  """np.ndarray of a jax/numpy array (bf16 comes out as ml_dtypes.bfloat16)."""
  return np.ascontiguousarray(np.asarray(jax.device_get(array)))


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


# ---------------------------------------------------------------------------- T5 family

# Present in some HF checkpoints and ignored by HF when loading (a leftover table).
_T5_IGNORED_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
# HF aliases of `shared.weight` (tied input embeddings of both stacks).
_T5_EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_T5_ARCHITECTURES = ("T5ForConditionalGeneration", "T5WithLMHeadModel")
_T5_INT_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                  "relative_attention_num_buckets", "relative_attention_max_distance",
                  "pad_token_id")


def _t5_config_from_hf(cfg: Mapping[str, Any], *, dtype: Any = jnp.float32,
                       param_dtype: Any = jnp.float32) -> t5_lib.T5Config:
  """Our T5Config from a config.json dict (transformers 4 or 5 layout)."""
  defaults = t5_lib.T5Config()
  kwargs = {}
  for name in _T5_INT_FIELDS:
    value = cfg.get(name, getattr(defaults, name))
    if not isinstance(value, int) or isinstance(value, bool):
      raise ValueError(f"field {name!r} must be an integer, got {value!r}")
    kwargs[name] = value
  num_decoder_layers = cfg.get("num_decoder_layers")
  kwargs["num_decoder_layers"] = (kwargs["num_layers"] if num_decoder_layers is None
                                  else int(num_decoder_layers))
  eos = cfg.get("eos_token_id", defaults.eos_token_id)
  if isinstance(eos, (list, tuple)):
    if len(eos) != 1:
      raise ValueError(f"field 'eos_token_id': only one EOS id is supported, got {eos!r}")
    eos = eos[0]
  kwargs["eos_token_id"] = int(eos)
  start = cfg.get("decoder_start_token_id")
  kwargs["decoder_start_token_id"] = kwargs["pad_token_id"] if start is None else int(start)
  kwargs["dropout_rate"] = float(cfg.get("dropout_rate", defaults.dropout_rate))
  kwargs["layer_norm_epsilon"] = float(cfg.get("layer_norm_epsilon",
                                               defaults.layer_norm_epsilon))
  kwargs["feed_forward_proj"] = str(cfg.get("feed_forward_proj", defaults.feed_forward_proj))
  # transformers 5 always writes tie_word_embeddings=true for T5 and keeps the v1.0/v1.1
  # distinction in scale_decoder_outputs; transformers 4 configs only have the former.
  if "scale_decoder_outputs" in cfg:
    tied = cfg["scale_decoder_outputs"]
  else:
    tied = cfg.get("tie_word_embeddings", True)
  kwargs["tie_word_embeddings"] = bool(tied)
  return t5_lib.T5Config(dtype=dtype, param_dtype=param_dtype, **kwargs)


def _t5_config_to_hf(config: t5_lib.T5Config) -> dict:
  return {
      "architectures": ["T5ForConditionalGeneration"],
      "model_type": "t5",
      "vocab_size": config.vocab_size,
      "d_model": config.d_model,
      "d_kv": config.d_kv,
      "d_ff": config.d_ff,
      "num_layers": config.num_layers,
      "num_decoder_layers": config.num_decoder_layers,
      "num_heads": config.num_heads,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate,
      "layer_norm_epsilon": config.layer_norm_epsilon,
      "initializer_factor": 1.0,
      "feed_forward_proj": config.feed_forward_proj,
      # transformers 5 reads a false here as "no output rescaling" and unties lm_head when
      # the checkpoint holds a distinct one; transformers 4 reads it literally.
      "tie_word_embeddings": config.tie_word_embeddings,
      "is_encoder_decoder": True,
      "use_cache": True,
      "pad_token_id": config.pad_token_id,
      "eos_token_id": config.eos_token_id,
      "decoder_start_token_id": config.decoder_start_token_id,
      "dtype": jnp.dtype(config.param_dtype).name,
  }


def _t5_hf_key(path: tuple[str, ...]) -> tuple[str, bool]:
  """(HF tensor name, whether HF stores the transpose) of a Flax param path."""
  parts = []
  for part in path[:-1]:
    match = re.fullmatch(r"(block|layer)_(\d+)", part)
    parts.extend(match.groups() if match else (part,))
  leaf = path[-1]
  if leaf not in ("kernel", "scale", "embedding"):
    raise ValueError(f"unexpected T5 parameter {'/'.join(path)}")
  return ".".join(parts + ["weight"]), leaf == "kernel"


def _t5_make_model(config: t5_lib.T5Config) -> t5_lib.T5:
  return t5_lib.T5(config)


def _t5_params_from_hf(tensors: Mapping[str, np.ndarray], config: t5_lib.T5Config, *,
                       source: str) -> dict:
  """Flax params of `T5(config)` from HF tensors (np arrays keyed by HF names)."""
  abstract = flax.traverse_util.flatten_dict(t5_lib.abstract_params(t5_lib.T5(config)))
  tensors = dict(tensors)
  used = set()

  # The shared embedding may only be stored under one of its aliases (old .bin files).
  shared_key = "shared.weight"
  if shared_key not in tensors:
    shared_key = next((k for k in _T5_EMBED_ALIASES if k in tensors), shared_key)

  flat = {}
  for path, struct in abstract.items():
    key, transpose = _t5_hf_key(path)
    if key == "shared.weight":
      key = shared_key
    elif key == "lm_head.weight" and key not in tensors:
      # transformers 5 ties lm_head to shared for every T5 and then omits lm_head.weight
      # from the files it saves; it loads such a checkpoint with shared as the head.
      key = shared_key
    flat[path] = convert_tensor(tensors, key, struct.shape, config.param_dtype, source=source,
                                transpose=transpose)
    used.add(key)

  # Aliases of the shared embedding (and, for v1.0, of the tied head) must hold the same
  # values: our model has one table, so a different one cannot be represented.
  aliases = list(_T5_EMBED_ALIASES) + (["lm_head.weight"] if config.tie_word_embeddings else [])
  shared = np.asarray(tensors[shared_key])
  for key in aliases:
    if key in tensors and key not in used:
      other = np.asarray(tensors[key])
      if other.shape != shared.shape or not np.array_equal(other, shared):
        raise CheckpointError(
            f"{source}: tensor {key!r} differs from {shared_key!r}; this config ties them "
            "(tie_word_embeddings) so they must be equal")
      used.add(key)
  used.update(k for k in _T5_IGNORED_KEYS if k in tensors)
  unexpected = sorted(set(tensors) - used)
  if unexpected:
    raise CheckpointError(
        f"{source}: unexpected tensor {unexpected[0]!r} for this T5 config"
        + (f" (and {len(unexpected) - 1} more: {unexpected[1:6]})" if len(unexpected) > 1
           else ""))
  return jax.tree_util.tree_map(jnp.asarray, flax.traverse_util.unflatten_dict(flat))


def _t5_params_to_hf(params: Mapping[str, Any], config: t5_lib.T5Config) -> dict:
  """HF tensors (HF names, (out, in) layout) of Flax T5 params."""
  del config  # The tree itself says whether there is an lm_head.
  out = {}
  for path, value in flax.traverse_util.flatten_dict(nn.meta.unbox(params)).items():
    key, transpose = _t5_hf_key(path)
    array = _to_numpy(value)
    out[key] = np.ascontiguousarray(array.T) if transpose else array
  return out


T5_FAMILY = Family(
    name="t5",
    config_from_hf=_t5_config_from_hf,
    config_to_hf=_t5_config_to_hf,
    make_model=_t5_make_model,
    params_from_hf=_t5_params_from_hf,
    params_to_hf=_t5_params_to_hf,
    supported_architectures=_T5_ARCHITECTURES,
    model_class=t5_lib.T5,
)
register_family("t5", T5_FAMILY)


# --------------------------------------------------------------------------- reading


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


def _looks_like_hub_id(name: str) -> bool:
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
  if isinstance(path_or_hub_id, str) and _looks_like_hub_id(path_or_hub_id):
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
    from lbcl_jax.models import gguf  # pylint: disable=g-import-not-at-top
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
    if target.exists():
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
      os.replace(target, old / target.name)
      os.replace(tmp, target)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, target)
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
    from lbcl_jax.models import gguf  # pylint: disable=g-import-not-at-top
    return gguf.load_tokenizer(path_or_hub_id)
  import transformers  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path_or_hub_id).expanduser()
  if path.is_dir():
    has_config = any((path / n).is_file() for n in
                     ("tokenizer.json", "tokenizer_config.json", CONFIG_NAME))
    if not has_config and (path / "spiece.model").is_file():
      return transformers.T5Tokenizer.from_pretrained(str(path))
  elif path.exists() or not _looks_like_hub_id(str(path_or_hub_id)):
    raise CheckpointNotFoundError(f"{path}: tokenizer directory not found")
  return transformers.AutoTokenizer.from_pretrained(str(path_or_hub_id))
