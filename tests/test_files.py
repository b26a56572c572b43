"""Atomic writes: content, normal file modes from the umask, and failures that change nothing."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from lbcl_jax import files


def current_umask() -> int:
  mask = os.umask(0o077)
  os.umask(mask)
  return mask


def mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def test_writes_text_and_bytes_creating_parents(tmp_path):
  text_path, bytes_path = tmp_path / "a" / "b" / "r.json", tmp_path / "a" / "x.bin"
  files.atomic_write_text(text_path, "één\r\nline\n")
  files.atomic_write_bytes(bytes_path, b"\x00\x89PNG")
  assert text_path.read_bytes() == "één\r\nline\n".encode("utf-8")  # no newline translation
  assert bytes_path.read_bytes() == b"\x00\x89PNG"
  files.atomic_write_text(text_path, "new")
  assert text_path.read_text() == "new"
  assert sorted(os.listdir(tmp_path / "a")) == ["b", "x.bin"]  # no temp files
  assert os.listdir(tmp_path / "a" / "b") == ["r.json"]


def test_mode_is_what_a_plain_open_gives(tmp_path):
  want = 0o666 & ~current_umask()
  path = tmp_path / "r.txt"
  files.atomic_write_text(path, "new file")
  assert mode(path) == want
  path.chmod(0o600)  # Replacing a file gives the new one the normal mode too.
  files.atomic_write_bytes(path, b"again")
  assert mode(path) == want
  plain = tmp_path / "plain.txt"
  plain.write_text("x")
  assert mode(plain) == want


def test_umask_is_read_at_first_write_not_at_import(tmp_path):
  # A process that sets its umask after importing lbcl_jax.files gets files of that umask.
  code = textwrap.dedent("""
      import os, stat, sys
      from lbcl_jax import files
      os.umask(0o027)
      files.atomic_write_text(sys.argv[1], "x")
      print(oct(stat.S_IMODE(os.stat(sys.argv[1]).st_mode)), oct(os.umask(0o027)))
  """)
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], check=True,
                       capture_output=True, text=True).stdout.split()
  assert out == [oct(0o640), oct(0o027)]  # the umask itself is left as it was


def test_umask_fallback_without_proc(monkeypatch):
  monkeypatch.setattr(files, "_umask", None)
  monkeypatch.setattr(files, "_umask_from_proc", lambda: None)
  before = current_umask()
  assert files.process_umask() == before
  assert current_umask() == before  # read, then restored


def test_a_failed_replace_leaves_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "r.json"
  path.write_text("old")

  def failing_replace(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", failing_replace)
  with pytest.raises(OSError, match="disk full"):
    files.atomic_write_text(path, "new")
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["r.json"]


def test_an_exception_while_writing_leaves_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "plot.png"
  path.write_bytes(b"old")
  with pytest.raises(TypeError):
    files.atomic_write_bytes(path, "not bytes")  # raised by the write itself

  def failing_fsync(fd):
    raise OSError("I/O error")

  monkeypatch.setattr(os, "fsync", failing_fsync)
  with pytest.raises(OSError, match="I/O error"):
    files.atomic_write_bytes(path, b"new")
  assert path.read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["plot.png"]
