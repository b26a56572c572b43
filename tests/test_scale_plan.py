"""The pod-scale plan (benchmarks/scale_plan.py) is tied to what the driver runs.

On 8 fake CPU devices (a subprocess: the device count is fixed when JAX starts), the driver's
own train step, as `train_and_evaluate` compiles it for a tiny Llama on a 2 x 2 x 2 mesh:

* splits hidden states and logits over the batch axes (per-device batch = global / (data x
  fsdp)): the models' activation constraints take effect because the driver traces under the
  mesh and the config's logical axis rules (`sharding.on_mesh`);
* takes, per device, the argument bytes that the plan's compile of the same step on abstract
  arrays predicts (within 5 %), with batches shaped as the plan shapes them.

On 64 fake devices, the 8B Llama's parameters, adapters and optimizer state are split 64 ways
by fsdp (nothing left whole on every device). And block remat leaves the loss and the
adapter's gradients unchanged (greedy generation, with its per-step barrier, is checked
against Hugging Face in tests/test_llama.py and tests/test_t5.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import driver_utils as du
from conftest import REPO_ROOT

MESH = {"data": 2, "fsdp": 2, "tensor": 2}
GLOBAL_BATCH = 16


def _in_subprocess(devices: int, code: str, *args: str) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"),
                                       str(REPO_ROOT / "benchmarks"),
                                       env.get("PYTHONPATH", "")])
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  if proc.returncode:
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT=")][-1]
  return json.loads(line[len("RESULT="):])


def _bytes_on_device(tree, device) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  total = 0
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      if shard.device == device:
        data = shard.data
        if jax.dtypes.issubdtype(data.dtype, jax.dtypes.prng_key):
          data = jax.random.key_data(data)
        total += data.nbytes
  return total


def measure_driver(workdir: str) -> dict:
  """Runs the driver (tiny Llama, two LB-CL tasks) on the 8 devices, recording the train
  step's first call of every shape: the bytes its arguments hold on each device, its batch's
  shapes, and what XLA compiled; then compiles the plan's train step for the same shapes."""
  import jax  # pylint: disable=g-import-not-at-top
  import scale_plan  # pylint: disable=g-import-not-at-top
  from lbcl_jax import adapters  # pylint: disable=g-import-not-at-top
  from lbcl_jax import train  # pylint: disable=g-import-not-at-top

  calls = {}
  real = train.make_train_step

  def recording(*a, **k):
    step = real(*a, **k)

    def run(*args):
      old, batch = args[3], args[4]
      key = (adapters.num_tasks(old) if old else 0,
             tuple(sorted((n, v.shape) for n, v in batch.items())))
      if key not in calls:
        compiled = step.lower(*args).compile()
        calls[key] = {
            "old_tasks": key[0],
            "batch": {n: [list(v.shape), str(v.dtype)] for n, v in batch.items()},
            "bytes_per_device": max(_bytes_on_device(args, d) for d in jax.devices()),
            "compiled_argument_bytes": int(compiled.memory_analysis().argument_size_in_bytes),
            "float_shapes": sorted({s for d, s in scale_plan.buffer_shapes(compiled.as_text())
                                    if d in ("f32", "bf16")}),
        }
      return step(*args)

    return run

  train.make_train_step = recording
  tiny = pathlib.Path(workdir) / "model"
  overrides = [
      *du.FAST, *du.tiny_llama(tiny), "--config.method=lbcl",
      "--config.optim.max_steps_per_task=1", "--config.optim.grad_clip=1.0",
      f"--config.optim.global_batch_size={GLOBAL_BATCH}", "--config.eval.batch_size=16",
      "--config.data.max_test_examples=16", "--config.eval.mode=rank", "--config.plots=False",
      "--config.checkpoint.every_steps=0",
      *[f"--config.mesh.{a}={n}" for a, n in MESH.items()]]
  train.train_and_evaluate(du.make_config(*overrides), str(pathlib.Path(workdir) / "run"))
  train.make_train_step = real

  # Stage 2's step: its old stack is padded to the run's capacity (two tasks' adapters in a
  # two-task run), the shape every later stage's step sees too.
  last = max(calls.values(), key=lambda c: c["old_tasks"])
  assert last["old_tasks"] == 2, sorted(c["old_tasks"] for c in calls.values())
  prompt, total = last["batch"]["prompt_ids"][0][1], last["batch"]["input_ids"][0][1]
  setting = scale_plan.Setting(
      global_batch=GLOBAL_BATCH, source_length=prompt, target_length=total - prompt,
      old_tasks=last["old_tasks"], eval_batch=16, dtype="float32", param_dtype="float32",
      remat="none")
  hf_config = json.loads((tiny / "tiny_llama" / "config.json").read_text())
  built = scale_plan.build_programs("llama", hf_config, MESH, setting, programs=("train",))
  spec = scale_plan.batch_spec("llama", GLOBAL_BATCH, prompt, total - prompt)
  plan = scale_plan.analyse(built["train"].compile(),
                            scale_plan.param_bytes(built["args"]["train"])[1])
  return {
      "driver": last, "vocab": hf_config["vocab_size"], "hidden": hf_config["hidden_size"],
      "plan_argument_bytes": plan["argument_bytes"],
      "plan_program_argument_bytes": plan["program_argument_bytes"],
      "plan_batch": {n: [list(v.shape), str(v.dtype)] for n, v in spec.items()},
  }


