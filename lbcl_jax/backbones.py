"""What the driver needs from a model family: loading, batches, loss, prediction.

Two families, one interface:
  * "t5" (encoder-decoder): O-LoRA's prompt in, the label string out; token cross-entropy;
    evaluated by greedy generation + exact match (or rank classification).
  * "bert" (encoder, e.g. all-MiniLM-L6-v2): label-name scoring, cos(pool(f(text)),
    pool(f(label))) / tau, softmax over the task's options; evaluated by the arg-max option.
Adapters never appear here: the driver applies them around `loss` and `predict` (intercepted
low-rank products or merged kernels), so every method works on every family unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Callable, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from lbcl_jax import config_lib
from lbcl_jax import evaluation
from lbcl_jax.errors import InputError
from lbcl_jax import sharding as sharding_lib
from lbcl_jax import tasks as tasks_lib
from lbcl_jax.data import load_split
from lbcl_jax.data import pipeline
from lbcl_jax.models import hf


@dataclasses.dataclass
class Backbone:
  """A loaded model family with its tokenizer and the functions the driver calls."""

  family: str
  model: nn.Module
  tokenizer: Any
  params: Any            # host copy of loaded base params (the driver shards, then drops it);
                         # None for random init, which `init_params` creates already sharded
  init_params: Callable[[jax.Array], Any] | None
  param_specs: Any       # logical PartitionSpec per param
  module: Any            # lbcl_jax.models.t5 or .bert
  config: ml_collections.ConfigDict

  def resolve_targets(self, targets: str) -> str:
    if targets == "qv":
      return self.module.ADAPTER_TARGETS
    if targets == "all_linear":
      return self.module.ALL_LINEAR_TARGETS
    return targets

  def kernel_specs(self, paths: Sequence[str]) -> dict[str, P]:
    flat = traverse_util.flatten_dict(self.param_specs, sep="/")
    return {p: flat.get(p + "/kernel", P(None, None)) for p in paths}

  # -- data ---------------------------------------------------------------------------------

  def encode(self, examples, task: tasks_lib.Task):
    cfg = self.config.data
    if self.family == "t5":
      return pipeline.encode_seq2seq(
          examples, self.tokenizer, max_source_length=cfg.max_source_length,
          max_target_length=cfg.max_target_length,
          decoder_start_id=self.model.config.decoder_start_token_id)
    return pipeline.encode_scoring(examples, self.tokenizer, task=task,
                                   max_length=cfg.max_source_length,
                                   option_max_length=cfg.max_target_length)

  # -- loss and prediction (pure; jit-able, vmap-able) ---------------------------------------

  def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None) -> jax.Array:
    deterministic = rng is None or not self.config.optim.dropout
    if self.family == "t5":
      logits = self.model.apply(
          {"params": params}, batch["input_ids"], batch["attention_mask"],
          batch["decoder_input_ids"], batch["label_mask"], deterministic=deterministic,
          rngs=None if deterministic else {"dropout": rng})
      mask = batch["label_mask"] * batch["weight"][:, None].astype(batch["label_mask"].dtype)
      return self.module.seq2seq_loss(logits, batch["labels"], mask)
    scores = self.module.label_scores(
        self.model, params, batch["input_ids"], batch["attention_mask"], batch["option_ids"],
        batch["option_mask"], self.config.model.tau, deterministic=deterministic,
        rng=None if deterministic else rng)
    return self.module.scoring_loss(scores, batch["label_index"], batch["weight"])

  def seq_logprob(self, params: Any, input_ids, attention_mask, labels, label_mask) -> jax.Array:
    """T5: summed log-probability of each label sequence, [B]."""
    decoder_input_ids = self.module.shift_right(
        labels, self.model.config.decoder_start_token_id, self.model.config.pad_token_id)
    logits = self.model.apply({"params": params}, input_ids, attention_mask, decoder_input_ids,
                              label_mask)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.where(label_mask.astype(bool), labels, 0)
    token = jnp.take_along_axis(logp, safe[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(token * label_mask.astype(jnp.float32), axis=-1)

  def predict(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """T5 "generate": generated token ids [B, max_new_tokens]; T5 "rank" and BERT: the
    predicted option index [B]."""
    if self.family == "t5" and self.config.eval.mode == "rank":
      return evaluation.rank_classify(
          functools.partial(self.seq_logprob, params), batch["input_ids"],
          batch["attention_mask"], batch["option_ids"], batch["option_mask"])
    if self.family == "t5":
      return self.module.greedy_generate(self.model, params, batch["input_ids"],
                                         batch["attention_mask"], self.config.eval.max_new_tokens)
    scores = self.module.label_scores(self.model, params, batch["input_ids"],
                                      batch["attention_mask"], batch["option_ids"],
                                      batch["option_mask"], self.config.model.tau)
    return self.module.predict_labels(scores)


# ----------------------------------------------------------------------------------------------
# Building.


def _dtype(name: str):
  return jnp.dtype(name)


def _init_variables(family: str, model: nn.Module, rng):
  ids = jnp.ones((1, 4), jnp.int32)
  if family == "t5":
    return model.init(rng, ids, ids, ids)
  return model.init(rng, ids, ids)


def _model_dir(config: ml_collections.ConfigDict) -> str:
  path = config.model.path
  if not path and config.model.family == "bert":
    from lbcl_jax import minilm  # pylint: disable=g-import-not-at-top
    return str(minilm.minilm_dir())
  if not path:
    raise InputError(f"config.model.path is empty: name a checkpoint directory or hub id for "
                     f"family {config.model.family!r}")
  return os.path.expanduser(path)


def build(config: ml_collections.ConfigDict) -> Backbone:
  """Loads (or randomly initialises) the model and tokenizer the config names."""
  path = _model_dir(config)
  dtype, param_dtype = _dtype(config.model.dtype), _dtype(config.model.param_dtype)
  if config.model.random_init:
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
    params = None
    init_params = lambda rng: nn.meta.unbox(_init_variables(model_type, model, rng)["params"])
  else:
    model, params = hf.from_pretrained(path, dtype=dtype, param_dtype=param_dtype)
    model_type, _ = hf.family_of_model(model)
    init_params = None
  if model_type != config.model.family:
    raise InputError(f"config.model.family={config.model.family!r} but {path} holds a "
                     f"{model_type!r} model")
  module = _family_module(model_type)
  boxed = jax.eval_shape(functools.partial(_init_variables, model_type, model), jax.random.key(0))
  spec_flat = traverse_util.flatten_dict(nn.get_partition_spec(boxed)["params"])
  param_flat = traverse_util.flatten_dict(params if params is not None else boxed["params"])
  # Weights the forward pass does not create (e.g. BERT's pooler) stay replicated.
  specs = traverse_util.unflatten_dict({k: spec_flat.get(k, P()) for k in param_flat})
  tokenizer = hf.load_tokenizer(config.model.tokenizer or path)
  return Backbone(family=model_type, model=model, tokenizer=tokenizer, params=params,
                  init_params=init_params, param_specs=specs, module=module, config=config)


def _family_module(model_type: str):
  if model_type == "t5":
    from lbcl_jax.models import t5  # pylint: disable=g-import-not-at-top
    return t5
  if model_type == "bert":
    from lbcl_jax.models import bert  # pylint: disable=g-import-not-at-top
    return bert
  raise ValueError(f"no driver support for model family {model_type!r}")


def resolve_tasks(config: ml_collections.ConfigDict) -> list[str]:
  """Task names of the run, in order (validated against the registry)."""
  order = tasks_lib.resolve_order(config_lib.parse_order(config.order))
  names = [t.name for t in order]
  if config.num_tasks:
    if config.num_tasks > len(names):
      raise InputError(f"config.num_tasks={config.num_tasks} but order {config.order!r} has "
                       f"{len(names)} tasks")
    names = names[:config.num_tasks]
  if len(set(names)) != len(names):
    raise InputError(f"config.order={config.order!r} names a task twice")
  return names


@dataclasses.dataclass
class TaskData:
  train_examples: list
  train: Any
  test: Any


def _source_opts(config: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
  d = config.data
  if d.source == "synthetic":
    opts = {"seed": config.seed}
    if d.train_per_class:
      opts["train_per_class"] = d.train_per_class
  elif d.source == "local":
    opts = {"root": os.path.expanduser(d.data_dir), "seed": config.seed}
    if split == "train" and d.train_per_class:
      opts["per_class"] = d.train_per_class
  else:
    opts = {"seed": config.seed}
    if d.train_per_class:
      opts["train_per_class"] = d.train_per_class
  if split == "test" and d.max_test_examples:
    opts["max_examples"] = d.max_test_examples
  return opts


def load_task_data(config: ml_collections.ConfigDict, names: Sequence[str],
                   backbone: Backbone) -> dict[str, TaskData]:
  """Loads and tokenises every task's train and test split up front (bad data fails early)."""
  out = {}
  for name in names:
    task = tasks_lib.get_task(name)
    train = load_split(task, "train", config.data.source, **_source_opts(config, "train"))
    test = load_split(task, "test", config.data.source, **_source_opts(config, "test"))
    out[name] = TaskData(train_examples=train, train=backbone.encode(train, task),
                         test=backbone.encode(test, task))
  return out


