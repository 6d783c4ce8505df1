"""The scorer's token cache: assembled ids always equal tokenizing the filled sentence."""

import random

import pytest

from lmbbo_jax import templates as templates_lib
from lmbbo_jax.evaluator.tokens import TokenCache, _clip_boundary
from lmbbo_jax.models.tokenizer import ClipBPETokenizer

from evaluator_helpers import CLASS_NAMES, TEMPLATES, WordTokenizer, toy_bpe_tokenizer

AWKWARD = CLASS_NAMES + [
    "Mr. Potato", "t-shirt.", "rock'n'roll", "don't", "'s", "s", "7", "R2-D2", "x&y",
    "&amp;", "naïve café", " padded ", "under_score", "Ünïcode", "日本語", "!!!", "",
    "'t", "abc's", "123",
]
TRICKY = TEMPLATES + [
    "{}'s photo", "a photo of {}'s", "'{}'", "{}.", ".{}.", "{}!{}", "{}7", "7{}",
    "R{}2", "the {}&amp; co", "it'{} fine", "a__{}__b", "{}-like", "({})", "{} {}",
    "  {}  ", "a photo of a {}...", "{}'S", "nr.{}", "café {}",
]


def _check_all(tokenizer, names, templates):
  cache = TokenCache(tokenizer, names)
  for t in templates:
    got = cache.sentences(t)
    want = tokenizer.encode_batch([templates_lib.fill(t, n) for n in names])
    assert got == want, t
  return cache


@pytest.fixture(scope="module")
def clip_bpe():
  return ClipBPETokenizer.from_bpe_file()


def test_clip_bpe_assembled_ids_equal_whole_sentences(clip_bpe):
  cache = _check_all(clip_bpe, AWKWARD, TRICKY)
  assert cache.assemble, "CLIP's BPE splits on whitespace: assembly must stay on"
  # Most plain sentences come from the cache, the merging ones from whole sentences.
  assert cache.stats["assembled"] > cache.stats["whole"] > 0


def test_word_tokenizer_merges_across_slot_boundaries():
  tok = WordTokenizer()
  # The test tokenizer really merges across the slot: "dogs" != "dog" + "s".
  assert tok.encode_batch(["dogs"])[0] != tok.encode_batch(["dog"])[0] + tok.encode_batch(["s"])[0]
  _check_all(tok, AWKWARD, TRICKY)


def test_random_templates_and_names_fuzz(clip_bpe):
  rng = random.Random(0)
  alphabet = "ab s'.7-_,!xyz "

  def text(n):
    return "".join(rng.choice(alphabet) for _ in range(n))

  names = [text(rng.randint(0, 6)) for _ in range(40)]
  temps = [text(rng.randint(0, 5)) + "{}" + text(rng.randint(0, 5))
           + ("{}" + text(rng.randint(0, 3)) if rng.random() < 0.3 else "")
           for _ in range(60)]
  for tokenizer in (clip_bpe, WordTokenizer()):
    _check_all(tokenizer, names, temps)


def test_byte_level_bpe_falls_back_to_whole_sentences():
  tok = toy_bpe_tokenizer()
  cache = _check_all(tok, CLASS_NAMES, TRICKY)
  # Spaces glue to the next word there, so assembling pieces would be wrong.
  assert not cache.assemble
  assert cache.stats["assembled"] == 0


def test_guard_switches_assembly_off_on_a_lying_tokenizer():
  class Lying(WordTokenizer):
    """Claims CLIP boundaries but merges 'photo' + name into one token."""

    def encode_batch(self, texts):
      return [[7] if "photo dog" in t.lower() else ids
              for t, ids in zip(texts, super().encode_batch(texts))]

  tok = Lying()
  cache = TokenCache(tok, ["dog"])
  assert cache.assemble
  got = cache.sentences("a photo {}")
  assert got == tok.encode_batch(["a photo dog"])
  assert not cache.assemble


@pytest.mark.parametrize("a,b,ok", [
    ("a", " ", True), ("a", ".", True), ("a", "b", False), ("7", "7", True),
    ("7", "a", True), (".", ",", False), ("'", "s", False), ("'", "S", False),
    ("'", "x", True), ("a", "'", True),
])
def test_clip_boundary_rule(a, b, ok):
  assert _clip_boundary(a, b) is ok
