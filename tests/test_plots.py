"""Run plots: no matplotlib side effects on import, PNGs written with normal file modes."""

import os
import stat
import subprocess
import sys

from lbcl_jax import plots


def test_import_leaves_pyplot_and_the_backend_alone():
  # The backend the user chose (here through MPLBACKEND) survives importing lbcl_jax.plots.
  code = ("import sys; import lbcl_jax.plots; assert 'matplotlib.pyplot' not in sys.modules; "
          "import matplotlib; assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()")
  subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "MPLBACKEND": "svg"})


def test_plots_render_pngs_with_a_normal_mode(tmp_path):
  mask = os.umask(0o077)
  os.umask(mask)
  plots.accuracy_heatmap([[0.9, None], [0.7, 0.8]], ["a", "b"], ["a", "b"], tmp_path / "m.png")
  plots.sensitivity_plot({}, tmp_path / "s0.png")
  plots.sensitivity_plot({"b": {"enc/q": [[1.0, 2.0]], "enc/v": [[0.5, 0.1]]}},
                         tmp_path / "s.png")
  plots.loss_curves({"a": [(0, 2.0), (5, 1.0)], "b": []}, tmp_path / "l.png")
  names = sorted(os.listdir(tmp_path))
  assert names == ["l.png", "m.png", "s.png", "s0.png"]  # no temp files left
  for name in names:
    data = (tmp_path / name).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~mask
