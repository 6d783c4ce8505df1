"""CLIP BPE tokenizer: ids equal OpenAI's SimpleTokenizer; files, config entries, overflow."""

import json
import os

import numpy as np
import pytest

import models_helpers as helpers
from lmbbo_jax.models import CLIP, ContextOverflowError, TokenizerError
from lmbbo_jax.models.configs import ARCHITECTURES
from lmbbo_jax.models.tokenizer import (
    ClipBPETokenizer, default_bpe_path, tokenizer_from_config, vocab_and_merges_from_bpe)

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL_CASES = [
    "a photo of a {}.", "A PHOTO of the   dog!!", "it's a dog's life, we'll see, I'd go",
    "tab\tand\nnew line", "  leading and trailing  ", "", "café crème brûlée", "naïve Zoë",
    "curly ‘quotes’ and “double” quotes", "ligature ﬁsh", "fullwidth ＡＢＣ１２３", "emoji 🐶🐱🚀",
    "日本語のテキスト", "русский текст", "digits 1234567 and 3.14", "html &amp; entities &lt;b&gt;",
    "double &amp;amp; escaped", "<|startoftext|>inline specials<|endoftext|>", "x" * 120,
    "a-b_c/d\\e", "don't stop", "mixed CASE Über", "\u00a0non-breaking\u2009thin space",
]


@pytest.fixture(scope="module")
def tok():
  return ClipBPETokenizer.from_bpe_file()


def _sample_texts() -> list[str]:
  """Templates x class names from the shipped CoOp lists (a strided sample) plus hard cases."""
  with open(os.path.join(_REPO, "third_party", "coop_classnames", "classnames.json")) as f:
    names = json.load(f)
  with open(os.path.join(_REPO, "third_party", "openai_clip_templates", "templates.json")) as f:
    templates = json.load(f)
  texts = list(SPECIAL_CASES)
  for key in sorted(names):
    for j, name in enumerate(names[key][::3]):
      pool = templates.get(key) or templates["imagenet"]
      texts.append(pool[j % len(pool)].replace("{}", name))
  return texts


def test_ids_equal_openai_simple_tokenizer(tok):
  reference = helpers.openai_simple_tokenizer()
  texts = _sample_texts()
  assert len(texts) > 700
  ours = tok.encode_batch(texts)
  mismatches = [(t, a, reference.encode(t)) for t, a in zip(texts, ours)
                if a != reference.encode(t)]
  assert not mismatches, mismatches[:3]
  # Known ids pin the vocabulary itself, not only agreement with the reference.
  assert tok.encode("a photo of a dog.") == [320, 1125, 539, 320, 1929, 269]
  assert (tok.sot_token_id, tok.eot_token_id, tok.pad_token_id, tok.vocab_size) == (
      49406, 49407, 0, 49408)


def test_vocabulary_conversion_follows_openai(tok):
  vocab, merges = vocab_and_merges_from_bpe(default_bpe_path())
  assert len(merges) == 48894 and len(vocab) == 49408
  assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
  assert vocab["a</w>"] == 256 + ord("a") - ord("!")  # Byte symbols with </w> follow the 256.
  assert vocab["".join(merges[0])] == 512


def test_hf_files_give_the_same_ids(tok, tmp_path):
  texts = SPECIAL_CASES + ["a photo of a golden retriever."]
  expected = tok.encode_batch(texts)
  # tokenizer.json, as a Hugging Face CLIP repo ships it.
  tok.save(str(tmp_path / "tokenizer.json"))
  from_json = ClipBPETokenizer.from_directory(str(tmp_path))
  assert from_json.encode_batch(texts) == expected
  # vocab.json + merges.txt (the `vocab=`/`merges=` keywords must really be used).
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  vocab, merges = vocab_and_merges_from_bpe(default_bpe_path())
  (legacy / "vocab.json").write_text(json.dumps(vocab))
  (legacy / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
  from_files = tokenizer_from_config(
      {"kind": "clip_bpe", "vocab": "vocab.json", "merges": "merges.txt"}, str(legacy))
  assert from_files.encode_batch(texts) == expected


def test_tokenizer_config_entries(tmp_path, tok):
  assert tokenizer_from_config(None, str(tmp_path)).encode("a dog") == tok.encode("a dog")
  assert tokenizer_from_config({"kind": "clip_bpe"}, str(tmp_path)).vocab_size == 49408
  with pytest.raises(TokenizerError, match="unknown tokenizer kind 'sentencepiece'"):
    tokenizer_from_config({"kind": "sentencepiece"}, str(tmp_path))
  with pytest.raises(TokenizerError, match="must be a file name inside"):
    tokenizer_from_config({"kind": "clip_bpe", "file": "../tokenizer.json"}, str(tmp_path))
  with pytest.raises(TokenizerError, match="cannot read tokenizer file"):
    tokenizer_from_config({"kind": "clip_bpe", "file": "tokenizer.json"}, str(tmp_path))
  with pytest.raises(TokenizerError, match="no tokenizer.json"):
    ClipBPETokenizer.from_directory(str(tmp_path))


def test_toy_tokenizer_entry(tmp_path):
  from lmbbo_jax.toyworld.tokenizer import ToyTokenizer, train_tokenizer
  captions = ["a red circle on a dark background", "two blue stars", "a small green ring"] * 20
  ToyTokenizer(train_tokenizer(captions, vocab_size=300)).save(str(tmp_path / "tok.json"))
  toy = tokenizer_from_config({"kind": "toy", "file": "tok.json"}, str(tmp_path),
                              context_length=24)
  assert isinstance(toy, ToyTokenizer) and toy.context_length == 24
  ids = toy.encode_batch(["a red circle"])[0]
  assert ids and all(i not in (toy.sot_token_id, toy.eot_token_id) for i in ids)


def test_overflow_is_reported_never_truncated(tok):
  clip = CLIP(ARCHITECTURES["tiny-vit"], None, tok)  # Tokenising needs no weights.
  fits = "word " * 75  # 75 tokens + start + end = 77.
  ids = clip.tokenize(["a photo of a dog.", fits])
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  assert ids[1, 76] == 49407 and ids[0, 7] == 49407 and ids[0, 8] == 0
  with pytest.raises(ContextOverflowError, match=r"#1 has 78 tokens") as info:
    clip.tokenize(["short", fits + "word"])
  assert info.value.overflows == [(1, fits + "word", 78)]
