"""How much of each task's adapter lies in the span of the adapters before it: the measured link
between injection, projection and forgetting.

For a finished run of an SVD-family method (its --workdir), every adapted layer holds one
triplet stack per task, `dW^t = U^t diag(sigma^t) V^t`. For each task t >= 2 this prints, averaged
over the layers, the share of squared norm inside the old tasks' spans:

  * U: ||P U^t||^2 / ||U^t||^2, P the projector onto span(U^1 .. U^{t-1}) (columns);
  * V: the same for the rows of V^t against span(V^1 .. V^{t-1});
  * dW: ||P dW^t||^2 / ||dW^t||^2, the update's share in the old column space: the part of task
    t's update that acts on the old tasks' directions.

Projection (B-CL, LB-CL) keeps the gradients of U^t and V^t out of those spans, but not their
starting point: injection (L-CL, LB-CL) starts U^t and V^t as a mix of the old triplets, i.e.
inside the old spans, so their share there is whatever training leaves of the start. A random
start puts about K r / d of its norm there by chance.

  python benchmarks/adapter_overlap.py WORKDIR [WORKDIR ...] [--json]
  python benchmarks/adapter_overlap.py --report_only

The SmolLM2 grid (`generative_cl.py`) measures every adapter cell as it finishes and keeps the
rows in the cell's record; `--report_only` collects them from the committed records into
`benchmarks/results/adapter_overlap.json` and prints the tables, so they can be rebuilt.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from lbcl_jax import files


def _share(basis: np.ndarray, x: np.ndarray) -> float:
  """Share of ||x||^2 (columns of x) inside the column span of `basis`."""
  q, s, _ = np.linalg.svd(basis, full_matrices=False)
  q = q[:, s > s.max() * 1e-6] if s.size else q[:, :0]
  total = float(np.sum(x * x))
  return float(np.sum((q.T @ x) ** 2)) / total if total else float("nan")


def overlaps(adapters: dict) -> list[dict[str, float]]:
  """Per task t >= 2: mean over layers of the U, V and dW shares in the old spans."""
  rows = []
  num = next(iter(adapters.values()))["U"].shape[0]
  for t in range(1, num):
    u, v, w = [], [], []
    for layer in adapters.values():
      U, S, V = (np.asarray(layer[k], np.float64) for k in ("U", "sigma", "V"))
      old_u = np.concatenate(list(U[:t]), axis=1)          # [d, t r]
      old_v = np.concatenate(list(V[:t]), axis=0).T        # [d', t r]
      u.append(_share(old_u, U[t]))
      v.append(_share(old_v, V[t].T))
      w.append(_share(old_u, U[t] @ np.diag(S[t]) @ V[t]))
    rows.append({"task": t + 1, "U": float(np.mean(u)), "V": float(np.mean(v)),
                 "dW": float(np.mean(w)), "layers": len(u)})
  return rows


CELLS = pathlib.Path(__file__).resolve().parent / "results" / "generative_cells"
OUTPUT = pathlib.Path(__file__).resolve().parent / "results" / "adapter_overlap.json"


def _print(rows_by_run: dict[str, dict]) -> None:
  print(f"{'run':<32} {'method':<8} {'task':>4} {'U in old':>9} {'V in old':>9} {'dW in old':>10}")
  for run, entry in rows_by_run.items():
    for row in entry["rows"]:
      print(f"{run:<32} {entry['method']:<8} {row['task']:>4} {row['U']:>9.3f} {row['V']:>9.3f} "
            f"{row['dW']:>10.3f}")


def report(cells_dir: pathlib.Path = CELLS) -> dict:
  """The overlap rows of every committed grid record that has them, with per-run means."""
  runs, records = {}, {}
  for path in sorted(cells_dir.glob("*.json")):
    record = json.loads(path.read_text())
    if record.get("adapter_overlap"):
      records[path.stem] = record
      rows = record["adapter_overlap"]
      method = next(f.split("=", 1)[1] for f in record["flags"]
                    if f.startswith("--config.method="))
      runs[path.stem] = {"method": method, "rows": rows,
                         "mean": {k: round(float(np.mean([r[k] for r in rows])), 4)
                                  for k in ("U", "V", "dW")},
                         "bwt": record.get("bwt"), "average_accuracy":
                         record.get("average_accuracy")}
  # Here, not at the top: the grid runs this script once per finished cell to read its
  # checkpoints, and that path needs neither cl_grid nor the matplotlib it imports.
  import cl_grid  # pylint: disable=g-import-not-at-top
  # The shares do not depend on the machine, but every result names where its runs ran.
  return {"cells_dir": str(cells_dir.relative_to(cells_dir.parents[2])), "runs": runs,
          "machines": cl_grid.machines(records)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdirs", nargs="*", type=pathlib.Path)
  p.add_argument("--json", action="store_true", help="print the workdirs' rows as JSON")
  p.add_argument("--report_only", action="store_true",
                 help=f"collect the grid records' rows into {OUTPUT.name}")
  args = p.parse_args(argv)
  if args.report_only:
    out = report()
    files.atomic_write_text(OUTPUT, json.dumps(out, indent=1) + "\n")
    _print(out["runs"])
    print(f"{len(out['runs'])} runs; wrote {OUTPUT}")
    return 0
  if not args.workdirs:
    p.error("give WORKDIRs or --report_only")
  from lbcl_jax import export  # pylint: disable=g-import-not-at-top
  from lbcl_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  runs = {}
  for wd in args.workdirs:
    try:
      run = export.load_run(wd, need_adapters=True)
    except InputError as e:
      sys.exit(f"error: {e}")
    if "U" not in next(iter(run.adapters.values())):
      sys.exit(f"error: {wd}: method {run.config.method!r} has no SVD triplets")
    runs[wd.name] = {"method": run.config.method, "rows": overlaps(run.adapters)}
  if args.json:
    print(json.dumps(list(runs.values())))
  else:
    _print(runs)
  return 0


if __name__ == "__main__":
  sys.exit(main())
