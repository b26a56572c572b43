"""The CL_Benchmark directory loader: the shared benchmark copy, and every bad input."""

import collections
import json
import logging

import pytest

from conftest import require_shared
from lbcl_jax import tasks
from lbcl_jax.data import DataError
from lbcl_jax.errors import InputError
from lbcl_jax.data import load_split
from lbcl_jax.data import local

# Sizes of ../shared/cl_benchmark (see its PROVENANCE.md).
SHARED_SIZES = {
    "agnews": (4000, 7600),
    "dbpedia": (4200, 3400),
    "amazon": (5000, 7600),
    "yelp": (4000, 1000),
    "sst-2": (2000, 872),
}


@pytest.mark.parametrize("name", list(SHARED_SIZES))
def test_shared_benchmark_sizes_and_labels(name):
  root = require_shared("cl_benchmark")
  task = tasks.get_task(name)
  labels = json.loads((root / task.path / "labels.json").read_text(encoding="utf-8"))
  for split, size in zip(("train", "test"), SHARED_SIZES[name]):
    examples = load_split(name, split, "local", root=root)
    rows = json.loads((root / task.path / f"{split}.json").read_text(encoding="utf-8"))
    assert len(examples) == len(rows) == size
    assert {e.label for e in examples} == set(labels)
    assert collections.Counter(e.label for e in examples) == collections.Counter(
        r["label"] for r in rows)
    for e, r in zip(examples[:50], rows[:50]):
      assert (e.sentence, e.label, e.task) == (r["sentence"], r["label"], name)
      assert task.labels[e.label_index] == e.label


def test_shared_benchmark_per_class_sampling():
  root = require_shared("cl_benchmark")
  a = load_split("agnews", "train", "local", root=root, per_class=100, seed=3)
  assert collections.Counter(e.label for e in a) == {label: 100 for label in
                                                     tasks.get_task("agnews").labels}
  assert a == load_split("agnews", "train", "local", root=root, per_class=100, seed=3)
  b = load_split("agnews", "train", "local", root=root, per_class=100, seed=4)
  assert {e.sentence for e in a} != {e.sentence for e in b}
  capped = load_split("agnews", "test", "local", root=root, max_examples=123, seed=0)
  assert len(capped) == 123


def test_shared_benchmark_missing_yahoo():
  root = require_shared("cl_benchmark")
  with pytest.raises(DataError, match=r"TC/yahoo: no directory for task 'yahoo'"):
    load_split("yahoo", "train", "local", root=root)


# --------------------------------------------------------------------------------------------
# Bad inputs, in tiny fixtures.


def _write_task(root, name="sst-2", rows=None, split="train", labels=None, raw=None):
  task = tasks.get_task(name)
  d = root / task.path
  d.mkdir(parents=True, exist_ok=True)
  (d / "labels.json").write_text(json.dumps(list(labels or task.labels)), encoding="utf-8")
  path = d / f"{split}.json"
  if raw is not None:
    path.write_bytes(raw)
  else:
    path.write_text(json.dumps(rows), encoding="utf-8")
  return path


GOOD = [{"label": "Good", "sentence": "Text: a fine film . "},
        {"label": "Bad", "sentence": "Text: a dull film . "}]


def test_good_fixture_and_unknown_task(tmp_path):
  _write_task(tmp_path, rows=GOOD)
  examples = load_split("sst-2", "train", "local", root=tmp_path)
  assert [(e.label, e.label_index) for e in examples] == [("Good", 0), ("Bad", 1)]
  with pytest.raises(ValueError, match="unknown task 'sst'"):
    load_split("sst", "train", "local", root=tmp_path)
  with pytest.raises(ValueError, match="unknown data source 'disk'"):
    load_split("sst-2", "train", "disk", root=tmp_path)


def test_missing_split_file(tmp_path):
  _write_task(tmp_path, rows=GOOD, split="train")
  with pytest.raises(DataError, match=r"SST-2/test\.json: split file not found.*train\.json"):
    load_split("sst-2", "test", "local", root=tmp_path)


@pytest.mark.parametrize("row,reason", [
    ({"sentence": "Text: x"}, r"row 1: missing 'label'"),
    ({"label": "Good"}, r"row 1: missing 'sentence'"),
    ({"label": "Great", "sentence": "Text: x"}, r"row 1: label 'Great' is not in labels\.json"),
    ({"label": "Good", "sentence": "   \n"}, r"row 1: empty sentence"),
    ({"label": 1, "sentence": "Text: x"}, r"row 1: label 1 is not a string"),
    ({"label": "Good", "sentence": None}, r"row 1: sentence None is not a string"),
    (["Good", "Text: x"], r"row 1: expected an object"),
])
def test_bad_rows_name_file_and_row(tmp_path, row, reason):
  path = _write_task(tmp_path, rows=[GOOD[0], row, GOOD[1]])
  with pytest.raises(DataError, match=reason) as err:
    load_split("sst-2", "train", "local", root=tmp_path)
  assert str(path) in str(err.value)


