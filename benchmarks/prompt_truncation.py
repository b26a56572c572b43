"""What a prompt limit leaves of O-LoRA's prompt: the share of test prompts that lose their
options, their task header or their closing "Answer:" cue, per truncation.

For each task of the SmolLM2 grid's order 1 (dbpedia, amazon, yelp, agnews), 300 test sentences
(the first 300 of the local test file) are prompted as O-LoRA prompts them and tokenised with
SmolLM2-135M-Instruct's tokenizer, cut to the grid's 128 tokens by `config.data.truncation`'s
"left" (the first pass: the first tokens go) and "sentence" (the default: the sentence loses its
end). A prompt "keeps its options" if the whole `Option: a, b, ...` line survives; "keeps its
header" if `Task:...\\nDataset:...` does; "keeps its cue" if it ends with "Answer:". Writes
`benchmarks/results/prompt_truncation.json` and prints a table.

  python benchmarks/prompt_truncation.py [--data_dir ../shared/cl_benchmark] [--max_length 128]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = ("dbpedia", "amazon", "yelp", "agnews")


def measure(tokenizer, examples, max_length: int, truncation: str) -> dict:
  from lbcl_jax import tasks  # pylint: disable=g-import-not-at-top
  from lbcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  ids = pipeline.prompt_content_ids(tokenizer, examples, max_length, truncation)
  task = tasks.get_task(examples[0].task)
  head, _, _ = task.prompt_parts("")
  options = "Option: " + ", ".join(task.labels)
  header = head.split(task.instruction)[0]
  texts = [tokenizer.decode(x) for x in ids]
  n = len(texts)
  return {"examples": n,
          "cut": sum(len(x) == max_length for x in ids) / n,
          "keeps_options": sum(options in t for t in texts) / n,
          "keeps_header": sum(t.startswith(header) for t in texts) / n,
          "keeps_cue": sum(t.rstrip().endswith("Answer:") for t in texts) / n}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "cl_benchmark"))
  p.add_argument("--max_length", type=int, default=128)
  p.add_argument("--examples", type=int, default=300)
  args = p.parse_args(argv)
  from lbcl_jax import files  # pylint: disable=g-import-not-at-top
  from lbcl_jax.data import load_split  # pylint: disable=g-import-not-at-top
  from lbcl_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  from lbcl_jax.models import gguf, hf  # pylint: disable=g-import-not-at-top
  tokenizer = hf.load_tokenizer(gguf.smollm2_gguf_path())
  out = {"tokenizer": "SmolLM2-135M-Instruct", "max_length": args.max_length, "tasks": {}}
  print(f"{'task':<9} {'truncation':<10} {'cut':>6} {'options':>8} {'header':>7} {'cue':>6}")
  for name in TASKS:
    try:
      examples = load_split(name, "test", "local", root=args.data_dir)[:args.examples]
    except InputError as e:
      sys.exit(f"error: {e}")
    out["tasks"][name] = {}
    for truncation in ("left", "sentence"):
      m = measure(tokenizer, examples, args.max_length, truncation)
      out["tasks"][name][truncation] = {k: round(v, 3) for k, v in m.items()}
      print(f"{name:<9} {truncation:<10} {m['cut']:>6.1%} {m['keeps_options']:>8.1%} "
            f"{m['keeps_header']:>7.1%} {m['keeps_cue']:>6.1%}")
  path = ROOT / "benchmarks" / "results" / "prompt_truncation.json"
  files.atomic_write_text(path, json.dumps(out, indent=1) + "\n")
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
