"""`config.data.invalid_rows`: a row a task's file cannot use stops the run, or is skipped and
counted, without changing which of the other rows a run samples."""

import json

import ml_collections
import pytest

from conftest import require_shared
from lbcl_jax import config_lib
from lbcl_jax import tasks
from lbcl_jax.data import DataError
from lbcl_jax.data import InvalidRowError
from lbcl_jax.data import load_split
from lbcl_jax.data import load_split_counted
from lbcl_jax.data import task_data
from lbcl_jax.errors import InputError

MNLI = tasks.get_task("mnli")
BAD = {"label": "-", "sentence": "Premise: a man sleeps. Hypothesis: nobody sleeps."}


def _rows(n, tag):
  """`n` valid MNLI rows, the labels in turn, each sentence unique."""
  return [{"label": MNLI.labels[i % 3], "sentence": f"Premise: {tag} {i}. Hypothesis: h {i}."}
          for i in range(n)]


def _write(root, train, test):
  """A CL_Benchmark directory holding MNLI's labels.json, train.json and test.json."""
  d = root / MNLI.path
  d.mkdir(parents=True, exist_ok=True)
  (d / "labels.json").write_text(json.dumps(list(MNLI.labels)), encoding="utf-8")
  for split, rows in (("train", train), ("test", test)):
    (d / f"{split}.json").write_text(json.dumps(rows), encoding="utf-8")
  return d


def _with_bad(rows, positions):
  """`rows` with a "-" row inserted before each of `positions` (indices into the result)."""
  out = list(rows)
  for p in sorted(positions):
    out.insert(p, BAD)
  return out


def _load(root, **kwargs):
  config = task_data.DataConfig(source="local", data_dir=str(root), **kwargs)
  return task_data.load_task_data(config, ["mnli"], lambda ex, task: list(ex))["mnli"]


@pytest.fixture
def dirs(tmp_path):
  """(a directory whose files hold "-" rows, the same directory without them)."""
  train, test = _rows(60, "train"), _rows(12, "test")
  _write(tmp_path / "clean", train, test)
  # Bad rows early in the files, so every later row's index shifts when they are dropped.
  _write(tmp_path / "dirty", _with_bad(train, [0, 3, 4]), _with_bad(test, [2]))
  return tmp_path / "dirty", tmp_path / "clean"


def test_error_names_file_row_and_option(dirs):
  dirty, _ = dirs
  with pytest.raises(DataError) as err:
    _load(dirty, invalid_rows="error")
  message = str(err.value)
  # The train split is read first: its first bad row is row 0.
  assert message.startswith(f"{dirty / MNLI.path / 'train.json'}: row 0: label '-' is not in "
                            "labels.json")
  assert "--config.data.invalid_rows=skip skips such rows" in message
  assert "\n" not in message
  # The default is "error", and the test split's row is named the same way.
  _write(dirty, _rows(6, "train"), _with_bad(_rows(12, "test"), [2]))
  with pytest.raises(InvalidRowError, match=r"test\.json: row 2: label '-' .*invalid_rows=skip") \
      as err:
    _load(dirty)
  assert str(dirty / MNLI.path / "test.json") in str(err.value)


def test_library_reader_keeps_its_own_message(dirs):
  """Outside a run the reader has no config: its message names the file and row, no option."""
  dirty, _ = dirs
  with pytest.raises(InvalidRowError) as err:
    load_split("mnli", "test", "local", root=dirty)
  assert str(err.value) == (f"{dirty / MNLI.path / 'test.json'}: row 2: label '-' is not in "
                            f"labels.json {list(MNLI.labels)}")


def test_skip_drops_exactly_the_bad_rows_and_counts_them(dirs):
  dirty, clean = dirs
  data = _load(dirty, invalid_rows="skip")
  assert data.skipped_rows == {"train": 3, "test": 1}
  reference = _load(clean)
  assert reference.skipped_rows == {"train": 0, "test": 0}
  assert len(data.test) == 12 and data.test == reference.test
  assert data.train_examples == reference.train_examples
  assert all(e.label != "-" for e in data.train_examples + data.test)


@pytest.mark.parametrize("validation_examples", [0, 6])
def test_skip_samples_what_a_file_without_the_bad_rows_gives(dirs, validation_examples):
  """Counted before sampling; the seeded sample (and the validation carving) see only the valid
  rows, so a run on the fixed file and a run skipping the bad rows train on the same examples."""
  dirty, clean = dirs
  opts = dict(train_per_class=5, max_test_examples=7, seed=3,
              validation_examples=validation_examples)
  data = _load(dirty, invalid_rows="skip", **opts)
  reference = _load(clean, **opts)
  assert len(data.train_examples) == 15 and len(data.test) == 7
  assert data.train_examples == reference.train_examples
  assert data.test == reference.test
  assert data.validation == reference.validation
  # Counts are the files', not the sample's.
  assert data.skipped_rows == {"train": 3, "test": 1}
  # The sample is a real draw (another seed picks other rows), so equality above is not trivial.
  other = _load(clean, **{**opts, "seed": 4})
  assert other.train_examples != reference.train_examples


