"""PNG plots of a run: the accuracy matrix, per-layer/per-task sensitivity, loss curves.

Figures are plain `matplotlib.figure.Figure`s (no pyplot, so no global figure registry and no
backend switch: importing this module changes nothing in matplotlib). `Figure.savefig`
renders PNG with Agg whatever the backend, so no display is needed; the bytes are written
atomically, with a normal file mode, by `lbcl_jax.files`.
"""

from __future__ import annotations

import io
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from lbcl_jax import files


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
  """Renders `fig` as PNG and writes it to `path` atomically."""
  buf = io.BytesIO()
  fig.savefig(buf, dpi=120, bbox_inches="tight", format="png")
  files.atomic_write_bytes(path, buf.getvalue())


def accuracy_heatmap(matrix: Sequence[Sequence[float | None]], tasks: Sequence[str],
                     rows: Sequence[str], path: str | os.PathLike, title: str = "") -> None:
  """R[i][j]: accuracy on task j (columns) after training stage i (rows)."""
  fig = Figure(figsize=(1.2 + 0.9 * len(tasks), 1.0 + 0.6 * len(rows)))
  ax = fig.subplots()
  im = draw_accuracy_heatmap(ax, matrix, tasks, rows)
  fig.colorbar(im, ax=ax, label="accuracy (%)")
  ax.set_title(title or "accuracy matrix")
  save_figure(fig, path)


def draw_accuracy_heatmap(ax, matrix: Sequence[Sequence[float | None]], tasks: Sequence[str],
                          rows: Sequence[str]):
  """Draws R (fractions; None for a task not yet evaluated) as percentages on `ax`; returns the
  image (for a colour bar)."""
  r = np.array([[np.nan if v is None else 100.0 * v for v in row] for row in matrix], dtype=float)
  im = ax.imshow(r, vmin=0, vmax=100, cmap="viridis")
  ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
  ax.set_yticks(range(len(rows)), [f"after {x}" for x in rows])
  for i in range(r.shape[0]):
    for j in range(r.shape[1]):
      if not np.isnan(r[i, j]):
        ax.text(j, i, f"{r[i, j]:.1f}", ha="center", va="center",
                color="white" if r[i, j] < 60 else "black", fontsize=8)
  return im


def sensitivity_plot(records: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
                     path: str | os.PathLike) -> None:
  """One panel per scored task: summed triplet score per layer (rows) and old task (columns).

  Args:
    records: new task name -> {layer path -> [K old tasks][r triplets] scores}.
    path: the PNG to write.
  """
  names = list(records)
  if not names:
    fig = Figure(figsize=(5, 2))
    ax = fig.subplots()
    ax.text(0.5, 0.5, "no sensitivity scored in this run\n(no injection method, or one task)",
            ha="center", va="center")
    ax.axis("off")
    save_figure(fig, path)
    return
  fig = Figure(figsize=(4.5 * len(names), 0.25 * max(len(records[n]) for n in names) + 2.0))
  axes = fig.subplots(1, len(names), squeeze=False)
  for ax, name in zip(axes[0], names):
    layers = sorted(records[name])
    m = np.array([np.asarray(records[name][l], dtype=float).sum(axis=-1) for l in layers])
    im = ax.imshow(m, aspect="auto", cmap="magma")
    ax.set_yticks(range(len(layers)), [l.replace("/", ".") for l in layers], fontsize=6)
    ax.set_xticks(range(m.shape[1]), [f"task {k}" for k in range(m.shape[1])], fontsize=7)
    ax.set_title(f"sensitivity of old triplets\non seeds of {name}", fontsize=9)
    fig.colorbar(im, ax=ax)
  save_figure(fig, path)


def loss_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike) -> None:
  """Training loss against the global step, one line per task."""
  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  for name, points in curves.items():
    if points:
      steps, losses = zip(*points)
      ax.plot(steps, losses, label=name)
  ax.set_xlabel("global step")
  ax.set_ylabel("training loss")
  ax.set_yscale("log")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  save_figure(fig, path)
