"""Prints the N-th ```bash block of README.md (1-based): CI runs the README's own commands."""

import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)
n = int(sys.argv[1])
if not 1 <= n <= len(blocks):
  sys.exit(f"README.md has {len(blocks)} bash blocks, not {n}")
sys.stdout.write(blocks[n - 1])
