r"""Takes the trained model out of a run's workdir: the model after stage N, in one call.

  python -m lbcl_jax.export --workdir=W --out=DIR [--stage=N] [--format=merged|peft]

`--stage` counts finished stages from 1 (one per task; MTL has a single stage of every task)
and defaults to the last finished one. Two formats:

* `merged`: the base plus every adapter of stages 1..N folded into the dense kernels, written
  as a Hugging Face checkpoint directory (`config.json`, `model.safetensors`, the tokenizer's
  files) that transformers' own class for the family loads (`T5ForConditionalGeneration`,
  `BertModel`, `LlamaForCausalLM`). For SeqFT, which trains the base itself, it is the trained
  base; only the last stage's base is checkpointed, so only the last stage can be exported.
* `peft`: the frozen base as a Hugging Face checkpoint in `DIR/base/`, and one LoRA adapter
  per stage in PEFT's on-disk format in `DIR/stage_1/` .. `DIR/stage_N/`
  (`adapter_config.json`, `adapter_model.safetensors`). Loading all of them into one
  `PeftModel` and activating them together gives the merged model's outputs.

PEFT folding convention. Our adapter of a layer with Flax kernel `(d_in, d_out)` adds
`scaling * (U diag(sigma) V)^T` to the kernel (U `[d_out, r]`, V `[r, d_in]`). PEFT adds
`(lora_alpha / r) * lora_B @ lora_A` to torch's weight `[d_out, d_in]`. We write

  lora_B = scaling * U diag(sigma)    [d_out, r]
  lora_A = V                          [r, d_in]
  lora_alpha = r                      (so PEFT's own scaling is 1)

so both sigma and the run's `config.adapters.scaling` live in lora_B.

Bad input (no finished stage, a stage out of range, an existing non-empty `--out`, a format the
method cannot give) is reported as one `error: ...` line with exit status 2. Everything is
written into a temporary directory beside `--out` and renamed into place at the end, so a
failure leaves no partial directory. Single-process only: run it on one host (the arrays are
gathered there).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Optional, Sequence

import numpy as np

from lbcl_jax import files
from lbcl_jax.errors import InputError, exit_with

FORMATS = ("merged", "peft")
# Written beside the model files: which run, stage and method the export came from.
EXPORT_INFO = "lbcl_export.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass
class RunModel:
  """A finished run's model, as the driver holds it after a stage.

  Attributes:
    config: the run's config (a ConfigDict rebuilt from the workdir's config.json).
    backbone: the family's backbone (model, tokenizer).
    trains_base: whether the run trained the base (SeqFT): then `params` is the trained base
      and there are no adapters.
    params: host numpy params the adapters apply to (the pre-trained base, or SeqFT's trained
      base after the last finished stage).
    adapters: host stacked adapters of stages 1..`stage` (`{path: {U, sigma, V}}`, each
      leaf `[stage, ...]`), or None for SeqFT.
    scaling: the adapters' static scaling.
    stage: the exported stage (1-based).
    finished: the number of finished stages in the workdir.
    stage_names: every stage's name (its tasks, comma-separated).
  """

  config: Any
  backbone: Any
  trains_base: bool
  params: Any
  adapters: Optional[dict]
  scaling: float
  stage: int
  finished: int
  stage_names: list

  def merged_params(self) -> Any:
    """The base with every adapter of stages 1..`stage` folded in (host numpy arrays)."""
    if not self.adapters:
      return self.params
    from lbcl_jax import adapters as adapters_lib  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    return jax.device_get(adapters_lib.merge(self.params, self.adapters, self.scaling))


def _as_tuples(x: Any) -> Any:
  """JSON gives lists where the config had tuples (e.g. the logical axis rules)."""
  if isinstance(x, dict):
    return {k: _as_tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_as_tuples(v) for v in x)
  return x


def read_config(workdir: str | os.PathLike):
  """The run config recorded in `workdir/config.json`, as a ConfigDict."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from lbcl_jax import checkpointing  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(workdir) / checkpointing.CONFIG_FILE
  if not path.is_file():
    raise InputError(f"--workdir={workdir}: no {checkpointing.CONFIG_FILE} there; "
                     "is it the --workdir of a run?")
  try:
    d = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: not valid JSON ({e})") from e
  # A field added to the code since the run began is absent from its record; the run ran as
  # that field's default has it (a new field's default keeps the old behaviour), so it reads
  # as the default, as `checkpointing.check_workdir_config` counts it when the run resumes.
  # (check_workdir_config's rule, with the defaults as the run compared against.)
  from lbcl_jax import config_lib  # pylint: disable=g-import-not-at-top
  defaults = checkpointing.config_to_dict(config_lib.base_config())
  return ml_collections.ConfigDict(_as_tuples(
      checkpointing.with_new_defaults(d, defaults, defaults)))


