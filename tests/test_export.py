"""`lbcl_jax.export`: a run's model after stage N as a Hugging Face checkpoint (merged) or as
PEFT LoRA adapters, checked against transformers (+ PEFT) on tiny runs of every family, and
its one-line reports of bad input."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import driver_utils as du
from conftest import REPO_ROOT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lbcl_jax import export  # noqa: E402  # pylint: disable=g-import-not-at-top

TOL = 1e-4
# A large rate, so that two steps move the adapters well past the tolerance.
STEPS = ["--config.optim.max_steps_per_task=2", "--config.plots=False",
         "--config.optim.learning_rate=0.05"]
FAMILIES = {"t5": du.tiny_t5, "bert": du.tiny_bert, "llama": du.tiny_llama}
# One run per family; Llama with O-LoRA (LoRA init, sigma frozen) so both adapter inits and
# both method families are exported.
METHODS = {"t5": "lbcl", "bert": "lbcl", "llama": "olora"}
HF_CLASS = {"t5": "T5ForConditionalGeneration", "bert": "BertModel",
            "llama": "LlamaForCausalLM"}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def runs(tmp):
  """family -> workdir of a finished 2-task run (made once, on first use)."""
  made = {}

  def get(family: str, method: str | None = None) -> pathlib.Path:
    method = method or METHODS[family]
    if (family, method) not in made:
      workdir = tmp / f"{family}_{method}"
      du.run_main(workdir, *du.FAST, *FAMILIES[family](tmp), f"--config.method={method}",
                  *STEPS)
      made[(family, method)] = workdir
    return made[(family, method)]
  return get


def _inputs(family: str):
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 400, (2, 7))
  return ids, np.ones_like(ids), rng.randint(3, 400, (2, 5))


def ours(run: export.RunModel, family: str) -> np.ndarray:
  """Our model's output with every adapter up to the run's stage merged in."""
  ids, mask, dec = _inputs(family)
  params = {"params": run.merged_params()}
  if family == "t5":
    return np.asarray(run.backbone.model.apply(params, ids, mask, dec, np.ones_like(dec)))
  return np.asarray(run.backbone.model.apply(params, ids, mask))


def theirs(model, family: str) -> np.ndarray:
  """transformers' logits (T5, Llama) or last hidden states (BERT) on the same inputs."""
  ids, mask, dec = (torch.tensor(x) for x in _inputs(family))
  with torch.no_grad():
    if family == "t5":
      return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.numpy()
    out = model(input_ids=ids, attention_mask=mask)
    return (out.last_hidden_state if family == "bert" else out.logits).float().numpy()


def _load(family: str, directory: pathlib.Path):
  return getattr(transformers, HF_CLASS[family]).from_pretrained(str(directory)).eval()


@pytest.mark.parametrize("family", ["t5", "bert", "llama"])
def test_merged_matches_transformers(runs, tmp, family):
  workdir = runs(family)
  out = export.export_run(workdir, tmp / f"{family}_merged")
  run = export.load_run(workdir)
  assert run.stage == run.finished == 2
  expected = ours(run, family)
  got = theirs(_load(family, out), family)
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
  # The adapters changed the model, so the match says something about them.
  run.adapters = None
  assert np.abs(ours(run, family) - expected).max() > 10 * TOL
  # The tokenizer travels with the model.
  assert transformers.AutoTokenizer.from_pretrained(str(out))("a b").input_ids
  info = json.loads((out / export.EXPORT_INFO).read_text())
  assert info["stage"] == 2 and info["format"] == "merged"


