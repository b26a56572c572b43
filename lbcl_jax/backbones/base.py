"""The backbone protocol: what the driver needs from a model family, and nothing more.

A backbone owns a Flax model, its tokenizer and its frozen pre-trained weights, and turns
examples into batches, batches into a loss, and a batch into predicted options. Adapters never
appear here: the driver applies them around `loss` and `predict` (intercepted low-rank
products or merged kernels), so every method works with every family unchanged.

Families subclass `Backbone` (the generative ones `generative.GenerativeBackbone`), are found by
`config.json`'s model type (one row in `lbcl_jax.backbones._MODULES` names the module;
`backbones.backbone_class` picks its subclass whose `model_type` matches) and are built from a
`BackboneConfig`, the run config's model fields typed once (families never see the ConfigDict).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, ClassVar, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from lbcl_jax import adapters
from lbcl_jax import tasks as tasks_lib
from lbcl_jax.data import pipeline
from lbcl_jax.errors import InputError
from lbcl_jax.models import hf


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """The model-related fields of a run config.

  Attributes:
    family: the model type the run expects ("t5", "bert", ...).
    path: checkpoint directory, hub id or file; empty takes the family's default.
    tokenizer: tokenizer directory or hub id; empty means `path`.
    random_init: initialise random weights from `path`/config.json instead of loading weights.
    dtype, param_dtype: computation and parameter storage dtypes (names).
    max_source_length, max_target_length: truncation lengths of prompts and answers.
    truncation: how a long prompt is cut ("sentence", "left", "right": see
      `pipeline.prompt_content_ids`).
    dropout: the model's dropout while training.
    eval_mode: "generate" or "rank" (generative families).
    max_new_tokens: tokens generated per example in "generate" mode.
    tau: temperature of label-name scoring (encoder families).
    dot_dtype: operand dtype of the Dense layers' matmuls ("": the compute dtype;
      "bfloat16": bf16 operands, f32 accumulation: `lbcl_jax.models.ops.dense_dot_general`).
    remat: what each transformer block keeps for the backward pass ("none", "weights",
      "full": `lbcl_jax.models.ops.REMAT_POLICIES`; T5 and Llama).
  """

  family: str
  path: str = ""
  tokenizer: str = ""
  random_init: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  max_source_length: int = 512
  max_target_length: int = 50
  truncation: str = "sentence"
  dropout: bool = False
  eval_mode: str = "generate"
  max_new_tokens: int = 8
  tau: float = 0.05
  remat: str = "none"
  dot_dtype: str = ""

  @classmethod
  def from_config(cls, config) -> "BackboneConfig":
    """The fields of an `lbcl_jax.config_lib` run config."""
    return cls(
        family=config.model.family, path=config.model.path, tokenizer=config.model.tokenizer,
        random_init=config.model.random_init, dtype=config.model.dtype,
        param_dtype=config.model.param_dtype, max_source_length=config.data.max_source_length,
        max_target_length=config.data.max_target_length, truncation=config.data.truncation,
        dropout=bool(config.optim.dropout),
        eval_mode=config.eval.mode, max_new_tokens=config.eval.max_new_tokens,
        tau=config.model.tau, remat=config.model.get("remat", "none"),
        dot_dtype=config.model.get("dot_dtype", ""))


class Backbone(abc.ABC):
  """A loaded model family: model, tokenizer, frozen weights and the functions the driver calls.

  Attributes:
    config: the `BackboneConfig` it was built from.
    model: the Flax module.
    tokenizer: a transformers tokenizer.
    params: host copy of loaded weights (the driver places them on the mesh, then drops this
      reference); None for random init, which `init_params` creates (already sharded under jit).
    param_specs: the logical PartitionSpec of every parameter.
  """

  # config.json's model_type this family registers for.
  model_type: ClassVar[str] = ""
  # Families with the same non-empty `interface` read the same batches and answer the same way
  # (e.g. "causal_lm": every decoder-only LM), so a checkpoint of one runs under a config
  # naming another: `backbones.build` takes the checkpoint's own family.
  interface: ClassVar[str] = ""
  # The model module: it defines ADAPTER_TARGETS, ALL_LINEAR_TARGETS and BLOCK_PATTERN (regexes).
  model_module: ClassVar[Any] = None
  # Batch arrays shared by every row (a task's options): replicated over the mesh, not split.
  replicated_keys: ClassVar[tuple[str, ...]] = ()

  def __init__(self, config: BackboneConfig, model: nn.Module, tokenizer: Any, params: Any):
    self.config = config
    self.model = model
    self.tokenizer = tokenizer
    self.params = params
    boxed = jax.eval_shape(functools.partial(self.init_variables, model), jax.random.key(0))
    spec_flat = traverse_util.flatten_dict(nn.get_partition_spec(boxed)["params"])
    param_flat = traverse_util.flatten_dict(params if params is not None else boxed["params"])
    # Weights the forward pass does not create (e.g. BERT's pooler) stay replicated.
    self.param_specs = traverse_util.unflatten_dict(
        {k: spec_flat.get(k, P()) for k in param_flat})

  # -- building --------------------------------------------------------------------------------

  @classmethod
  def default_path(cls) -> str:
    """The checkpoint used when `config.path` is empty (none by default)."""
    raise InputError(f"config.model.path is empty: name a checkpoint directory or hub id for "
                     f"family {cls.model_type!r}")

  @staticmethod
  @abc.abstractmethod
  def init_variables(model: nn.Module, rng: jax.Array) -> dict:
    """`model.init` on dummy inputs: the (boxed) variables, for shapes and logical specs."""

  def init_params(self, rng: jax.Array) -> Any:
    """Random weights (unboxed), for configs with `random_init`."""
    return nn.meta.unbox(self.init_variables(self.model, rng)["params"])

  # -- what adapters attach to -------------------------------------------------------------------

  def adapter_targets(self, targets: str) -> str:
    """A regex over module paths: the presets "qv" and "all_linear", or `targets` itself."""
    return adapters.resolve_targets(targets, self.model_module)

  @property
  def block_pattern(self) -> str:
    """A regex over module paths grouping a layer's transformer stack (`stack`) and block index
    (`index`): what injection by depth counts blocks with (`injection.top_block_layers`)."""
    return self.model_module.BLOCK_PATTERN

  def kernel_specs(self, paths: Sequence[str]) -> dict[str, P]:
    """The logical spec of each adapted layer's kernel, by '/'-joined module path."""
    flat = traverse_util.flatten_dict(self.param_specs, sep="/")
    return {p: flat.get(p + "/kernel", P(None, None)) for p in paths}

  # -- data ----------------------------------------------------------------------------------------

  @abc.abstractmethod
  def encode(self, examples: Sequence[Any], task: tasks_lib.Task) -> pipeline.BatchSource:
    """Tokenised examples of one task, ready to batch."""

  def eval_extras(self, task: tasks_lib.Task) -> dict[str, np.ndarray]:
    """Arrays added to every evaluation batch of `task` (none by default). `task.labels` is
    the label space of the evaluation (see `evaluation.evaluate`), options that scoring
    families (label names, rank classification) must score."""
    del task
    return {}

  def seed_batch(self, samples: Sequence[Any], task: tasks_lib.Task) -> dict[str, jax.Array]:
    """Seed samples as one batch with a leading sample axis (every row its own copy of the
    replicated arrays, so `vmap` over samples sees one per row)."""
    batch = dict(self.encode(samples, task).collate(np.arange(len(samples)), len(samples)))
    for k in self.replicated_keys:
      if k in batch:
        batch[k] = np.broadcast_to(batch[k], (len(samples),) + batch[k].shape)
    return {k: jnp.asarray(v) for k, v in batch.items()}

  # -- loss and prediction (pure; jit-able, vmap-able) -----------------------------------------------

  @abc.abstractmethod
  def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None) -> jax.Array:
    """Mean training loss of `batch`; dropout on when `rng` is given and the config asks."""

  @abc.abstractmethod
  def predict(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """The model's raw prediction for every row (generated ids, or an option index)."""

  def to_options(self, predictions: np.ndarray, task: tasks_lib.Task) -> np.ndarray:
    """The option index each row's prediction names (-1 for none); default: it is one."""
    del task
    return np.asarray(predictions)

  def uniform_guess(self, task: tasks_lib.Task) -> tuple[int, str] | None:
    """(n, what n counts): the training loss of a model whose output has stopped depending on
    its input and spreads evenly over n outcomes is ln n, a uniform guess (the driver's
    collapse check). Default: the logits' vocabulary, for token cross-entropy; families that
    score a task's options say so."""
    del task
    vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
    return (int(vocab), "vocabulary tokens") if vocab else None

  def _deterministic(self, rng: jax.Array | None) -> bool:
    return rng is None or not self.config.dropout


# ---------------------------------------------------------------------------------------------
# Loading, shared by every family.


def model_dir(cls: type[Backbone], config: BackboneConfig) -> str:
  return os.path.expanduser(config.path) if config.path else cls.default_path()


def with_model_options(model: nn.Module, config: BackboneConfig) -> nn.Module:
  """`model` with the run's options that are not Hugging Face fields: what its transformer
  blocks keep for the backward pass (`remat`) and its matmuls' operand dtype (`dot_dtype`)."""
  changes = {}
  for field, value, default in (("remat", config.remat, "none"),
                                ("dot_dtype", config.dot_dtype, "")):
    if value == default:
      continue
    if not hasattr(model.config, field):
      raise InputError(f"config.model.{field}={value!r}: the {type(model).__name__} model has "
                       f"no {field} option; use {default!r}")
    changes[field] = value
  if not changes:
    return model
  return model.clone(config=dataclasses.replace(model.config, **changes))


def load_model(config: BackboneConfig, path: str) -> tuple[str, nn.Module, Any]:
  """(model type, model, host params or None) of `path`: weights loaded, or a random-init
  model built from its config.json."""
  dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
  if not config.random_init:
    model, params = hf.from_pretrained(path, dtype=dtype, param_dtype=param_dtype)
    return hf.family_of_model(model)[0], with_model_options(model, config), params
  cfg_path = pathlib.Path(path) / "config.json"
  try:
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
  except FileNotFoundError as e:
    raise InputError(f"config.model.path={path!r}: {cfg_path} is missing") from e
  except json.JSONDecodeError as e:
    raise InputError(f"{cfg_path}: not valid JSON ({e})") from e
  model_type = cfg.get("model_type")
  try:
    family = hf.get_family(model_type)
  except KeyError as e:
    raise InputError(f"{cfg_path}: model_type {model_type!r} is not supported "
                     f"(supported: {', '.join(hf.registered_model_types())})") from e
  model = family.make_model(family.config_from_hf(cfg, dtype=dtype, param_dtype=param_dtype))
  return model_type, with_model_options(model, config), None

