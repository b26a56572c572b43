"""The task registry: the 15 benchmark tasks, the synthetic suite's tasks, and the task orders.

Everything here is copied from O-LoRA's public repository (github.com/cmnfriend/O-LoRA), which
LB-CL follows for its benchmark:

* Categories and dataset names (as they appear in the prompt and in the `CL_Benchmark/`
  directory layout `<category>/<dataset>/`): `configs/*_configs/*/train_tasks.json` and the
  `CL_Benchmark/` tree.
* Label sets, in order: `CL_Benchmark/<category>/<dataset>/labels.json`. The repository's index
  holds no `labels.json` for BoolQA, QQP or MultiRC/MultiRC; BoolQA and QQP use the strings their
  data files use ("True"/"False", order assumed to match WiC's), MultiRC copies
  `MultiRC/MultiRC_2000/labels.json` (["False", "True"]).
* Instructions: `configs/instruction_config.json` (the file the run scripts pass as
  `--instruction_file`; identical to `O-LoRA/configs/instruction_config_cl.json`).
* The prompt: `src/uie_dataset_lora.py` appends `"Option: " + ", ".join(labels) + " \\n" +
  "{0}" + "\\nAnswer:"` to the instruction (COPA alone uses `"{0}\\nAnswer:"`: no instruction,
  no options, its sentence already asks the question), and `src/uie_collator.py` prefixes
  `"Task:" + category + "\\n" + "Dataset:" + dataset + "\\n"` (the run scripts set
  `--add_task_name True --add_dataset_name True`). Every instruction ends with "\\n", so the
  options follow on their own line.
* Orders 1-6: the LB-CL / O-LoRA papers (orders 1-3: the standard 4-task benchmark; 4-6: the
  15-task long sequence of Razdaibiedina et al., 2023).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from lbcl_jax.errors import InputError

# O-LoRA's `configs/instruction_config.json`, keyed by category. COPA has none (see above).
INSTRUCTIONS: Mapping[str, str] = {
    "NLI": ('What is the logical relationship between the "sentence 1" and the "sentence 2"? '
            "Choose one from the option.\n"),
    "QQP": ('Whether the "first sentence" and the "second sentence" have the same meaning? '
            "Choose one from the option.\n"),
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "BoolQA": ("According to the following passage, is the question true or false? "
               "Choose one from the option.\n"),
    "MultiRC": ("According to the following passage and question, is the candidate answer true "
                "or false? Choose one from the option.\n"),
    "WiC": ("Given a word and two sentences, whether the word is used with the same sense in "
            "both sentence? Choose one from the option.\n"),
    "COPA": "",
}


@dataclasses.dataclass(frozen=True)
class Task:
  """One classification task, phrased as text-to-text the way O-LoRA phrases it.

  Attributes:
    name: the registry key (lower case, e.g. "sst-2"); `Example.task` holds it.
    path: the directory relative to a CL_Benchmark root, `<category>/<dataset>` (e.g. "SC/SST-2").
    labels: the label strings in `labels.json` order; a label's index is its class id.
    instruction: the instruction text (with its trailing newline); "" for none.
    show_options: whether the prompt lists the options (False only for COPA, as O-LoRA).
    synthetic: whether the task belongs to the embedded synthetic suite.
  """

  name: str
  path: str
  labels: tuple[str, ...]
  instruction: str
  show_options: bool = True
  synthetic: bool = False

  @property
  def category(self) -> str:
    """O-LoRA's task category ("TC", "SC", "NLI", ...): the first component of `path`."""
    return self.path.split("/")[0]

  @property
  def dataset(self) -> str:
    """O-LoRA's dataset name as spelled in the prompt and the directory (e.g. "SST-2")."""
    return self.path.split("/")[1]

  @property
  def num_labels(self) -> int:
    return len(self.labels)

  def prompt(self, sentence: str) -> str:
    """The model input for one sentence, character for character as O-LoRA builds it."""
    return "".join(self.prompt_parts(sentence))

  def prompt_parts(self, sentence: str) -> tuple[str, str, str]:
    """`prompt(sentence)` as (header, sentence, cue): the header holds the task, dataset,
    instruction and options; the cue is the closing "\nAnswer:". Truncation cuts the middle."""
    prefix = f"Task:{self.category}\nDataset:{self.dataset}\n"
    if not self.show_options:
      return f"{prefix}{self.instruction}", sentence, "\nAnswer:"
    return (f"{prefix}{self.instruction}Option: {', '.join(self.labels)} \n", sentence,
            "\nAnswer:")

  def label_index(self, label: str) -> int:
    """The class id of `label`; ValueError naming the valid labels when it is not one."""
    try:
      return self.labels.index(label)
    except ValueError:
      raise ValueError(f"{label!r} is not a label of task {self.name!r}; its labels are "
                       f"{list(self.labels)}") from None


