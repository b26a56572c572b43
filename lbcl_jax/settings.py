"""A run's settings: the run config (a ConfigDict) turned once into typed values.

The driver (`lbcl_jax.train`), the exporter (`lbcl_jax.export`) and the benchmarks read the
config only through these, so every field is read, defaulted and checked in one place:

* `method_settings`: the method's fields (`methods.MethodSettings`; each method reads its own
  in `Method.configured`);
* `optimizer_settings`: AdamW's (`methods.OptimizerSettings`);
* `LoopConfig`: the stage loop's, with the adapters' description (`adapters.AdapterConfig`:
  targets, rank, scaling, dropout, init, apply mode) built from `config.adapters` and the
  method's defaults;
* `check_batch_sizes`: the batch sizes against the mesh.

The backbone's and the data's own settings are `backbones.BackboneConfig.from_config` and
`data.task_data.DataConfig.from_config`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import ml_collections
import optax

from lbcl_jax import adapters as adapters_lib
from lbcl_jax import config_lib
from lbcl_jax import injection
from lbcl_jax import methods as methods_lib
from lbcl_jax import sharding
from lbcl_jax.errors import InputError


def adapter_config(config: ml_collections.ConfigDict,
                   method: methods_lib.Method) -> adapters_lib.AdapterConfig:
  """`config.adapters` as the adapters' description; scaling and dropout default to `method`'s.

  The targets stay as written (a preset such as "qv" or a regex): the backbone turns a preset
  into its model's regex (`place_base`). The rank is checked against the adapted layers there
  too (`adapters.check_rank`), once the model is known.
  """
  a = config.adapters
  return adapters_lib.AdapterConfig(
      targets=a.targets, rank=a.rank,
      scaling=method.scaling(a.rank) if a.scaling is None else float(a.scaling),
      dropout=method.adapter_dropout if a.dropout is None else float(a.dropout),
      init=method.adapter_init,
      apply_mode=a.apply_mode or adapters_lib.AdapterConfig.apply_mode)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """The driver's own fields of the run config, typed once.

  Attributes:
    adapter: the adapters' description (`adapter_config`); the one place their rank, scaling
      and dropout are read from.
  """

  seed: int
  global_batch_size: int
  grad_accum_steps: int
  num_epochs: int
  max_steps_per_task: int
  eval_batch_size: int
  train_padding: str
  log_every_steps: int
  checkpoint_every_steps: int
  checkpoint_max_to_keep: int
  kill_at_step: int
  plots: bool
  sensitivity_layers: Optional[str]
  # Per-sample gradients this many at a time in the sensitivity pass; 0 = a micro-batch.
  injection_chunk_size: int
  adapter: adapters_lib.AdapterConfig
  eval_split: str
  label_space: str
  extra_label_spaces: tuple
  # "full" or "diagonal_final": which entries of the accuracy matrix are measured.
  eval_matrix: str = "full"

  @property
  def micro_batch_size(self) -> int:
    """Examples per forward/backward pass: the global batch over the accumulation steps."""
    return max(1, self.global_batch_size // self.grad_accum_steps)

  @property
  def sensitivity_chunk_size(self) -> int:
    """Seed samples per vmapped gradient call: by default a micro-batch, so that scoring never
    needs more activation memory than a train step."""
    return self.injection_chunk_size or self.micro_batch_size

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  method: methods_lib.Method) -> "LoopConfig":
    """The loop's fields; the adapters' scaling and dropout default to `method`'s."""
    return cls(
        seed=config.seed, global_batch_size=config.optim.global_batch_size,
        grad_accum_steps=config.optim.grad_accum_steps, num_epochs=config.optim.num_epochs,
        max_steps_per_task=config.optim.max_steps_per_task,
        eval_batch_size=config.eval.batch_size, train_padding=config.data.train_padding,
        log_every_steps=config.log_every_steps,
        checkpoint_every_steps=config.checkpoint.every_steps,
        checkpoint_max_to_keep=config.checkpoint.max_to_keep,
        kill_at_step=config.debug.kill_at_step, plots=config.plots,
        sensitivity_layers=config.injection.sensitivity_layers or None,
        injection_chunk_size=config.injection.chunk_size,
        adapter=adapter_config(config, method),
        eval_split=config.eval.split, label_space=config.eval.label_space,
        extra_label_spaces=config_lib.extra_label_spaces(config),
        eval_matrix=config.eval.get("matrix", "full"))


def method_settings(config: ml_collections.ConfigDict) -> methods_lib.MethodSettings:
  """The method-related fields of a run config."""
  return methods_lib.MethodSettings(
      inject_sigma=config.injection.with_sigma,
      inject_layers=injection.parse_layers(config.injection.layers),
      num_seed_samples=config.injection.num_seed_samples,
      score_aggregation=config.injection.aggregation,
      olora_lambda1=config.olora.lambda1, olora_lambda2=config.olora.lambda2,
      projection_rtol=config.projection.rtol, orth_reg_weight=config.adapters.orth_reg_weight,
      replay_over=config.replay.over, replay_per_task=config.replay.per_task,
      replay_share=config.replay.share, ewc_over=config.ewc.over, ewc_weight=config.ewc.weight,
      ewc_samples=config.ewc.samples, inflora_samples=config.inflora.samples,
      inflora_threshold=config.inflora.threshold)


def optimizer_settings(config: ml_collections.ConfigDict) -> methods_lib.OptimizerSettings:
  """AdamW's fields of a run config (a linear warm-up to the constant rate, when asked)."""
  o = config.optim
  lr = o.learning_rate
  if o.warmup_steps:
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps),
         optax.constant_schedule(o.learning_rate)], [o.warmup_steps])
  return methods_lib.OptimizerSettings(
      learning_rate=lr, weight_decay=o.weight_decay, max_grad_norm=o.grad_clip or None,
      transform_after_adam=config.projection.after_adam)


def check_batch_sizes(loop: LoopConfig, mesh: jax.sharding.Mesh) -> None:
  """Raises `InputError` for a global or evaluation batch the mesh cannot split evenly."""
  dp = sharding.data_parallel_size(mesh)
  if loop.global_batch_size % dp:
    raise InputError(
        f"config.optim.global_batch_size={loop.global_batch_size} is not divisible by the "
        f"data-parallel size {dp} (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
  if loop.global_batch_size % (dp * loop.grad_accum_steps):
    raise InputError("config.optim.global_batch_size must be divisible by data-parallel size x "
                     f"grad_accum_steps ({dp} x {loop.grad_accum_steps})")
  if loop.eval_batch_size % dp:
    raise InputError(f"config.eval.batch_size={loop.eval_batch_size} is not divisible by the "
                     f"data-parallel size {dp}")
