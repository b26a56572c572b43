"""Flax BERT encoder (all-MiniLM-L6-v2 and friends) and the label-name scorer.

The model mirrors Hugging Face's `BertModel` (absolute positions, token types, post-LayerNorm,
HF's exact erf GELU) and returns the last hidden states. Module paths mirror HF's state-dict
names so adapter regexes read the same in both:

  embeddings/{word_embeddings,position_embeddings,token_type_embeddings,LayerNorm}
  encoder/layer_{i}/attention/self/{query,key,value}
  encoder/layer_{i}/attention/output/{dense,LayerNorm}
  encoder/layer_{i}/intermediate/dense
  encoder/layer_{i}/output/{dense,LayerNorm}
  pooler/dense                      (only when asked for; see below)

Every linear is a plain `nn.Dense` with bias, kernel `(d_in, d_out)`.

Pooler: mean pooling never uses it, so `BertModel.__call__` builds it only with
`output_pooled=True`, and `model.init(...)` leaves it out by default. Checkpoints that carry
`pooler.dense.*` (every `BertModel` checkpoint, all-MiniLM-L6-v2 included) load it into
`params['pooler']` and `params_to_hf` writes it back, so a load/save round trip is exact; the
extra subtree is simply unused by the mean-pooled path. Checkpoints without a pooler (e.g.
`BertForMaskedLM`) load without one.

Classification with an encoder is done by label names (no new head): a text and each option's
label name are mean-pooled and L2-normalised, and the option scores are their cosine
similarities over a temperature `tau` (`label_scores`); training minimises cross-entropy over
these scores (`scoring_loss`) and prediction is their argmax (`predict_labels`).
"""

import dataclasses
import sys
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lbcl_jax.models import hf
from lbcl_jax.models import ops

Array = jax.Array
DType = Any

# A layer path's transformer block (`injection.TopBlocks`): the encoder's `layer_{i}`.
BLOCK_PATTERN = r"(?P<stack>encoder)/layer_(?P<index>\d+)/"
# q and v of every self-attention, the LoRA/O-LoRA default.
ADAPTER_TARGETS = r"(^|.*/)attention/self/(query|value)$"
# Every encoder linear (the unused pooler excluded): q, k, v, attention output, both FFN linears.
ALL_LINEAR_TARGETS = (
    r"(^|.*/)(attention/self/(query|key|value)|attention/output/dense"
    r"|intermediate/dense|output/dense)$"
)

SUPPORTED_ARCHITECTURES = (
    "BertModel",
    # Task-head models: their encoder (under `bert.`) loads, the head tensors are skipped.
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "BertForMultipleChoice",
    "BertForNextSentencePrediction",
)
# Top-level tensor prefixes of HF task heads (beside `bert.`); they are not part of the encoder.
_HEAD_PREFIXES = ("cls.", "classifier.", "qa_outputs.")
# Buffers older transformers versions saved with the weights; they are recomputed, not learnt.
_IGNORED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_HF_PREFIX = "bert."


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT hyper-parameters (HF `BertConfig` names); defaults are bert-base-uncased's."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  dtype: DType = jnp.float32  # computation dtype
  param_dtype: DType = jnp.float32
  # Operand dtype of the Dense layers' matmuls, a key of `ops.DOT_DTYPES` ("": the compute
  # dtype; "bfloat16": bf16 operands, f32 accumulation); not a Hugging Face field.
  dot_dtype: str = ""
  initializer_range: float = 0.02  # std of the normal init, as HF (random-weight models only)

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
          f"{self.num_attention_heads}"
      )
    if self.dot_dtype not in ops.DOT_DTYPES:
      raise ValueError(f"dot_dtype {self.dot_dtype!r} is not one of {ops.DOT_DTYPES}")
    if self.hidden_act not in ops.ACTIVATIONS:
      raise ValueError(
          f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ops.ACTIVATIONS)}"
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


# ----------------------------------------------------------------------------- model


def _partitioned_normal(config: BertConfig, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def _dense(
    config: BertConfig, features: int, names: tuple[str | None, str | None], name: str
) -> nn.Dense:
  """A plain biased Dense (adapters intercept it by path) with logical axis names."""
  return nn.Dense(
      features,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      dot_general=ops.dense_dot_general(config.dot_dtype),
      kernel_init=_partitioned_normal(config, names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[1:]),
      name=name,
  )


class LayerNorm(nn.Module):
  """`nn.LayerNorm`'s parameters (`scale`, `bias`) over `ops.layer_norm`: two-pass variance in
  f32 as torch, and a backward pass that keeps only the input (see `ops`)."""

  epsilon: float
  dtype: DType
  param_dtype: DType

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (x.shape[-1],)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("embed",)),
                       features, self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("embed",)),
                      features, self.param_dtype)
    return ops.layer_norm(x, scale, bias, self.epsilon, self.dtype)