@pytest.fixture(scope="module")
def driver_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("scale_plan")
  return _in_subprocess(8, "import json, sys, test_scale_plan as t; "
                        "print('RESULT=' + json.dumps(t.measure_driver(sys.argv[1])))", str(wd))


def test_driver_step_splits_hidden_states_and_logits_over_the_batch_axes(driver_run):
  d = driver_run["driver"]
  per_device = GLOBAL_BATCH // (MESH["data"] * MESH["fsdp"])
  total = d["batch"]["input_ids"][0][1]
  answer = total - d["batch"]["prompt_ids"][0][1]
  shapes = [tuple(s) for s in d["float_shapes"]]
  hidden, vocab = driver_run["hidden"], driver_run["vocab"]
  # The residual stream [B/4, S+T, hidden] and the answer columns' logits [B/4, T+1, vocab /
  # tensor] (vocab is split over tensor).
  assert (per_device, total, hidden) in shapes, shapes
  assert (per_device, answer + 1, vocab // MESH["tensor"]) in shapes, shapes
  # No float buffer holds a whole batch's (or half a batch's) sequence.
  whole = [s for s in shapes if len(s) >= 3 and s[0] > per_device and s[1] in (total, answer + 1)]
  assert not whole, whole


def test_plan_argument_bytes_match_what_the_driver_places(driver_run):
  d = driver_run["driver"]
  assert driver_run["plan_batch"] == d["batch"]  # the plan shapes batches as the pipeline
  # What the plan counts a device holding for the step's arguments (the old tasks' stack, which
  # no regulariser reads here, and unused batch columns included), against what the driver put
  # on its fullest device.
  placed, planned = d["bytes_per_device"], driver_run["plan_argument_bytes"]
  assert abs(planned - placed) <= 0.05 * placed, (planned, placed)
  # And XLA's own count of the arguments the program reads: the same in both compiles.
  program = driver_run["plan_program_argument_bytes"]
  assert abs(program - d["compiled_argument_bytes"]) <= 0.05 * d["compiled_argument_bytes"]
  assert program <= planned


def llama_8b_state_bytes() -> dict:
  """Total and per-device bytes of the 8B Llama's train-step arguments on fsdp = 64."""
  import jax  # pylint: disable=g-import-not-at-top
  import scale_plan  # pylint: disable=g-import-not-at-top
  family, cfg = scale_plan.MODELS["llama-3-8b"]
  built = scale_plan.build_programs(family, cfg, {"data": 1, "fsdp": 64, "tensor": 1},
                                    scale_plan.Setting(), programs=())
  out = {}
  for name, tree in zip(("new", "opt_state", "params", "old"), built["args"]["train"]):
    total = device = 0
    for a in jax.tree.leaves(tree):
      total += math.prod(a.shape) * a.dtype.itemsize
      device += math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
    out[name] = [total, device]
  return out


def test_llama_8b_state_is_split_64_ways_on_fsdp_64():
  got = _in_subprocess(64, "import json, test_scale_plan as t; "
                       "print('RESULT=' + json.dumps(t.llama_8b_state_bytes()))")
  assert 15e9 < got["params"][0] < 17e9  # bf16 Llama-3-8B
  for name, (total, device) in got.items():
    # Parameters, the new adapter, its optimizer state (moments, projection bases) and the 14
    # old tasks' stack: each at most 1.1x its even share.
    assert device <= 1.1 * total / 64, (name, total, device)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_block_remat_keeps_loss_and_gradients(family):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lbcl_jax import adapters  # pylint: disable=g-import-not-at-top
  from lbcl_jax.models import llama as llama_lib  # pylint: disable=g-import-not-at-top
  from lbcl_jax.models import t5 as t5_lib  # pylint: disable=g-import-not-at-top

  lib = llama_lib if family == "llama" else t5_lib
  cfg = lib.config_from_hf(du.TINY_LLAMA if family == "llama" else du.TINY_T5)
  make = lib.LlamaForCausalLM if family == "llama" else lib.T5
  params = lib.init_params(make(cfg), jax.random.key(0))
  new = adapters.init_new(jax.random.key(1), params,
                          adapters.AdapterConfig(targets=lib.ADAPTER_TARGETS, rank=4))
  new = jax.tree.map(lambda x: x + 0.1, new)  # sigma starts at 0: make the adapter count
  ids = jax.random.randint(jax.random.key(2), (2, 12), 3, 500)
  out = {}
  for remat in ("none", "weights", "full"):
    model = make(dataclasses.replace(cfg, remat=remat))

    def loss(trainable):
      with adapters.intercept(jax.tree.map(lambda x: x[None], trainable), 1.0):
        if family == "llama":
          logits = model.apply({"params": params}, ids, jnp.ones_like(ids))
        else:
          logits = model.apply({"params": params}, ids, jnp.ones_like(ids), ids[:, :5])
      return jnp.mean(jnp.square(logits))

    out[remat] = jax.jit(jax.value_and_grad(loss))(new)
  ref_value, ref_grads = out["none"]
  for remat in ("weights", "full"):
    value, grads = out[remat]
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_llama_8b_launcher_runs_the_planned_mesh():
  env = dict(os.environ, TARGET="tpu", DRY_RUN="1", TPU_NAME="lbcl-8b", ZONE="us-west4-a",
             REPO="https://example.com/lbcl_jax.git", WORKDIR="gs://bucket/run", DATA_DIR="/data")
  tpu = subprocess.run(["bash", str(REPO_ROOT / "launch" / "llama3_8b.sh"), "all"], env=env,
                       capture_output=True, text=True, check=True, timeout=60).stdout
  assert "--accelerator-type v5litepod-8" in tpu
  run = tpu.replace("\\", "").splitlines()[-1]
  for flag in ("--multihost", "--config='configs/llama3_8b.py'", "--config.mesh.fsdp=-1",
               "--config.mesh.tensor=1", "--config.model.remat=full"):
    assert flag in run, run
  env = dict(os.environ, TARGET="gpu", PYTHON="echo", WORKDIR="/shared/run", DATA_DIR="/data")
  gpu = subprocess.run(["bash", str(REPO_ROOT / "launch" / "llama3_8b.sh"), "--config.seed=1"],
                       env=env, capture_output=True, text=True, check=True, timeout=60).stdout
  assert gpu.split() == [
      "-m", "lbcl_jax.main", "--config=configs/llama3_8b.py", "--workdir=/shared/run",
      "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1",
      "--config.model.remat=weights", "--config.data.data_dir=/data", "--config.seed=1"]