# ----------------------------------------------------------------------------------------------
# Driver helpers.


class MixedStream:
  """Joint training over several tasks (MTL): every step is one task's batch.

  Within an epoch each task contributes its own number of batches, in an order shuffled from
  the seed, so the mixture is proportional to task sizes and `batch(step)` stays a pure function
  of (seed, step). One task per batch keeps label-name options shared within a batch.
  """

  def __init__(self, streams: Sequence[pipeline.TrainStream], seed: int):
    self.streams = list(streams)
    self.seed = seed
    owner = np.concatenate([np.full(s.num_steps_per_epoch, i) for i, s in enumerate(self.streams)])
    self.num_steps_per_epoch = len(owner)
    self._owner = owner

  def _schedule(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, epoch, 0x3A7])
    owner = self._owner[rng.permutation(len(self._owner))]
    # The k-th appearance of task i in the epoch is task i's k-th batch of its own epoch.
    local = np.zeros_like(owner)
    for i in range(len(self.streams)):
      local[owner == i] = np.arange(int((owner == i).sum()))
    return owner, local

  def batch(self, step: int):
    epoch, k = divmod(int(step), self.num_steps_per_epoch)
    owner, local = self._schedule(epoch)
    stream = self.streams[int(owner[k])]
    return stream.batch(epoch * stream.num_steps_per_epoch + int(local[k]))