def _layer_norm(config: BertConfig, name: str) -> LayerNorm:
  return LayerNorm(config.layer_norm_eps, config.dtype, config.param_dtype, name=name)


def _constrain(x: Array, last: str = "activation_embed") -> Array:
  return nn.with_logical_constraint(x, ("activation_batch", "activation_length", last))


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool) -> Array:
    cfg = self.config

    def embed(num, names, name):
      return nn.Embed(
          num,
          cfg.hidden_size,
          dtype=cfg.dtype,
          param_dtype=cfg.param_dtype,
          embedding_init=_partitioned_normal(cfg, names),
          name=name,
      )

    x = embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
    x = x + embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids)
    x = x + embed(cfg.max_position_embeddings, (None, "embed"), "position_embeddings")(
        position_ids
    )
    x = _layer_norm(cfg, "LayerNorm")(x)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return _constrain(x)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention; returns the heads' outputs joined, before the output dense."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    cfg = self.config
    batch, length = x.shape[:2]

    def heads(name):
      y = _dense(cfg, cfg.hidden_size, ("embed", "joined_kv"), name)(x)
      y = y.reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)
      return nn.with_logical_constraint(
          y, ("activation_batch", "activation_length", "activation_heads", "activation_kv")
      )

    q, k, v = heads("query"), heads("key"), heads("value")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(cfg.head_dim)
    # Masked keys get the lowest finite score (HF adds finfo.min): a row with no valid key
    # then attends uniformly instead of producing NaNs.
    probs = ops.softmax(scores, mask[:, None, None, :]).astype(cfg.dtype)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(batch, length, cfg.hidden_size)


class BertSelfOutput(nn.Module):
  """Attention output projection, dropout, residual and post-LayerNorm."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, residual: Array, deterministic: bool) -> Array:
    cfg = self.config
    x = _dense(cfg, cfg.hidden_size, ("joined_kv", "embed"), "dense")(x)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return _constrain(_layer_norm(cfg, "LayerNorm")(x + residual))


class BertAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    # HF names the attention core `self`, so the path reads `attention/self/query`.
    attended = BertSelfAttention(self.config, name="self")(x, mask, deterministic)
    return BertSelfOutput(self.config, name="output")(attended, x, deterministic)


class BertIntermediate(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    x = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "dense")(x)
    return _constrain(ops.ACTIVATIONS[cfg.hidden_act](x), "activation_mlp")


class BertOutput(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, residual: Array, deterministic: bool) -> Array:
    cfg = self.config
    x = _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "dense")(x)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return _constrain(_layer_norm(cfg, "LayerNorm")(x + residual))


class BertLayer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    attended = BertAttention(self.config, name="attention")(x, mask, deterministic)
    hidden = BertIntermediate(self.config, name="intermediate")(attended)
    return BertOutput(self.config, name="output")(hidden, attended, deterministic)


class BertEncoder(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    # An explicit loop (no nn.scan) keeps one `layer_{i}` path per layer, as HF's `layer.{i}`.
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, name=f"layer_{i}")(x, mask, deterministic)
    return x


class BertPooler(nn.Module):
  """tanh(dense(first token)); kept for checkpoint fidelity, unused by mean pooling."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    return jnp.tanh(_dense(cfg, cfg.hidden_size, ("embed", None), "dense")(x[:, 0]))


