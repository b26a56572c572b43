"""The real T5 SentencePiece vocabulary through `load_tokenizer`."""

import pytest

from conftest import require_shared
from lbcl_jax.models import hf
from lbcl_jax.models import load_tokenizer

pytest.importorskip("transformers")

TEXT = "translate English to German: The house is wonderful."
IDS = [13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5, 1]


def test_spiece_only_directory():
  """A directory holding only spiece.model loads as T5Tokenizer (AutoTokenizer cannot)."""
  path = require_shared("t5_tokenizer", "spiece")
  tokenizer = load_tokenizer(path)
  assert type(tokenizer).__name__.startswith("T5Tokenizer")
  assert tokenizer(TEXT).input_ids == IDS
  assert len(tokenizer) == 32100  # 32,000 pieces + 100 sentinels.
  assert tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
  assert tokenizer.decode(IDS, skip_special_tokens=True) == TEXT


def test_flan_t5_small_directory_via_auto_tokenizer():
  path = require_shared("t5_tokenizer", "flan-t5-small")
  tokenizer = load_tokenizer(str(path))
  assert tokenizer(TEXT).input_ids == IDS
  batch = tokenizer([TEXT, "The house"], padding=True)
  assert batch.input_ids[1] == [37, 629, 1] + [0] * (len(IDS) - 3)
  assert batch.attention_mask[1] == [1, 1, 1] + [0] * (len(IDS) - 3)


def test_missing_tokenizer_directory(tmp_path):
  with pytest.raises(hf.CheckpointNotFoundError, match="nope"):
    load_tokenizer(tmp_path / "nope")