def train_stream(run, names: Sequence[str], seed: int):
  """The training batches of a stage: one task's stream, or a mixture of several (MTL)."""
  gbs = run.config.optim.global_batch_size // run.config.optim.grad_accum_steps
  pad = run.config.data.train_padding == "task"
  streams = [pipeline.TrainStream(run.data[n].train, gbs, seed + 7919 * i, pad_to_longest=pad)
             for i, n in enumerate(names)]
  return streams[0] if len(streams) == 1 else MixedStream(streams, seed)


def seed_batch(run, name: str, n: int, seed: int) -> dict[str, jax.Array]:
  """The new task's seed samples as one batch with a leading sample axis."""
  samples = pipeline.seed_samples(run.data[name].train_examples, n, seed)
  data = run.backbone.encode(samples, tasks_lib.get_task(name))
  batch = data.collate(np.arange(len(samples)), len(samples))
  if "option_ids" in batch:
    # Options are shared by the task; give every sample its own copy so vmap sees one per row.
    batch = dict(batch)
    batch["option_ids"] = np.broadcast_to(batch["option_ids"], (len(samples),) + batch["option_ids"].shape)
    batch["option_mask"] = np.broadcast_to(batch["option_mask"], (len(samples),) + batch["option_mask"].shape)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def evaluate(run, params: Any, name: str) -> float:
  """Accuracy on task `name`'s test split with `params` (all adapters already merged)."""
  bb = run.backbone
  task = tasks_lib.get_task(name)
  data = run.data[name].test
  if getattr(run, "_predict", None) is None:
    run._predict = jax.jit(bb.predict)  # pylint: disable=protected-access
  predict = run._predict  # pylint: disable=protected-access
  bs = run.config.eval.batch_size
  correct = total = 0.0
  rank = bb.family == "t5" and run.config.eval.mode == "rank"
  if rank:
    option_ids, option_mask = evaluation.option_targets(bb.tokenizer, task,
                                                        run.config.data.max_target_length)
  for batch in pipeline.eval_batches(data, bs, process_index=0, process_count=1):
    if rank:
      batch = dict(batch, option_ids=option_ids, option_mask=option_mask)
    local = _local_rows(batch)
    pred = predict(params, sharding_lib.global_batch(local, run.mesh))
    pred = np.asarray(multihost_utils.process_allgather(pred, tiled=True))
    weight = np.asarray(batch["weight"])
    if bb.family == "t5" and not rank:
      texts = evaluation.decode(bb.tokenizer, pred)
      index = evaluation.match_options(texts, task.labels)
    else:
      index = pred
    hit = (np.asarray(index) == np.asarray(batch["label_index"])).astype(np.float64)
    correct += float((hit * weight).sum())
    total += float(weight.sum())
  return correct / max(total, 1.0)


def _local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's rows of a global batch (every process holds the whole eval batch)."""
  n, i = jax.process_count(), jax.process_index()
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if k in sharding_lib.SHARED_KEYS and v.ndim == 2:
      out[k] = v  # shared by all rows, replicated
      continue
    rows = v.shape[0] // n
    out[k] = v[i * rows:(i + 1) * rows]
  return out
