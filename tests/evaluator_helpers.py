"""Shared helpers for tests/test_evaluator_*.py: small CLIPs, tokenizers, reference scoring."""

from __future__ import annotations

import functools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from lmbbo_jax import templates as templates_lib
from lmbbo_jax.models.api import CLIP
from lmbbo_jax.models.clip import CLIPModel, abstract_variables
from lmbbo_jax.models.configs import ARCHITECTURES, TextConfig

# CLIP's pre-tokenization pattern, with ASCII classes (enough for these tests).
_PAT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")

CLASS_NAMES = ["dog", "cat", "golden retriever", "sea lion", "airplane", "t-shirt",
               "café au lait", "brace {} x", "Zebra's hat", "x"]

TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of the {}, a type of animal.",
    "An image of a {} with a blurred background that emphasizes the subject",
    "{}",
    "{} in the wild.",
    "a{} thing",       # the name merges with the piece before it
    "many {}s.",       # ... and with the piece after it
    "{}{}",            # two names touching
    "itap of my {}!",
    "a photo of a {} and another {}.",
]


class WordTokenizer:
  """A CLIP-like tokenizer: lower-case, whitespace-clean, CLIP's word pattern.

  Words longer than four characters split into four-character pieces, so the
  ids of "dogs" differ from "dog" + "s" (merges across a `{}` boundary are real).
  Ids are stable hashes; start/end/pad ids match CLIP's config.
  """
  sot_token_id = 49406
  eot_token_id = 49407
  pad_token_id = 0
  vocab_size = 49408
  boundary_rule = "clip"  # the scorer may assemble ids at CLIP's pre-token boundaries

  def _word(self, word: str) -> list[int]:
    return [zlib.crc32(word[i:i + 4].encode()) % 49000 + 1 for i in range(0, len(word), 4)]

  def encode_batch(self, texts):
    out = []
    for text in texts:
      text = re.sub(r"\s+", " ", text).strip().lower()
      out.append([i for w in _PAT.findall(text) for i in self._word(w)])
    return out


def toy_bpe_tokenizer():
  """The toy world's byte-level BPE (spaces glue to the next word), trained on a few lines."""
  from lmbbo_jax.toyworld.tokenizer import ToyTokenizer, train_tokenizer
  lines = [templates_lib.fill(t, n) for t in TEMPLATES for n in CLASS_NAMES] * 3
  return ToyTokenizer(train_tokenizer(lines, vocab_size=300), context_length=77)


def small_config(layers: int = 2, width: int = 32):
  base = ARCHITECTURES["tiny-vit"]
  return base.replace(text=TextConfig(width=width, layers=layers, heads=4), name="test-tiny")


@functools.lru_cache(maxsize=4)
def _variables(config, seed: int):
  """Random variables of `config`'s shapes, without compiling `init` (seconds saved per file)."""
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    name = jax.tree_util.keystr(path)
    if name.endswith("['logit_scale']"):
      return np.asarray(np.log(1 / 0.07), np.float32)
    if name.endswith("['scale']"):
      return (1 + 0.1 * rng.normal(size=shape.shape)).astype(np.float32)
    if name.endswith("['bias']"):
      return (0.02 * rng.normal(size=shape.shape)).astype(np.float32)
    std = 0.02 if "embed" in name else shape.shape[-2] ** -0.5
    return (std * rng.normal(size=shape.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract_variables(config))


def make_clip(tokenizer=None, seed: int = 0, config=None) -> CLIP:
  """A tiny random CLIP with the given tokenizer (default: WordTokenizer)."""
  tokenizer = tokenizer or WordTokenizer()
  config = config or small_config()
  config = config.replace(sot_token_id=tokenizer.sot_token_id,
                          eot_token_id=tokenizer.eot_token_id,
                          pad_token_id=tokenizer.pad_token_id)
  variables = _variables(config, seed)
  return CLIP(config, variables, tokenizer, source="test", weights_hash=f"test-{seed}")


@functools.lru_cache(maxsize=None)
def _plain_encode(model: CLIPModel):
  return jax.jit(lambda v, ids, eot: model.apply(v, ids, eot, method=CLIPModel.encode_text))


def plain_features(clip: CLIP, template: str, class_names) -> np.ndarray:
  """Normalised text features from the plain 77-token encode (no prefix sharing)."""
  ids = clip.tokenize([templates_lib.fill(template, n) for n in class_names])
  eot = clip.eot_index(ids)
  out = _plain_encode(CLIPModel(clip.config))(clip.variables, jnp.asarray(ids),
                                              jnp.asarray(eot))
  out = np.asarray(out, np.float64)
  return out / np.linalg.norm(out, axis=-1, keepdims=True)


def random_images(num_classes: int, per_class: int, dim: int, seed: int = 0,
                  text: np.ndarray | None = None):
  """Normalised image features and labels; near `text` rows when given (a learnable task)."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  feats = rng.normal(size=(len(labels), dim))
  if text is not None:
    feats = 0.6 * feats / np.sqrt(dim) + text[labels]
  feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
  return feats.astype(np.float32), labels


def reference_score(text: np.ndarray, images: np.ndarray, labels: np.ndarray, scale: float):
  """(accuracy, mean log-prob of the true class) with argmax ties -> lowest index."""
  logits = scale * images.astype(np.float64) @ text.astype(np.float64).T
  pred = logits.argmax(axis=1)  # numpy's argmax returns the first maximum
  logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  keep = labels >= 0
  return (float((pred[keep] == labels[keep]).mean()),
          float(logp[keep][np.arange(keep.sum()), labels[keep]].mean()))


class SiglipWordTokenizer(WordTokenizer):
  """WordTokenizer ids with SigLIP's framing: no start token, "</s>" (1) ends and pads."""
  sot_token_id = None
  eot_token_id = 1
  pad_token_id = 1


def tiny_siglip() -> CLIP:
  """A tiny random SigLIP (CLIP's vocabulary size, a logit bias) with `SiglipWordTokenizer`."""
  from lmbbo_jax.models.configs import ARCHITECTURES
  from lmbbo_jax.models.loading import random_variables
  config = ARCHITECTURES["tiny-siglip"]
  config = config.replace(text=config.text.__class__(**{**config.text.__dict__,
                                                         "vocab_size": 49408}))
  variables = random_variables(config, seed=3)
  variables["params"]["logit_bias"] = np.float32(-2.5)
  return CLIP(config, variables, SiglipWordTokenizer(), source="test", weights_hash="siglip")