def test_load_split_counted(dirs):
  dirty, clean = dirs
  examples, skipped = load_split_counted("mnli", "train", "local", root=dirty, skip_invalid=True,
                                         per_class=4, seed=1)
  assert skipped == 3
  assert examples == load_split("mnli", "train", "local", root=clean, per_class=4, seed=1)
  assert load_split_counted("mnli", "train", "local", root=clean) == (
      load_split("mnli", "train", "local", root=clean), 0)


def test_file_level_faults_raise_with_skip(tmp_path):
  d = _write(tmp_path, _rows(6, "train"), _rows(6, "test"))
  (d / "test.json").write_text('[{"label": "neutral", "sentence": "x"},', encoding="utf-8")
  with pytest.raises(DataError, match=r"test\.json: invalid JSON") as err:
    _load(tmp_path, invalid_rows="skip")
  assert not isinstance(err.value, InvalidRowError)
  assert "invalid_rows" not in str(err.value)
  (d / "test.json").write_text('{"label": "neutral", "sentence": "x"}', encoding="utf-8")
  with pytest.raises(DataError, match="expected a JSON list of rows"):
    _load(tmp_path, invalid_rows="skip")
  (d / "test.json").unlink()
  with pytest.raises(DataError, match=r"test\.json: split file not found"):
    _load(tmp_path, invalid_rows="skip")


@pytest.mark.parametrize("source", ["hf", "tfds", "synthetic"])
def test_other_sources_are_not_given_the_local_option(source):
  """hf/tfds/synthetic loaders take no `skip_invalid`: "skip" must not reach them."""
  config = task_data.DataConfig(source=source, train_per_class=8, max_test_examples=5,
                                invalid_rows="skip")
  for split in ("train", "test"):
    assert "skip_invalid" not in config.source_options(split)
    assert config.source_options(split) == task_data.DataConfig(
        source=source, train_per_class=8, max_test_examples=5).source_options(split)


def test_synthetic_source_loads_with_skip():
  config = task_data.DataConfig(source="synthetic", train_per_class=4, max_test_examples=6,
                                invalid_rows="skip")
  data = task_data.load_task_data(config, ["syn_news"], lambda ex, task: list(ex))["syn_news"]
  assert data.skipped_rows == {"train": 0, "test": 0}
  assert len(data.test) == 6 and data.train_examples


def test_from_config_reads_the_field_and_old_configs_default_to_error(tmp_path):
  config = config_lib.base_config()
  config.data.data_dir = str(tmp_path)
  assert task_data.DataConfig.from_config(config).invalid_rows == "error"
  config.data.invalid_rows = "skip"
  assert task_data.DataConfig.from_config(config).invalid_rows == "skip"
  old = ml_collections.ConfigDict({"seed": 0, "data": {
      "source": "local", "data_dir": str(tmp_path), "train_per_class": 0,
      "max_test_examples": 0, "train_padding": "task", "validation_examples": 0}})
  assert task_data.DataConfig.from_config(old).invalid_rows == "error"
  with pytest.raises(InputError, match="invalid_rows='Skip'"):
    task_data.DataConfig(source="local", invalid_rows="Skip")
  # The run config is refused before any work, naming the field.
  config.data.invalid_rows = "drop"
  with pytest.raises(InputError, match="config.data.invalid_rows='drop'"):
    config_lib.validate(config)


def test_shared_mnli_test_split():
  """The published MNLI test file: 131 of its 7,600 rows are labelled "-" (row 76 the first)."""
  root = require_shared("cl_benchmark", "NLI", "MNLI").parents[1]
  path = root / MNLI.path / "test.json"
  with pytest.raises(InvalidRowError, match=r"row 76: label '-' .*invalid_rows=skip") as err:
    _load(root)
  assert str(path) in str(err.value)
  data = _load(root, invalid_rows="skip")
  assert data.skipped_rows == {"train": 0, "test": 131}
  assert len(data.test) == 7600 - 131
  rows = json.loads(path.read_text(encoding="utf-8"))
  assert [e.sentence for e in data.test] == [r["sentence"] for r in rows if r["label"] != "-"]


def test_the_driver_counts_skipped_rows_in_results_and_report(tmp_path, dirs):
  """End to end: `main` on the directory with "-" rows stops with one line naming the option;
  with invalid_rows=skip it runs, and results.json and report.md count the rows skipped."""
  import driver_utils as du  # pylint: disable=g-import-not-at-top
  dirty, _ = dirs
  args = [*du.tiny_bert(tmp_path), "--config.data.source=local", f"--config.data.data_dir={dirty}",
          "--config.order=mnli", "--config.optim.max_steps_per_task=1",
          "--config.optim.global_batch_size=4", "--config.eval.batch_size=4",
          "--config.data.max_source_length=32", "--config.plots=False"]
  proc = du.run_main(tmp_path / "error", *args, check=False)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert "train.json: row 0" in last and "--config.data.invalid_rows=skip" in last
  assert not (tmp_path / "error" / "results.json").exists()
  du.run_main(tmp_path / "skip", *args, "--config.data.invalid_rows=skip")
  results = json.loads((tmp_path / "skip" / "results.json").read_text())
  assert results["skipped_rows"] == {"mnli": {"train": 3, "test": 1}}
  assert "mnli train 3, test 1" in (tmp_path / "skip" / "report.md").read_text()