def test_skip_invalid_counts_and_logs(tmp_path, caplog):
  path = _write_task(tmp_path, rows=[GOOD[0], {"label": "Good"}, {"sentence": "x"}, GOOD[1]])
  with caplog.at_level(logging.WARNING):
    examples, skipped = local.read_split(tmp_path, "sst-2", "train", skip_invalid=True)
  assert skipped == 2
  assert [e.sentence for e in examples] == [GOOD[0]["sentence"], GOOD[1]["sentence"]]
  assert "skipped 2 invalid row(s) of 4" in caplog.text
  assert f"{path}: row 1 skipped" in caplog.text
  assert len(load_split("sst-2", "train", "local", root=tmp_path, skip_invalid=True)) == 2


def test_undecodable_bytes_name_the_offset(tmp_path):
  raw = b'[{"label": "Good", "sentence": "ok"},\n {"label": "Bad", "sentence": "caf\xe9"}]'
  path = _write_task(tmp_path, raw=raw)
  offset = raw.index(b"\xe9")
  with pytest.raises(DataError, match=rf"not UTF-8 at byte offset {offset} \(line 2\)") as err:
    load_split("sst-2", "train", "local", root=tmp_path)
  assert str(path) in str(err.value)


def test_invalid_json_names_line_and_column(tmp_path):
  path = _write_task(tmp_path, raw=b'[{"label": "Good", "sentence": "ok"},\n {"label": "Bad",}]')
  with pytest.raises(DataError, match=r"invalid JSON at line 2 column 18") as err:
    load_split("sst-2", "train", "local", root=tmp_path)
  assert str(path) in str(err.value)
  _write_task(tmp_path, raw=b'{"label": "Good", "sentence": "ok"}')
  with pytest.raises(DataError, match="expected a JSON list of rows, got dict"):
    load_split("sst-2", "train", "local", root=tmp_path)


def test_bad_labels_file(tmp_path):
  _write_task(tmp_path, rows=GOOD, labels=["Good", "Bad", "Meh"])
  with pytest.raises(DataError, match=r"labels\.json: labels \['Good', 'Bad', 'Meh'\] differ"):
    load_split("sst-2", "train", "local", root=tmp_path)
  # Same labels, other order: accepted; indices follow the registry (the prompt's order).
  _write_task(tmp_path, rows=GOOD, labels=["Bad", "Good"])
  examples = load_split("sst-2", "train", "local", root=tmp_path)
  assert [e.label_index for e in examples] == [0, 1]
  (tmp_path / "SC/SST-2/labels.json").unlink()
  with pytest.raises(DataError, match=r"labels\.json: labels file not found"):
    load_split("sst-2", "train", "local", root=tmp_path)


def test_root_is_required():
  with pytest.raises(ValueError, match="needs root="):
    load_split("sst-2", "train", "local")


def test_validation_split_is_carved_from_train_and_fixed_across_seeds(tmp_path):
  """Validation rows come out of the train file, the same for every run seed; the per-class
  training sample is drawn from the rest; the test split is untouched."""
  from lbcl_jax.data import task_data  # pylint: disable=g-import-not-at-top
  rows = [{"label": ("Good", "Bad")[i % 2], "sentence": f"Text: review {i} . "}
          for i in range(60)]
  _write_task(tmp_path, rows=rows, split="train")
  _write_task(tmp_path, rows=GOOD, split="test")

  def load(seed, n=10):
    config = task_data.DataConfig(source="local", data_dir=str(tmp_path), train_per_class=12,
                                  seed=seed, validation_examples=n)
    return task_data.load_task_data(config, ["sst-2"], lambda ex, task: list(ex))["sst-2"]
  a, b = load(0), load(1)
  assert len(a.validation) == 10 and a.validation == b.validation
  assert collections.Counter(e.label for e in a.train_examples) == {"Good": 12, "Bad": 12}
  assert not {e.sentence for e in a.validation} & {e.sentence for e in a.train_examples}
  assert {e.sentence for e in a.train_examples} != {e.sentence for e in b.train_examples}
  assert a.test == load_split("sst-2", "test", "local", root=tmp_path)
  assert a.split("validation") is a.validation and a.split("test") is a.test
  with pytest.raises(InputError, match="validation_examples=60"):
    load(0, n=60)