def _task(name: str, path: str, labels: Sequence[str], synthetic: bool = False) -> Task:
  category = path.split("/")[0]
  return Task(name=name, path=path, labels=tuple(labels), instruction=INSTRUCTIONS[category],
              show_options=category != "COPA", synthetic=synthetic)


_SENTIMENT_5 = ("very negative", "negative", "neutral", "positive", "very positive")

# The 15 tasks of the benchmark, in the order of the paper's task table.
BENCHMARK_TASKS: tuple[Task, ...] = (
    _task("agnews", "TC/agnews", ("World", "Sports", "Business", "Science or Technology")),
    _task("amazon", "SC/amazon", _SENTIMENT_5),
    _task("yelp", "SC/yelp", _SENTIMENT_5),
    _task("dbpedia", "TC/dbpedia",
          ("Company", "Educational Institution", "Artist", "Athlete", "Office Holder",
           "Mean of Transportation", "Building", "Natural Place", "Village", "Animal", "Plant",
           "Album", "Film", "Written Work")),
    _task("yahoo", "TC/yahoo",
          ("Society & Culture", "Science & Mathematics", "Health", "Education & Reference",
           "Computers & Internet", "Sports", "Business & Finance", "Entertainment & Music",
           "Family & Relationships", "Politics & Government")),
    _task("mnli", "NLI/MNLI", ("neutral", "entailment", "contradiction")),
    _task("cb", "NLI/CB", ("entailment", "contradiction", "neutral")),
    _task("wic", "WiC/WiC", ("True", "False")),
    _task("copa", "COPA/COPA", ("A", "B")),
    _task("qqp", "QQP/QQP", ("True", "False")),
    _task("boolqa", "BoolQA/BoolQA", ("True", "False")),
    _task("rte", "NLI/RTE", ("contradiction", "entailment")),
    _task("imdb", "SC/IMDB", ("Good", "Bad")),
    _task("sst-2", "SC/SST-2", ("Good", "Bad")),
    _task("multirc", "MultiRC/MultiRC", ("False", "True")),
)

# The embedded synthetic suite (sentences generated by `lbcl_jax.data.synthetic`, which keys its
# generators by these names). They reuse O-LoRA's TC/SC instructions so the prompts read like the
# benchmark's. `syn_sentiment` and `syn_sentiment_flip` are the deliberately conflicting pair:
# the same sentences with opposite labels.
SYNTHETIC_TASKS: tuple[Task, ...] = (
    _task("syn_news", "TC/syn_news", ("World", "Sports", "Business", "Science or Technology"),
          synthetic=True),
    _task("syn_sentiment", "SC/syn_sentiment", ("positive", "negative"), synthetic=True),
    _task("syn_product", "TC/syn_product", ("Electronics", "Kitchen", "Books", "Clothing"),
          synthetic=True),
    _task("syn_rating", "SC/syn_rating", ("negative", "neutral", "positive"), synthetic=True),
    _task("syn_sentiment_flip", "SC/syn_sentiment_flip", ("positive", "negative"),
          synthetic=True),
)

TASKS: Mapping[str, Task] = {t.name: t for t in BENCHMARK_TASKS + SYNTHETIC_TASKS}

