"""`CLIP`: the object the rest of the package and outside scripts use.

It bundles a config, float32 variables, a tokenizer and a compute dtype, and
offers the small public API of the model room:

  clip.tokenize(texts) -> int32 [N, context]      (raises on overflow, never cuts)
  clip.encode_text(ids) -> float32 [N, embed_dim]  (projected, un-normalised)
  clip.encode_image(pixels NHWC, normalised) -> float32 [N, embed_dim]
  clip.image_size, clip.embed_dim, clip.context_length

Hot paths (the evaluator) use `clip.model` / `clip.variables` directly with
their own jitted functions.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmbbo_jax.models.clip import CLIPModel
from lmbbo_jax.models.configs import CLIPConfig

# Text lengths are padded up to one of these, so encode_text compiles a few shapes only.
TEXT_BUCKETS = (8, 16, 24, 32, 48, 64, 77)


class ContextOverflowError(ValueError):
  """Texts whose tokens (with start/end tokens) do not fit the text context."""

  def __init__(self, overflows: list[tuple[int, str, int]], context_length: int):
    self.overflows = overflows  # (index, text, token count)
    self.context_length = context_length
    first = overflows[0]
    super().__init__(
        f"{len(overflows)} text(s) exceed the {context_length}-token context "
        f"(first: #{first[0]} has {first[2]} tokens: {first[1][:80]!r}); "
        "shorten them (text is never truncated silently)")


class Tokenizer(Protocol):
  """What `CLIP` needs of a tokenizer (CLIP BPE or the toy world's byte BPE)."""
  sot_token_id: int
  eot_token_id: int
  pad_token_id: int
  vocab_size: int

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without start/end tokens."""


def bucket_length(n: int, context_length: int) -> int:
  for b in TEXT_BUCKETS:
    if n <= b:
      return min(b, context_length)
  return context_length


class CLIP:
  """A loaded CLIP model: config + variables + tokenizer (see module doc)."""

  def __init__(self, config: CLIPConfig, variables: Any, tokenizer: Tokenizer,
               dtype: Any = jnp.float32, *, source: str = "", weights_hash: str = ""):
    self.config = config
    self.variables = variables
    self.tokenizer = tokenizer
    self.dtype = jnp.dtype(dtype)
    self.source = source
    self.weights_hash = weights_hash
    self.model = CLIPModel(config, self.dtype)

  # -- properties -----------------------------------------------------------
  @property
  def image_size(self) -> int:
    return self.config.vision.image_size

  @property
  def embed_dim(self) -> int:
    return self.config.embed_dim

  @property
  def context_length(self) -> int:
    return self.config.text.context_length

  @property
  def name(self) -> str:
    return self.config.name or self.source

  @property
  def logit_scale(self) -> float:
    return float(np.exp(np.asarray(self.variables["params"]["logit_scale"])))

  # -- tokenization -----------------------------------------------------------
  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    """Start + tokens + end for each text, unpadded; raises ContextOverflowError."""
    tok = self.tokenizer
    rows = [[tok.sot_token_id, *ids, tok.eot_token_id]
            for ids in tok.encode_batch(list(texts))]
    over = [(i, t, len(r)) for i, (t, r) in enumerate(zip(texts, rows))
            if len(r) > self.context_length]
    if over:
      raise ContextOverflowError(over, self.context_length)
    return rows

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [N, context_length], padded with the pad token; raises on overflow."""
    rows = self.token_ids(texts)
    out = np.full((len(rows), self.context_length), self.tokenizer.pad_token_id, np.int32)
    for i, r in enumerate(rows):
      out[i, :len(r)] = r
    return out

  # -- encoders ----------------------------------------------------------------
  def eot_index(self, ids: np.ndarray) -> np.ndarray:
    """Index of the first end-of-text token per row (argmax of ids if absent)."""
    ids = np.asarray(ids)
    is_eot = ids == self.config.eot_token_id
    return np.where(is_eot.any(axis=1), is_eot.argmax(axis=1), ids.argmax(axis=1)).astype(np.int32)

  def encode_text(self, ids) -> jax.Array:
    """float32 [N, embed_dim] for int32 ids [N, L]; trimmed to a length bucket (exact)."""
    ids = np.asarray(ids, np.int32)
    eot = self.eot_index(ids)
    length = bucket_length(int(eot.max()) + 1 if len(eot) else 1, self.context_length)
    return _encode_text_fn(self.model)(self.variables, jnp.asarray(ids[:, :length]),
                                       jnp.asarray(eot))

  def encode_image(self, pixels) -> jax.Array:
    """float32 [N, embed_dim] for normalised float pixels [N, H, W, 3]."""
    return _encode_image_fn(self.model)(self.variables, jnp.asarray(pixels, jnp.float32))


@functools.lru_cache(maxsize=None)
def _encode_text_fn(model: CLIPModel):
  return jax.jit(lambda v, ids, eot: model.apply(v, ids, eot, method=CLIPModel.encode_text))


@functools.lru_cache(maxsize=None)
def _encode_image_fn(model: CLIPModel):
  return jax.jit(lambda v, px: model.apply(v, px, method=CLIPModel.encode_image))