def test_merged_earlier_stage(runs, tmp):
  workdir = runs("t5")
  out = tmp / "t5_stage1"
  proc = _export(f"--workdir={workdir}", f"--out={out}", "--stage=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = export.load_run(workdir, stage=1)
  assert all(leaf["U"].shape[0] == 1 for leaf in run.adapters.values())
  np.testing.assert_allclose(theirs(_load("t5", out), "t5"), ours(run, "t5"), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_peft_matches(runs, tmp, family):
  peft = pytest.importorskip("peft")
  workdir = runs(family)
  out = export.export_run(workdir, tmp / f"{family}_peft", fmt="peft")
  config = json.loads((out / "stage_1" / export.ADAPTER_CONFIG).read_text())
  assert config["lora_alpha"] == config["r"]  # PEFT's scaling is 1: ours is in lora_B
  model = peft.PeftModel.from_pretrained(_load(family, out / "base"), str(out / "stage_1"),
                                         adapter_name="stage_1")
  model.load_adapter(str(out / "stage_2"), adapter_name="stage_2")
  model.base_model.set_adapter(["stage_1", "stage_2"])  # every task's adapter at once
  model.eval()
  np.testing.assert_allclose(theirs(model, family), ours(export.load_run(workdir), family),
                             atol=TOL, rtol=0)


def test_peft_keys_follow_peft(runs, tmp):
  """Key names and shapes as PEFT's own `save_pretrained` writes them for a BertModel."""
  pytest.importorskip("peft")
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  out = export.export_run(runs("bert"), tmp / "bert_peft", fmt="peft")
  tensors = load_file(str(out / "stage_2" / export.ADAPTER_WEIGHTS))
  a = tensors["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"]
  b = tensors["base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"]
  assert a.shape == (8, du.TINY_BERT["hidden_size"]) and b.shape == (du.TINY_BERT["hidden_size"], 8)
  assert sorted(json.loads((out / "stage_2" / export.ADAPTER_CONFIG).read_text())
                ["target_modules"]) == ["query", "value"]


def test_hf_module_names():
  assert export.hf_module_name("encoder/block_0/layer_0/SelfAttention/q") == \
      "encoder.block.0.layer.0.SelfAttention.q"
  assert export.hf_module_name("encoder/layer_1/attention/self/query") == \
      "encoder.layer.1.attention.self.query"
  assert export.hf_module_name("model/layers_0/self_attn/q_proj") == \
      "model.layers.0.self_attn.q_proj"
  assert export.hf_module_name("decoder/block_1/layer_2/DenseReluDense/wi_0") == \
      "decoder.block.1.layer.2.DenseReluDense.wi_0"


# ---------------------------------------------------------------------------------------------
# Bad input: one `error:` line, exit 2, nothing left behind.


def _export(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  return subprocess.run([sys.executable, "-m", "lbcl_jax.export", *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def _assert_refused(proc, out: pathlib.Path, *words: str, existed: bool = False):
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr[-3000:]
  for w in words:
    assert w in errors[0], errors[0]
  assert out.exists() == existed
  assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_no_finished_stage(tmp, runs):
  workdir = tmp / "fresh"
  workdir.mkdir()
  shutil.copy(runs("t5") / "config.json", workdir / "config.json")
  out = tmp / "bad1"
  _assert_refused(_export(f"--workdir={workdir}", f"--out={out}"), out, "no finished stage")


def test_stage_out_of_range(runs, tmp):
  out = tmp / "bad2"
  _assert_refused(_export(f"--workdir={runs('t5')}", f"--out={out}", "--stage=3"), out,
                  "--stage=3", "1..2")


def test_existing_out(runs, tmp):
  out = tmp / "bad3"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  _assert_refused(_export(f"--workdir={runs('t5')}", f"--out={out}"), out, "not empty",
                  existed=True)
  assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_seqft(runs, tmp):
  """SeqFT trains the base: no PEFT adapters, only the last stage kept; merged works."""
  workdir = runs("t5", "seqft")
  out = tmp / "bad4"
  _assert_refused(_export(f"--workdir={workdir}", f"--out={out}", "--format=peft"), out,
                  "seqft", "trains the base")
  _assert_refused(_export(f"--workdir={workdir}", f"--out={out}", "--stage=1"), out,
                  "--stage=1", "last finished stage")
  run = export.load_run(workdir)
  assert run.trains_base and run.adapters is None
  np.testing.assert_allclose(theirs(_load("t5", export.export_run(workdir, out)), "t5"),
                             ours(run, "t5"), atol=TOL, rtol=0)


def test_config_export_final_writes_the_merged_model(tmp_path):
  """`config.export.final`: the driver leaves the last stage's merged model in W/export."""
  wd = tmp_path / "wd"
  du.run_main(wd, *du.FAST, *du.tiny_bert(tmp_path), "--config.num_tasks=1",
              "--config.optim.max_steps_per_task=1", "--config.plots=False",
              "--config.export.final=True")
  assert (wd / "results.json").exists()
  written = json.loads((wd / "export" / "config.json").read_text())
  assert written["model_type"] == "bert" and (wd / "export" / "model.safetensors").is_file()


def test_a_run_recorded_before_a_config_field_existed_loads(runs, tmp):
  """A run whose config.json lacks fields added to the code since (the SmolLM2 grid's cells
  begun before `replay` and `eval.matrix` existed) loads as the same run: those fields read as
  their defaults (a run with a field unknown to `methods` used to fail with AttributeError)."""
  workdir = runs("t5")
  old = tmp / "t5_recorded_earlier"
  shutil.copytree(workdir, old)
  config = json.loads((old / "config.json").read_text())
  for group, field in (("replay", None), ("ewc", None), ("eval", "matrix")):
    if field is None:
      del config[group]
    else:
      del config[group][field]
  (old / "config.json").write_text(json.dumps(config))
  then, now = export.load_run(old, need_adapters=True), export.load_run(workdir, need_adapters=True)
  assert then.config.eval.matrix == "full" and then.config.replay == now.config.replay
  assert then.config.to_dict() == now.config.to_dict()
  for path, leaf in now.adapters.items():
    for k, v in leaf.items():
      np.testing.assert_array_equal(then.adapters[path][k], v)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_stage_answers_rebuild_the_driver_rows(runs, family):
  """benchmarks/stage_answers.py rebuilds each stage's model from the last checkpoint and
  evaluates it through the driver's path: its accuracies are the driver's matrix, cell by
  cell (a wrong stage slice, label space or merge would move them), and its counts add up."""
  import stage_answers  # pylint: disable=g-import-not-at-top  # benchmarks/, on the path
  workdir = runs(family)
  doc = json.loads((workdir / "results.json").read_text())
  tasks, matrix = doc["tasks"], doc["accuracy_matrix"]
  got = stage_answers.stage_answers(str(workdir), tasks)
  assert got["stages"] == doc["stages"]
  for j, name in enumerate(tasks):
    rows = got["tasks"][name]
    assert [r["stage"] for r in rows] == list(range(j + 1, len(matrix) + 1))
    for r in rows:
      assert r["accuracy"] == pytest.approx(matrix[r["stage"] - 1][j], abs=1e-9)
      assert r["own"] + r["other_task"] + r["none"] == r["rows"]
      assert sum(n for _, n in r["top"]) <= r["rows"]


def test_stage_answers_without_a_stage(runs):
  """The last model less stage 2's adapter is the model after stage 1 (the run scores each
  task in its own label space, so the space does not move with the stage either)."""
  import jax  # pylint: disable=g-import-not-at-top
  import stage_answers  # pylint: disable=g-import-not-at-top
  workdir = runs("bert")
  doc = json.loads((workdir / "results.json").read_text())
  assert doc["label_space"] == "task"
  first = doc["tasks"][0]
  got = stage_answers.stage_answers(str(workdir), [first], without=[2])
  (row,) = got["tasks"][first]
  assert row["stage"] == 2 and row["without"] == [2]
  assert row["accuracy"] == pytest.approx(doc["accuracy_matrix"][0][0], abs=1e-9)
  # The model it evaluates is the model after stage 1, and not the one after stage 2.
  run = export.load_run(workdir)
  ours_1, first_1, last = (jax.tree.leaves(p) for p in (
      stage_answers.merged(run, [1]), export.load_run(workdir, stage=1).merged_params(),
      run.merged_params()))
  for a, b in zip(ours_1, first_1):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(ours_1, last))
  with pytest.raises(export.InputError, match="--without"):
    stage_answers.stage_answers(str(workdir), [first], without=[3])


def test_stage_answers_adapter_norms(runs):
  """Each stage's adapter norm is how far its adapter alone moves the base's weights."""
  import jax  # pylint: disable=g-import-not-at-top
  import stage_answers  # pylint: disable=g-import-not-at-top
  run = export.load_run(runs("t5"))
  norms = stage_answers.adapter_norms(run)
  assert len(norms) == run.stage == 2
  base = jax.tree.leaves(run.params)
  for k, norm in enumerate(norms, start=1):
    moved = jax.tree.leaves(stage_answers.merged(run, [k]))
    sq = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
             for a, b in zip(moved, base))
    assert norm > 0 and np.sqrt(sq) == pytest.approx(norm, rel=1e-4)


def test_stage_answers_refuses_a_single_carried_adapter(runs):
  """SeqLoRA carries one adapter through the stages: no per-stage model to rebuild."""
  import stage_answers  # pylint: disable=g-import-not-at-top
  workdir = runs("bert", "seqlora")
  with pytest.raises(export.InputError, match="carries one adapter"):
    stage_answers.stage_answers(str(workdir), ["syn_news"])