def _checkpoint_steps(directory: pathlib.Path) -> list[int]:
  """The finished checkpoints' steps, newest first (orbax's temporary dirs are not digits)."""
  if not directory.is_dir():
    return []
  return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()),
                reverse=True)


def load_run(workdir: str | os.PathLike, stage: Optional[int] = None,
             *, need_adapters: bool = False) -> RunModel:
  """The model of `workdir` after stage `stage` (1-based; None: the last finished one).

  Args:
    workdir: a run's --workdir.
    stage: the stage to export.
    need_adapters: refuse methods that have no adapters (SeqFT), e.g. for the PEFT format.

  Raises:
    InputError: no finished stage, a stage out of range, or a stage the run did not keep.
  """
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise InputError(f"--workdir={workdir}: no such directory")
  config = read_config(workdir)
  ckpt_dir = workdir / "checkpoints"
  steps = _checkpoint_steps(ckpt_dir)
  if not steps:
    raise InputError(f"--workdir={workdir}: no finished stage to export (no checkpoint in "
                     f"{ckpt_dir})")

  import jax  # pylint: disable=g-import-not-at-top
  from lbcl_jax import adapters as adapters_lib  # pylint: disable=g-import-not-at-top
  from lbcl_jax import backbones  # pylint: disable=g-import-not-at-top
  from lbcl_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from lbcl_jax import methods as methods_lib  # pylint: disable=g-import-not-at-top
  from lbcl_jax import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from lbcl_jax import sharding  # pylint: disable=g-import-not-at-top
  from lbcl_jax import stage as stage_lib  # pylint: disable=g-import-not-at-top

  method = methods_lib.get_method(config.method, settings_lib.method_settings(config))
  ckpt = checkpointing.RunCheckpointer(ckpt_dir)
  try:
    progress = ckpt.restore_progress(steps[0])
    finished = len(progress["accuracy_matrix"])
    stage_names = list(progress.get("stages", []))
    if finished == 0:
      raise InputError(f"--workdir={workdir}: no finished stage to export yet (the first "
                       f"stage, {stage_names[0] if stage_names else '?'}, is still training)")
    if stage is None:
      stage = finished
    if not 1 <= stage <= finished:
      raise InputError(f"--stage={stage}: out of range; {workdir} has {finished} finished "
                       f"stage{'s' if finished > 1 else ''} (stages 1..{finished})")
    # A run that trained the base (SeqFT) wrote it at its stage boundaries ("params"), and no
    # adapters; the newest boundary is always kept.
    boundary = _boundary_step(ckpt, steps, finished)
    trained_base = boundary is not None and "params" in ckpt.items(boundary)
    if trained_base and need_adapters:
      raise InputError(f"method {config.method!r} trains the base itself: it has no adapters "
                       "to write in PEFT's format; use --format=merged")
    if trained_base and stage != finished:
      raise InputError(f"--stage={stage}: method {config.method!r} trains the base, and only "
                       f"the base after the last finished stage ({finished}) is kept")

    # The frozen base exactly as the driver made it (loaded, or re-initialised from the
    # seed), on one device: exporting gathers everything on this host anyway.
    loop = settings_lib.LoopConfig.from_config(config, method)
    backbone = backbones.build(backbones.BackboneConfig.from_config(config))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    key = jax.random.key(config.seed)
    rules = tuple(config.mesh.logical_axis_rules)
    with sharding.on_mesh(mesh, rules):
      base = stage_lib.place_base(backbone, method, loop, key, mesh, rules)
    one_device = sharding.replicated(mesh)

    def abstract(tree):
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
                          tree)

    if trained_base:
      # A mid-stage checkpoint holds the next stage's half-trained base instead.
      params = ckpt.restore(boundary, {"params": abstract(base.params)})["params"]
      return RunModel(config=config, backbone=backbone, trains_base=True,
                      params=jax.device_get(params), adapters=None, scaling=1.0, stage=stage,
                      finished=finished, stage_names=stage_names)

    if base.adapter_config is None:
      raise InputError(f"--workdir={workdir}: the checkpoint of the base after stage "
                       f"{finished} is gone (only mid-stage checkpoints remain)")
    # Every checkpoint after stage k holds the k finished adapters as one stack ("old"), or,
    # for a method carrying one adapter through the stages (SeqLoRA), that adapter alone.
    num_old = method.trainable.num_old(int(progress["stage"]))
    if num_old < int(progress["stage"]) and stage != finished:
      raise InputError(f"--stage={stage}: method {config.method!r} carries one adapter "
                       f"through every stage, and only its state after the last finished "
                       f"stage ({finished}) is kept")
    stack = stage_lib.abstract_adapter(base, key, num_tasks=num_old)
    old = ckpt.restore(steps[0], {"old": stack})["old"]
    keep = stage if num_old == int(progress["stage"]) else num_old
    old = jax.tree.map(lambda x: np.asarray(x)[:keep], jax.device_get(old))
    return RunModel(config=config, backbone=backbone, trains_base=False,
                    params=jax.device_get(base.params),
                    adapters=adapters_lib.flatten_layers(old),
                    scaling=float(base.adapter_config.scaling), stage=stage, finished=finished,
                    stage_names=stage_names)
  finally:
    ckpt.close()


