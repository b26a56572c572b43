"""How hard EWC pulled in the last task of a finished run: the penalty and its gradient.

EWC over SeqFT scores like SeqFT on SmolLM2's validation sweep. Whether its penalty was too
weak to matter or did not act at all is read from the run's last two checkpoints (the driver
keeps them): the method state after the second-to-last task (the Fisher summed over the tasks
before the last and the anchor, the weights they left) and the weights after the last task.
Printed: the Fisher's spread, `|theta - theta*|`, the penalty
`weight / 2 * sum F (theta - theta*)^2` (`methods.ewc.ewc_penalty`) and its gradient's global
norm, to hold against the gradient clipping norm (`config.optim.grad_clip`) that bounds the
loss's own step.

  python benchmarks/ewc_penalty.py WORKDIR... [--output FILE]  # ewc runs' (over seqft) workdirs
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdirs", type=pathlib.Path, nargs="+")
  p.add_argument("--output", type=pathlib.Path, default=None)
  return p.parse_args(argv)


def measure(workdir: pathlib.Path) -> dict:
  """The last task's EWC penalty from `workdir`'s last two checkpoints (see the docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lbcl_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from lbcl_jax import export  # pylint: disable=g-import-not-at-top
  from lbcl_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  from lbcl_jax.methods import ewc  # pylint: disable=g-import-not-at-top
  workdir = workdir.resolve()  # orbax reads absolute paths only
  config = export.read_config(workdir)
  if config.method != "ewc" or config.ewc.over != "seqft":
    what = f"ewc over {config.ewc.over!r}" if config.method == "ewc" else repr(config.method)
    raise InputError(f"--workdir={workdir}: method {what}; this reads an ewc run over seqft")
  ckpt_dir = workdir / "checkpoints"
  run_ckpt = checkpointing.RunCheckpointer(ckpt_dir)
  try:
    steps = run_ckpt.all_steps()
    if len(steps) < 2:
      raise InputError(f"{ckpt_dir}: {len(steps)} checkpoint(s); the last two tasks' are needed")
    before, last = steps[-2:]
    # Both must be task ends, one task apart: a run stopped mid-task (or one that saves every
    # N steps) has a newer checkpoint than its last task's end.
    progress = [run_ckpt.restore_progress(s) for s in (before, last)]
    if (any(p.get("phase") != "stage_start" for p in progress)
        or int(progress[1]["stage"]) != int(progress[0]["stage"]) + 1):
      got = ", ".join(f"step {s}: {p.get('phase')} of stage {p.get('stage')}"
                      for s, p in zip((before, last), progress))
      raise InputError(f"{ckpt_dir}: the last two checkpoints are not two consecutive task ends "
                       f"({got}); this reads a finished run that kept its task-end checkpoints")
    # Read as saved, through the driver's own reader (a damaged file is named).
    state = run_ckpt.restore(before, {"method_state": None})["method_state"]["own"]
    theta = run_ckpt.restore(last, {"params": None})["params"]
  finally:
    run_ckpt.close()
  fisher, anchor = state["fisher"], state["anchor"]
  if jax.tree.structure(theta) != jax.tree.structure(anchor):
    raise InputError(f"--workdir={workdir}: the anchor's tree is not the weights' (a run over "
                     "seqft anchors the base)")
  weight = float(config.ewc.weight)
  f = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(fisher)])
  penalty, grad = jax.value_and_grad(ewc.ewc_penalty)(theta, anchor, fisher, weight)
  sq = lambda t: float(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(t)))
  delta = jax.tree.map(lambda t, a: np.asarray(t, np.float64) - np.asarray(a, np.float64),
                       theta, anchor)
  return {"workdir": str(workdir), "weight": weight, "checkpoints": [before, last],
          "fisher": {"mean": float(f.mean()), "median": float(np.median(f)),
                     "max": float(f.max()), "sum": float(f.sum())},
          "distance": sq(delta) ** 0.5, "penalty": float(penalty),
          "penalty_grad_norm": sq(grad) ** 0.5,
          "grad_clip": config.optim.grad_clip}


def main(argv=None) -> int:
  args = parse_args(argv)
  sys.path.insert(0, str(ROOT))
  from lbcl_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  runs = []
  for workdir in args.workdirs:
    try:
      out = measure(workdir)
    except InputError as e:
      sys.exit(f"error: {e}")
    runs.append(out)
    f = out["fisher"]
    print(f"{workdir}: lambda {out['weight']:g}; Fisher mean {f['mean']:.3g}, median "
          f"{f['median']:.3g}, max {f['max']:.3g}; |theta - theta*| {out['distance']:.3g}; "
          f"penalty {out['penalty']:.3g}, its gradient's norm {out['penalty_grad_norm']:.3g} "
          f"(clipping norm {out['grad_clip']})", flush=True)
  if args.output:
    import machine  # pylint: disable=g-import-not-at-top
    machine.write_record(args.output, {"machine": machine.describe(), "runs": runs})
  return 0


if __name__ == "__main__":
  sys.exit(main())
