"""Atomic file writes: every output of a run (results, configs, plots) goes through here.

A file is written to a temporary name beside its target, flushed to disk and renamed over the
target, so a reader (or a crash) sees the old file or the new one, never half of one. The
final file gets the mode a plain `open(path, 'w')` would give it, `0o666 & ~umask`, not the
private 0600 of `tempfile.mkstemp`.

Importing this module has no side effects: the process umask is read on the first write.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import threading
from typing import Optional

_umask_lock = threading.Lock()
_umask: Optional[int] = None


def _umask_from_proc() -> Optional[int]:
  """The umask from `/proc/self/status` (Linux >= 4.7), or None where there is none."""
  try:
    with open("/proc/self/status", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  return None


def process_umask() -> int:
  """The process umask, read once (on first use) and cached."""
  global _umask
  if _umask is None:
    with _umask_lock:
      if _umask is None:
        mask = _umask_from_proc()
        if mask is None:
          # os.umask can only be read by setting it. Done once, under the lock: flipping it
          # per write would race with other threads (orbax's) creating files meanwhile.
          mask = os.umask(0o077)
          os.umask(mask)
        _umask = mask
  return _umask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
  """Writes `data` to `path` atomically (temporary file beside it, fsync, rename).

  Creates missing parent directories. On any failure the previous file, if any, is left
  as it was and the temporary file is removed.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp makes the file private; give it the mode a plain open() would have.
    os.chmod(tmp, 0o666 & ~process_umask())
    os.replace(tmp, path)
  finally:
    # After a successful replace the temporary name is gone; after a failure, remove it.
    if os.path.exists(tmp):
      os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
  """Writes `text` as UTF-8 to `path` atomically (no newline translation)."""
  atomic_write_bytes(path, text.encode("utf-8"))


def replace_directory(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
  """Puts the complete directory `tmp` at `target` by renames: an existing `target` is moved
  aside first and removed once the new one is in place, so a reader sees the old directory or
  the new one, never a half-written one."""
  tmp, target = pathlib.Path(tmp), pathlib.Path(target)
  if target.exists():
    aside = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, aside / target.name)
    os.replace(tmp, target)
    shutil.rmtree(aside, ignore_errors=True)
  else:
    os.replace(tmp, target)
