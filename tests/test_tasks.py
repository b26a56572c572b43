"""The task registry against the lists of the LB-CL / O-LoRA papers, written out literally."""

import pytest

from lbcl_jax import tasks

EXPECTED_TASKS = {
    # name: (CL_Benchmark path, labels as in O-LoRA's labels.json)
    "agnews": ("TC/agnews", ("World", "Sports", "Business", "Science or Technology")),
    "amazon": ("SC/amazon", ("very negative", "negative", "neutral", "positive",
                             "very positive")),
    "yelp": ("SC/yelp", ("very negative", "negative", "neutral", "positive", "very positive")),
    "dbpedia": ("TC/dbpedia", ("Company", "Educational Institution", "Artist", "Athlete",
                               "Office Holder", "Mean of Transportation", "Building",
                               "Natural Place", "Village", "Animal", "Plant", "Album", "Film",
                               "Written Work")),
    "yahoo": ("TC/yahoo", ("Society & Culture", "Science & Mathematics", "Health",
                           "Education & Reference", "Computers & Internet", "Sports",
                           "Business & Finance", "Entertainment & Music",
                           "Family & Relationships", "Politics & Government")),
    "mnli": ("NLI/MNLI", ("neutral", "entailment", "contradiction")),
    "cb": ("NLI/CB", ("entailment", "contradiction", "neutral")),
    "wic": ("WiC/WiC", ("True", "False")),
    "copa": ("COPA/COPA", ("A", "B")),
    "qqp": ("QQP/QQP", ("True", "False")),
    "boolqa": ("BoolQA/BoolQA", ("True", "False")),
    "rte": ("NLI/RTE", ("contradiction", "entailment")),
    "imdb": ("SC/IMDB", ("Good", "Bad")),
    "sst-2": ("SC/SST-2", ("Good", "Bad")),
    "multirc": ("MultiRC/MultiRC", ("False", "True")),
}

EXPECTED_ORDERS = {
    1: ["dbpedia", "amazon", "yahoo", "agnews"],
    2: ["dbpedia", "amazon", "agnews", "yahoo"],
    3: ["yahoo", "amazon", "agnews", "dbpedia"],
    4: ["mnli", "cb", "wic", "copa", "qqp", "boolqa", "rte", "imdb", "yelp", "amazon", "sst-2",
        "dbpedia", "agnews", "multirc", "yahoo"],
    5: ["multirc", "boolqa", "wic", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2",
        "dbpedia", "agnews", "yelp", "amazon", "yahoo"],
    6: ["yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2", "dbpedia",
        "agnews", "yahoo", "multirc", "boolqa", "wic"],
}


def test_benchmark_tasks_labels_and_paths():
  assert [t.name for t in tasks.BENCHMARK_TASKS] == list(EXPECTED_TASKS)
  for name, (path, labels) in EXPECTED_TASKS.items():
    task = tasks.get_task(name)
    assert task.path == path, name
    assert task.labels == labels, name
    assert task.category == path.split("/")[0]
    assert task.dataset == path.split("/")[1]
    assert not task.synthetic


def test_categories():
  categories = {t.name: t.category for t in tasks.BENCHMARK_TASKS}
  assert categories == {
      "agnews": "TC", "amazon": "SC", "yelp": "SC", "dbpedia": "TC", "yahoo": "TC",
      "mnli": "NLI", "cb": "NLI", "wic": "WiC", "copa": "COPA", "qqp": "QQP",
      "boolqa": "BoolQA", "rte": "NLI", "imdb": "SC", "sst-2": "SC", "multirc": "MultiRC"}


def test_orders_equal_the_papers():
  assert set(tasks.ORDERS) == set(EXPECTED_ORDERS)
  for k, names in EXPECTED_ORDERS.items():
    assert list(tasks.ORDERS[k]) == names
    assert [t.name for t in tasks.resolve_order(k)] == names
    assert [t.name for t in tasks.resolve_order(str(k))] == names
  for k in (4, 5, 6):
    assert sorted(EXPECTED_ORDERS[k]) == sorted(EXPECTED_TASKS)


def test_prompt_matches_olora_exactly():
  # O-LoRA: "Task:" + task + "\n" + "Dataset:" + dataset + "\n" + instruction + "Option: " +
  # ", ".join(labels) + " \n" + sentence + "\nAnswer:"
  assert tasks.get_task("agnews").prompt("Title: t\nText: x\n") == (
      "Task:TC\nDataset:agnews\nWhat is the topic of the following paragraph? Choose one from "
      "the option.\nOption: World, Sports, Business, Science or Technology \nTitle: t\nText: x\n"
      "\nAnswer:")
  assert tasks.get_task("sst-2").prompt("Text: fine . ") == (
      "Task:SC\nDataset:SST-2\nWhat is the sentiment of the following paragraph? Choose one "
      "from the option.\nOption: Good, Bad \nText: fine . \nAnswer:")
  assert tasks.get_task("mnli").prompt("s") == (
      'Task:NLI\nDataset:MNLI\nWhat is the logical relationship between the "sentence 1" and '
      'the "sentence 2"? Choose one from the option.\nOption: neutral, entailment, '
      "contradiction \ns\nAnswer:")
  # COPA has no instruction and no options: its sentence asks the question.
  assert tasks.get_task("copa").prompt("Which sentence is the cause of \"x\"?") == (
      "Task:COPA\nDataset:COPA\nWhich sentence is the cause of \"x\"?\nAnswer:")


def test_label_index():
  task = tasks.get_task("mnli")
  assert task.label_index("entailment") == 1
  with pytest.raises(ValueError, match="not a label of task 'mnli'"):
    task.label_index("yes")


def test_unknown_task_and_order_name_the_valid_ones():
  with pytest.raises(ValueError, match=r"unknown task 'agnew'.*agnews"):
    tasks.get_task("agnew")
  with pytest.raises(ValueError, match=r"unknown order 7; valid orders: 1, 2, 3, 4, 5, 6"):
    tasks.resolve_order(7)
  with pytest.raises(ValueError, match=r"unknown task\(s\) \['sst2'\].*sst-2"):
    tasks.resolve_order(["agnews", "sst2"])
  with pytest.raises(ValueError, match="twice"):
    tasks.resolve_order("agnews,agnews")
  with pytest.raises(ValueError, match="names no task"):
    tasks.resolve_order([])


def test_custom_and_synthetic_orders():
  assert [t.name for t in tasks.resolve_order(["sst-2", "imdb"])] == ["sst-2", "imdb"]
  assert [t.name for t in tasks.resolve_order(" dbpedia, amazon ")] == ["dbpedia", "amazon"]
  synthetic = tasks.resolve_order("synthetic")
  assert [t.name for t in synthetic] == list(tasks.SYNTHETIC_ORDERS["synthetic"])
  assert all(t.synthetic for t in synthetic)
  for name in ("syn_news", "syn_sentiment", "syn_product", "syn_rating", "syn_sentiment_flip"):
    assert tasks.get_task(name).name == name
  # The conflicting pair shares its label strings.
  assert tasks.get_task("syn_sentiment").labels == tasks.get_task("syn_sentiment_flip").labels