ORDERS: Mapping[int, tuple[str, ...]] = {
    1: ("dbpedia", "amazon", "yahoo", "agnews"),
    2: ("dbpedia", "amazon", "agnews", "yahoo"),
    3: ("yahoo", "amazon", "agnews", "dbpedia"),
    4: ("mnli", "cb", "wic", "copa", "qqp", "boolqa", "rte", "imdb", "yelp", "amazon", "sst-2",
        "dbpedia", "agnews", "multirc", "yahoo"),
    5: ("multirc", "boolqa", "wic", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2",
        "dbpedia", "agnews", "yelp", "amazon", "yahoo"),
    6: ("yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2", "dbpedia",
        "agnews", "yahoo", "multirc", "boolqa", "wic"),
}

# Named orders of the synthetic suite. "synthetic" is the default run's order: topic and
# sentiment tasks that share structure and that one sentence embedding can hold together.
# "synthetic_flip" appends the task that contradicts syn_sentiment (no method without a task id
# can keep both); the other two are short demonstrations.
SYNTHETIC_ORDERS: Mapping[str, tuple[str, ...]] = {
    "synthetic": ("syn_news", "syn_sentiment", "syn_product", "syn_rating"),
    "synthetic_flip": ("syn_news", "syn_sentiment", "syn_product", "syn_rating",
                       "syn_sentiment_flip"),
    "synthetic_conflict": ("syn_sentiment", "syn_sentiment_flip"),
    "synthetic_short": ("syn_news", "syn_sentiment", "syn_sentiment_flip"),
}


def get_task(name: str | Task) -> Task:
  """The registered task called `name` (a `Task` passes through).

  Raises:
    ValueError: naming the unknown task and listing the registered ones.
  """
  if isinstance(name, Task):
    return name
  try:
    return TASKS[name]
  except (KeyError, TypeError):
    raise InputError(f"unknown task {name!r}; registered tasks: {', '.join(TASKS)}") from None


def label_union(names: Sequence[str | Task]) -> tuple[str, ...]:
  """Every label of the tasks `names`, each string once, in first-seen order: the options of
  the "seen" label space (tasks sharing a label string, e.g. amazon and yelp, share it)."""
  return tuple(dict.fromkeys(label for n in names for label in get_task(n).labels))


def resolve_order(order: int | str | Sequence[str]) -> tuple[Task, ...]:
  """The tasks of an order, in training order.

  Args:
    order: a paper order 1-6 (an int or its digit string), a synthetic order name (a key of
      `SYNTHETIC_ORDERS`), a comma-separated string of task names ("dbpedia,amazon"), or a
      sequence of task names.

  Raises:
    ValueError: naming the unknown order or task and listing the valid ones.
  """
  if isinstance(order, bool):  # bool is an int; True is not an order.
    raise InputError(f"unknown order {order!r}; {_valid_orders()}")
  if isinstance(order, int):
    if order not in ORDERS:
      raise InputError(f"unknown order {order}; {_valid_orders()}")
    names: Sequence[str] = ORDERS[order]
  elif isinstance(order, str):
    text = order.strip()
    if text.isdigit():
      return resolve_order(int(text))
    if text in SYNTHETIC_ORDERS:
      names = SYNTHETIC_ORDERS[text]
    else:
      names = [n.strip() for n in text.split(",") if n.strip()]
  else:
    names = list(order)
  if not names:
    raise InputError(f"order {order!r} names no task; {_valid_orders()}")
  unknown = [n for n in names if not isinstance(n, str) or n not in TASKS]
  if unknown:
    raise InputError(f"order {order!r} names unknown task(s) {unknown}; registered tasks: "
                     f"{', '.join(TASKS)}; {_valid_orders()}")
  if len(set(names)) != len(names):
    raise InputError(f"order {order!r} names a task twice")
  return tuple(TASKS[n] for n in names)


def run_tasks(order: int | str | Sequence[str], num_tasks: int = 0) -> list[str]:
  """The task names of a run: `order`'s tasks (see `resolve_order`), the first `num_tasks`
  of them (0: all)."""
  names = [t.name for t in resolve_order(order)]
  if num_tasks > len(names):
    raise InputError(f"config.num_tasks={num_tasks} but order {order!r} has {len(names)} tasks")
  return names[:num_tasks] if num_tasks else names


def _valid_orders() -> str:
  return (f"valid orders: {', '.join(map(str, ORDERS))}, "
          f"{', '.join(SYNTHETIC_ORDERS)}, or a list of task names")