def _boundary_step(ckpt, steps: Sequence[int], finished: int) -> Optional[int]:
  """The newest checkpoint written at the boundary after stage `finished`."""
  for step in steps:
    p = ckpt.restore_progress(step)
    if p["phase"] == "stage_start" and int(p["stage"]) == finished:
      return step
  return None


# ---------------------------------------------------------------------------------------------
# Writing.


def _save_hf(run: RunModel, params: Any, directory: pathlib.Path) -> None:
  """`params` as a Hugging Face checkpoint with the run's tokenizer, into `directory`."""
  from lbcl_jax.models import hf  # pylint: disable=g-import-not-at-top
  hf.save_pretrained(run.backbone.model, params, directory)
  run.backbone.tokenizer.save_pretrained(str(directory))


def hf_module_name(path: str) -> str:
  """Our module path as transformers names the module: `encoder/block_0/layer_1/...` ->
  `encoder.block.0.layer.1...`. Only inner parts are list indices: a leaf such as T5 v1.1's
  `wi_0` is a module name in transformers too."""
  parts = path.split("/")
  inner = [re.sub(r"^(.+)_(\d+)$", r"\1.\2", p) for p in parts[:-1]]
  return ".".join(inner + parts[-1:])


def peft_adapter(run: RunModel, task: int) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json's dict, tensors) of stage `task` (0-based) in PEFT's LoRA form."""
  from lbcl_jax import adapters as adapters_lib  # pylint: disable=g-import-not-at-top
  tensors, rank = {}, None
  for path, leaf in sorted(run.adapters.items()):
    u, s, v = (np.asarray(leaf[k][task], np.float32) for k in ("U", "sigma", "V"))
    rank = s.shape[0]
    name = f"base_model.model.{hf_module_name(path)}"
    tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(v)
    tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(run.scaling * u * s[None, :])
  paths = sorted(run.adapters)
  leaves = sorted({p.rsplit("/", 1)[-1] for p in paths})
  # Leaf names are PEFT's usual `target_modules`; when they would also catch layers the run
  # did not adapt (a custom targets regex), name the modules in full instead.
  by_leaf = adapters_lib.find_targets(
      run.params, r"(^|.*/)(" + "|".join(re.escape(l) for l in leaves) + r")$")
  targets = leaves if sorted(by_leaf) == paths else [hf_module_name(p) for p in paths]
  config = {
      "peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": rank,
      "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
      "use_rslora": False, "use_dora": False, "init_lora_weights": True,
      "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": None,
  }
  return config, tensors


def _write_peft(run: RunModel, directory: pathlib.Path) -> list[str]:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  _save_hf(run, run.params, directory / "base")
  names = []
  for k in range(run.stage):
    name = f"stage_{k + 1}"
    config, tensors = peft_adapter(run, k)
    (directory / name).mkdir()
    (directory / name / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n",
                                                   encoding="utf-8")
    safetensors.numpy.save_file(tensors, str(directory / name / ADAPTER_WEIGHTS),
                                metadata={"format": "pt"})
    names.append(name)
  return names


def export_run(workdir: str | os.PathLike, out: str | os.PathLike, *,
               stage: Optional[int] = None, fmt: str = "merged",
               overwrite: bool = False) -> pathlib.Path:
  """Writes the model of `workdir` after stage `stage` into `out`; returns `out`'s path.

  Args:
    workdir: a run's --workdir (finished or not: the finished stages can be exported).
    out: the directory to create; it must not exist or be empty unless `overwrite`.
    stage: 1-based stage; None: the last finished one.
    fmt: "merged" (one Hugging Face checkpoint) or "peft" (`base/` + `stage_k/` adapters).
    overwrite: replace an existing `out` (the driver's `config.export.final` on a rerun).

  Raises:
    InputError: bad input; nothing is left at `out` (or beside it) then.
  """
  if fmt not in FORMATS:
    raise InputError(f"--format={fmt}: expected one of {', '.join(FORMATS)}")
  target = pathlib.Path(out).expanduser().absolute()
  if target.exists() and not overwrite:
    if not target.is_dir():
      raise InputError(f"--out={out}: exists and is not a directory")
    if any(target.iterdir()):
      raise InputError(f"--out={out}: exists and is not empty; name a new directory")
  run = load_run(workdir, stage, need_adapters=fmt == "peft")

  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
  try:
    info = {"workdir": str(pathlib.Path(workdir).absolute()), "format": fmt,
            "stage": run.stage, "finished_stages": run.finished,
            "stages": run.stage_names[:run.stage], "method": run.config.method}
    if fmt == "merged":
      _save_hf(run, run.merged_params(), tmp)
    else:
      info["adapters"] = _write_peft(run, tmp)
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    # mkdtemp (and safetensors) make private files; an export is an ordinary directory.
    for path in [tmp, *tmp.rglob("*")]:
      path.chmod((0o777 if path.is_dir() else 0o666) & ~files.process_umask())
    files.replace_directory(tmp, target)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return target


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv: Optional[Sequence[str]] = None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top

  class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own report is usage + a line; ours is one line
      exit_with(message)

  parser = _Parser(prog="python -m lbcl_jax.export", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the run's --workdir")
  parser.add_argument("--out", required=True, help="the directory to write (new or empty)")
  parser.add_argument("--stage", type=int, default=None,
                      help="1-based stage to export (default: the last finished one)")
  parser.add_argument("--format", dest="fmt", choices=FORMATS, default="merged")
  args = parser.parse_args(argv)
  try:
    path = export_run(args.workdir, args.out, stage=args.stage, fmt=args.fmt)
  except InputError as e:
    exit_with(str(e))
  print(path)


if __name__ == "__main__":
  main()