class BertModel(nn.Module):
  """BERT encoder returning the last hidden states `[B, L, hidden_size]`.

  Call with `input_ids [B, L]`, optional `attention_mask [B, L]` (1 = real token; default all
  ones), `token_type_ids` (default zeros) and `position_ids` (default `0..L-1`). Dropout is on
  when `deterministic=False` and then needs a `'dropout'` rng. With `output_pooled=True` it
  returns `(hidden, pooled)`, pooled being HF's `pooler_output`, and needs `params['pooler']`.
  """

  config: BertConfig

  @nn.compact
  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array | None = None,
      token_type_ids: Array | None = None,
      position_ids: Array | None = None,
      *,
      deterministic: bool = True,
      output_pooled: bool = False,
  ):
    input_ids = jnp.asarray(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    mask = jnp.asarray(attention_mask).astype(jnp.bool_)
    x = BertEmbeddings(self.config, name="embeddings")(
        input_ids, token_type_ids, position_ids, deterministic
    )
    hidden = BertEncoder(self.config, name="encoder")(x, mask, deterministic)
    if output_pooled:
      return hidden, BertPooler(self.config, name="pooler")(hidden)
    return hidden


def make_model(config: BertConfig) -> BertModel:
  return BertModel(config)


# ----------------------------------------------------------------------------- pooling, scoring


def mean_pool(hidden: Array, mask: Array) -> Array:
  """Masked mean over the length axis, as sentence-transformers' mean pooling.

  Args:
    hidden: `[..., L, H]` token states.
    mask: `[..., L]` 1 for real tokens, 0 for padding.

  Returns:
    `[..., H]` float32 means (a row with no real token gives zeros, not NaN).
  """
  mask = jnp.asarray(mask).astype(jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=-2)
  # sentence-transformers clamps the count at 1e-9 the same way.
  return total / jnp.maximum(jnp.sum(mask, axis=-2), 1e-9)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


ApplyFn = Callable[..., Array]


def encode(
    model: nn.Module | ApplyFn,
    params: Any,
    input_ids: Array,
    attention_mask: Array,
    *,
    deterministic: bool = True,
    rngs: Mapping[str, Array] | None = None,
) -> Array:
  """Mean-pooled, L2-normalised embeddings `[..., H]` of token ids `[..., L]`.

  Args:
    model: a module (its `.apply` is used) or any function with `Module.apply`'s signature,
      e.g. `adapters.apply(model.apply, adapters)`; it must return `[N, L, H]` hidden states.
    params: the model params (without the `{'params': ...}` wrapper).
    input_ids: token ids; leading axes are flattened for the forward pass and restored after.
    attention_mask: 1 for real tokens, same shape as `input_ids`.
    deterministic: False turns dropout on (then `rngs` needs `'dropout'`).
    rngs: rngs for `apply`.
  """
  apply = model.apply if isinstance(model, nn.Module) else model
  lead, length = input_ids.shape[:-1], input_ids.shape[-1]
  ids = jnp.reshape(input_ids, (-1, length))
  mask = jnp.reshape(attention_mask, (-1, length))
  kwargs = {"deterministic": deterministic}
  if rngs is not None:
    kwargs["rngs"] = dict(rngs)
  hidden = apply({"params": params}, ids, mask, **kwargs)
  pooled = l2_normalize(mean_pool(hidden, mask))
  return pooled.reshape(*lead, pooled.shape[-1])


def label_scores(
    model: nn.Module | ApplyFn,
    params: Any,
    text_ids: Array,
    text_mask: Array,
    option_ids: Array,
    option_mask: Array,
    tau: float = 0.05,
    *,
    deterministic: bool = True,
    rng: Array | None = None,
) -> Array:
  """Label-name scores `[B, n_opt]`: cos(pool(f(text)), pool(f(option))) / tau.

  Pure in its array arguments, so it can be jitted, vmapped (e.g. over a batch of size 1 for
  per-sample losses) and differentiated with respect to `params`.

  Args:
    model: module or `apply`-like function (see `encode`).
    params: model params.
    text_ids: `[B, Lt]` token ids of the texts; `text_mask` the same shape.
    option_ids: `[n_opt, Lo]` label-name ids shared by the batch, or `[B, n_opt, Lo]` per
      example; `option_mask` the same shape.
    tau: temperature; scores are cosines (in [-1, 1]) divided by it.
    deterministic: False turns dropout on; then `rng` is required.
    rng: dropout key; texts and options get independent folds of it.

  Returns:
    float32 `[B, n_opt]` scores.
  """
  rngs_text = rngs_option = None
  if not deterministic:
    if rng is None:
      raise ValueError("label_scores(deterministic=False) needs a dropout rng")
    rngs_text = {"dropout": jax.random.fold_in(rng, 0)}
    rngs_option = {"dropout": jax.random.fold_in(rng, 1)}
  text = encode(model, params, text_ids, text_mask, deterministic=deterministic, rngs=rngs_text)
  options = encode(
      model, params, option_ids, option_mask, deterministic=deterministic, rngs=rngs_option
  )
  if options.ndim == 2:  # shared options [n_opt, H]
    cos = jnp.einsum("bh,oh->bo", text, options)
  else:  # per-example options [B, n_opt, H]
    cos = jnp.einsum("bh,boh->bo", text, options)
  return cos / tau


def scoring_loss(scores: Array, label_index: Array, weight: Array | None = None) -> Array:
  """Cross-entropy of the label scores, averaged over examples.

  Args:
    scores: `[B, n_opt]` logits (e.g. from `label_scores`).
    label_index: `[B]` int index of the gold option.
    weight: optional `[B]` per-example weights (e.g. 0 for padding rows); the result is the
      weighted mean `sum(w * ce) / sum(w)`, and 0 when all weights are 0.

  Returns:
    Scalar float32 loss.
  """
  log_probs = jax.nn.log_softmax(scores.astype(jnp.float32), axis=-1)
  label_index = jnp.asarray(label_index).astype(jnp.int32)
  ce = -jnp.take_along_axis(log_probs, label_index[:, None], axis=-1)[:, 0]
  if weight is None:
    return jnp.mean(ce)
  weight = jnp.asarray(weight).astype(jnp.float32)
  return jnp.sum(weight * ce) / jnp.maximum(jnp.sum(weight), 1e-9)


def predict_labels(scores: Array) -> Array:
  """Predicted option index `int32 [B]`: the highest label score."""
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- HF conversion


class BertCheckpointError(hf.CheckpointError):
  """A checkpoint tensor is missing, unexpected or misshaped; the message names file and key."""


def config_from_hf(
    cfg: Mapping[str, Any], *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32
) -> BertConfig:
  """`BertConfig` from a HF `config.json` dict (missing keys take HF's defaults)."""
  model_type = cfg.get("model_type", "bert")
  if model_type != "bert":
    raise ValueError(f"config.json model_type is {model_type!r}, expected 'bert'")
  position_type = cfg.get("position_embedding_type", "absolute")
  if position_type != "absolute":
    raise ValueError(
        f"position_embedding_type {position_type!r} is not supported (absolute positions only)"
    )
  if cfg.get("is_decoder", False) or cfg.get("add_cross_attention", False):
    raise ValueError("decoder/cross-attention BERT configs are not supported (encoder only)")
  defaults = BertConfig()
  fields = {
      f.name: cfg.get(f.name, getattr(defaults, f.name))
      for f in dataclasses.fields(BertConfig)
      if f.name not in ("dtype", "param_dtype", "dot_dtype")
  }
  if fields["pad_token_id"] is None:
    fields["pad_token_id"] = 0
  return BertConfig(**fields, dtype=dtype, param_dtype=param_dtype)


def config_to_hf(config: BertConfig) -> dict[str, Any]:
  """A `config.json` dict that transformers' `AutoModel`/`BertModel` loads."""
  out = {
      "architectures": ["BertModel"],
      "model_type": "bert",
      "position_embedding_type": "absolute",
      "is_decoder": False,
      "add_cross_attention": False,
      "dtype": jnp.dtype(config.param_dtype).name,
  }
  for f in dataclasses.fields(BertConfig):
    if f.name not in ("dtype", "param_dtype", "dot_dtype"):  # not HF fields
      out[f.name] = getattr(config, f.name)
  return out


# One tensor of the HF state dict and where it lives in our params.
_Tensor = hf.LayoutTensor


def _layout(config: BertConfig, pooler: bool) -> list[_Tensor]:
  """Every tensor of a BertModel state dict (unprefixed) and where it lives in our params."""
  h, ff = config.hidden_size, config.intermediate_size
  out: list[_Tensor] = []

  def linear(hf, path, d_in, d_out):
    out.append(_Tensor(f"{hf}.weight", (*path, "kernel"), (d_out, d_in), transpose=True))
    out.append(_Tensor(f"{hf}.bias", (*path, "bias"), (d_out,)))

  def layer_norm(hf, path):
    out.append(_Tensor(f"{hf}.weight", (*path, "scale"), (h,)))
    out.append(_Tensor(f"{hf}.bias", (*path, "bias"), (h,)))

  for name, num in (
      ("word_embeddings", config.vocab_size),
      ("position_embeddings", config.max_position_embeddings),
      ("token_type_embeddings", config.type_vocab_size),
  ):
    out.append(_Tensor(f"embeddings.{name}.weight", ("embeddings", name, "embedding"), (num, h)))
  layer_norm("embeddings.LayerNorm", ("embeddings", "LayerNorm"))
  for i in range(config.num_hidden_layers):
    hf, ours = f"encoder.layer.{i}", ("encoder", f"layer_{i}")
    for name in ("query", "key", "value"):
      linear(f"{hf}.attention.self.{name}", (*ours, "attention", "self", name), h, h)
    linear(f"{hf}.attention.output.dense", (*ours, "attention", "output", "dense"), h, h)
    layer_norm(f"{hf}.attention.output.LayerNorm", (*ours, "attention", "output", "LayerNorm"))
    linear(f"{hf}.intermediate.dense", (*ours, "intermediate", "dense"), h, ff)
    linear(f"{hf}.output.dense", (*ours, "output", "dense"), ff, h)
    layer_norm(f"{hf}.output.LayerNorm", (*ours, "output", "LayerNorm"))
  if pooler:
    linear("pooler.dense", ("pooler", "dense"), h, h)
  return out


def params_from_hf(
    tensors: Mapping[str, np.ndarray], config: BertConfig, *, source: str
) -> dict[str, Any]:
  """Our params from a HF BERT state dict (e.g. `safetensors.numpy.load_file(...)`).

  Accepts `BertModel` names (`embeddings.…`, `encoder.layer.{i}.…`) and task-model names
  (`bert.embeddings.…`); in the latter, head tensors (`cls.*`, `classifier.*`,
  `qa_outputs.*`) are skipped, as are the `embeddings.position_ids`/`token_type_ids` buffers
  old checkpoints carry. The pooler is loaded when present (see the module docstring).

  Args:
    tensors: name -> array.
    config: the model's config; shapes are checked against it.
    source: the file the tensors came from, for error messages.

  Returns:
    Nested dict of `config.param_dtype` arrays (unboxed; no `{'params': ...}` wrapper).

  Raises:
    BertCheckpointError: a missing, unexpected or misshaped tensor (names `source` and key).
  """
  prefixed = any(key.startswith(_HF_PREFIX) for key in tensors)
  found: dict[str, str] = {}  # unprefixed name -> key in `tensors`
  for key in tensors:
    if prefixed:
      if not key.startswith(_HF_PREFIX):
        if key.startswith(_HEAD_PREFIXES):
          continue
        raise BertCheckpointError(
            f"{source}: unexpected tensor {key!r} (neither under {_HF_PREFIX!r} nor a known "
            f"task head {_HEAD_PREFIXES})"
        )
      name = key[len(_HF_PREFIX) :]
    else:
      if key.startswith(_HEAD_PREFIXES):
        continue
      name = key
    if name in _IGNORED_BUFFERS:
      continue
    found[name] = key

  has_pooler = any(name.startswith("pooler.") for name in found)
  layout = _layout(config, pooler=has_pooler)
  expected = {t.hf_name for t in layout}
  for name, key in found.items():
    if name not in expected:
      raise BertCheckpointError(f"{source}: unexpected tensor {key!r} for a BERT encoder")
  prefix = _HF_PREFIX if prefixed else ""
  params: dict[str, Any] = {}
  for t in layout:
    key = found.get(t.hf_name)
    if key is None:
      raise BertCheckpointError(
          f"{source}: missing tensor {prefix + t.hf_name!r} (expected shape {t.shape})"
      )
    array = np.asarray(tensors[key])
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
      raise BertCheckpointError(
          f"{source}: tensor {key!r} has dtype {array.dtype}, expected floats"
      )
    if tuple(array.shape) != t.shape:
      raise BertCheckpointError(
          f"{source}: tensor {key!r} has shape {tuple(array.shape)}, expected {t.shape} for "
          f"this config"
      )
    if t.transpose:
      array = array.T
    node = params
    for part in t.path[:-1]:
      node = node.setdefault(part, {})
    node[t.path[-1]] = jnp.asarray(array, dtype=config.param_dtype)
  return params


def params_to_hf(params: Mapping[str, Any], config: BertConfig) -> dict[str, np.ndarray]:
  """HF `BertModel` state dict (unprefixed names, `[out, in]` weights) from our params.

  Boxed (`nn.Partitioned`) params are unboxed; a `{'params': ...}` wrapper is tolerated. The
  pooler is written when `params` has one. Arrays keep their dtype and are C-contiguous (as
  safetensors needs).
  """
  params = nn.meta.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  return hf.tensors_by_layout(params, _layout(config, pooler="pooler" in params))


# ----------------------------------------------------------------------------- registry

# `hf.from_pretrained` imports this module on demand for model_type 'bert' (hf imports no
# family module at import time, so importing hf here makes no cycle).
FAMILY = hf.Family.of_module("bert", sys.modules[__name__], BertModel)
hf.register_family("bert", FAMILY)
