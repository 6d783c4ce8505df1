"""`CLIP`: the object the rest of the package and outside scripts use.

It bundles a config, float32 variables, a tokenizer and a compute dtype, and
offers the small public API of the model room, the same for CLIP and SigLIP:

  clip.tokenize(texts) -> int32 [N, context]      (raises on overflow, never cuts)
  clip.encode_text(ids) -> float32 [N, embed_dim]  (projected, un-normalised)
  clip.encode_image(pixels NHWC, normalised) -> float32 [N, embed_dim]
  clip.logits(image_features, text_features) -> float32 [N_images, N_texts]
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

from lmbbo_jax.models.clip import build_model
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
  """What `CLIP` needs of a tokenizer (CLIP BPE, SigLIP's, or the toy world's byte BPE).

  `sot_token_id` / `eot_token_id` None: no such token (SigLIP has no start token).
  """
  sot_token_id: int | None
  eot_token_id: int | None
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
    self.model = build_model(config, self.dtype)

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

  @property
  def logit_bias(self) -> float:
    """SigLIP's learned bias of the logits (0 for CLIP)."""
    bias = self.variables["params"].get("logit_bias")
    return 0.0 if bias is None else float(np.asarray(bias))

  def logits(self, image_features, text_features) -> np.ndarray:
    """float32 [N_images, N_texts]: logit_scale * cosine + logit_bias.

    CLIP reads them through a softmax over texts, SigLIP through a sigmoid per
    pair (its probabilities are sigmoid(logits)).
    """
    def unit(x):
      x = np.asarray(x, np.float32)
      return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return self.logit_scale * unit(image_features) @ unit(text_features).T + self.logit_bias

  # -- tokenization -----------------------------------------------------------
  def frame(self, ids: Sequence[int]) -> list[int]:
    """A text's token ids with the tokenizer's start and end tokens around them."""
    tok = self.tokenizer
    start = [] if tok.sot_token_id is None else [tok.sot_token_id]
    end = [] if tok.eot_token_id is None else [tok.eot_token_id]
    return [*start, *ids, *end]

  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    """Start + tokens + end for each text, unpadded; raises ContextOverflowError."""
    rows = [self.frame(ids) for ids in self.tokenizer.encode_batch(list(texts))]
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
    """float32 [N, embed_dim] for int32 ids [N, L]; CLIP: trimmed to a length bucket
    (exact); SigLIP: padded to the full text length with the pad token (its rows are
    always that long)."""
    ids = np.asarray(ids, np.int32)
    if not self.config.text_causal:
      if ids.shape[1] > self.context_length:
        raise ValueError(f"ids have {ids.shape[1]} columns, more than the text length "
                         f"{self.context_length}")
      full = np.full((len(ids), self.context_length), self.tokenizer.pad_token_id, np.int32)
      full[:, :ids.shape[1]] = ids
      return _encode_rows_fn(self.model)(self.variables, jnp.asarray(full))
    eot = self.eot_index(ids)
    length = bucket_length(int(eot.max()) + 1 if len(eot) else 1, self.context_length)
    return _encode_text_fn(self.model)(self.variables, jnp.asarray(ids[:, :length]),
                                       jnp.asarray(eot))

  def encode_image(self, pixels) -> jax.Array:
    """float32 [N, embed_dim] for normalised float pixels [N, H, W, 3]."""
    return _encode_image_fn(self.model)(self.variables, jnp.asarray(pixels, jnp.float32))


@functools.lru_cache(maxsize=None)
def _encode_text_fn(model):
  return jax.jit(lambda v, ids, eot: model.apply(v, ids, eot, method="encode_text"))


@functools.lru_cache(maxsize=None)
def _encode_rows_fn(model):
  return jax.jit(lambda v, ids: model.apply(v, ids, method="encode_text"))


@functools.lru_cache(maxsize=None)
def _encode_image_fn(model):
  return jax.jit(lambda v, px: model.apply(v, px, method="encode_image"))
