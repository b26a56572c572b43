"""A small T5-style tokenizer built at test time, so the T5 driver tests need nothing downloaded.

flan-t5's real tokenizer lives in the read-only shared/ folder, which a user's clone lacks; the
tiny random T5 of the driver tests does not need its 32k pieces anyway. This one is a Unigram
model (the model type of T5's SentencePiece) over:

* T5's special ids: `<pad>` = 0, `</s>` = 1 (appended after every sequence by the
  post-processor, as T5's), `<unk>` = 2;
* every word and punctuation mark of the synthetic suite's prompts and labels, as whole pieces
  (so labels such as "Science or Technology" are a few tokens and train quickly);
* every printable ASCII character, with and without the word-start marker, so any other ASCII
  text still tokenises without `<unk>`.

Whitespace is collapsed and words are marked with SentencePiece's "▁" (Metaspace), and the
Metaspace decoder turns the marks back into spaces: decoding reproduces the text up to spacing
around punctuation. The vocabulary depends only on the synthetic suite (seeded), so the files
are the same on every call.
"""

from __future__ import annotations

import functools
import json
import pathlib

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPACE = "\u2581"  # SentencePiece's word-start mark
# Viterbi picks the fewest pieces: a whole word beats any spelling of it in characters.
_WORD_SCORE, _CHAR_SCORE = -1.0, -10.0


def _corpus() -> list[str]:
  """Every prompt and label of the synthetic suite at its default sizes (train and test)."""
  from lbcl_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from lbcl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  texts = []
  for task in tasks_lib.SYNTHETIC_TASKS:
    texts.extend(task.labels)
    for split in ("train", "test"):
      texts.extend(task.prompt(e.sentence) for e in synthetic.load(task, split))
  return texts


def _skeleton():
  """The tokenizer without its model: normaliser, pre-tokeniser, post-processor, decoder."""
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top,g-multiple-import
  tok = Tokenizer(models.Unigram([(PAD, 0.0), (EOS, 0.0), (UNK, 0.0)], unk_id=2))
  # T5's SentencePiece folds newlines and runs of spaces into one space.
  tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "),
                                         normalizers.Strip()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always"),
      # Punctuation apart, so "World," in the options line holds the label's own token.
      pre_tokenizers.Punctuation(behavior="isolated"),
  ])
  tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always")
  tok.post_processor = processors.TemplateProcessing(
      single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 1)])
  return tok


def build():
  """The tokenizer (a `tokenizers.Tokenizer`); deterministic."""
  from tokenizers import AddedToken, Tokenizer, models  # pylint: disable=g-import-not-at-top,g-multiple-import
  skeleton = _skeleton()
  words = set()
  for text in _corpus():
    normalized = skeleton.normalizer.normalize_str(text)
    words.update(w for w, _ in skeleton.pre_tokenizer.pre_tokenize_str(normalized))
  chars = [chr(c) for c in range(33, 127)]
  pieces = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), (SPACE, _CHAR_SCORE)]
  pieces += [(p, _CHAR_SCORE) for c in chars for p in (c, SPACE + c)]
  seen = {p for p, _ in pieces}
  pieces += [(w, _WORD_SCORE) for w in sorted(words) if w not in seen]
  data = json.loads(skeleton.to_str())
  data["model"] = json.loads(Tokenizer(models.Unigram(pieces, unk_id=2)).to_str())["model"]
  tok = Tokenizer.from_str(json.dumps(data))
  # Registered as special (ids 0-2 already), so decoding with skip_special_tokens drops them.
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t in (PAD, EOS, UNK)])
  return tok


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> tuple[str, int]:
  """`build()` serialised once per process: several tests write the same files."""
  tok = build()
  return tok.to_str(pretty=True), tok.get_vocab_size()


def save(directory: str | pathlib.Path) -> int:
  """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json; the vocab size.

  `tokenizer_class` names the generic fast tokenizer: a T5 class would add 100 `<extra_id_*>`
  sentinels the tiny model has no rows for.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  text, vocab_size = _tokenizer_json()
  (directory / "tokenizer.json").write_text(text)
  special = {"pad_token": PAD, "eos_token": EOS, "unk_token": UNK}
  (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, **special},
      indent=2))
  return vocab_size
