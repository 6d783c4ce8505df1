"""The toy CLIP's tokenizer: byte-level BPE trained on the caption grammar.

Byte-level, so any text tokenizes (words outside the grammar fall apart into
byte tokens). Lower-cased like CLIP. Special tokens: pad = 0, start = 1, end = 2.
"""

from __future__ import annotations

import os

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, SOT, EOT = "<|pad|>", "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 32


class ToyTokenizerError(ValueError):
  """The tokenizer file is missing or malformed."""


def train_tokenizer(texts, vocab_size: int = 1024) -> Tokenizer:
  """A byte-level BPE trained on `texts` (the merges saturate near the grammar's vocabulary)."""
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, SOT, EOT],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


class ToyTokenizer:
  """Wraps a `tokenizers.Tokenizer` with the interface the CLIP loader expects.

  Attributes:
    sot_token_id, eot_token_id, pad_token_id: special token ids.
    vocab_size: embedding rows needed.
    context_length: the text tower's context.
  """

  def __init__(self, tokenizer: Tokenizer, context_length: int = CONTEXT_LENGTH):
    self._tok = tokenizer
    ids = [tokenizer.token_to_id(t) for t in (PAD, SOT, EOT)]
    if any(i is None for i in ids):
      raise ToyTokenizerError("toy tokenizer lacks its special tokens; retrain it with "
                              "lmbbo_jax.toyworld.tokenizer.train_tokenizer")
    self.pad_token_id, self.sot_token_id, self.eot_token_id = ids
    self.vocab_size = tokenizer.get_vocab_size()
    self.context_length = context_length

  @classmethod
  def from_file(cls, path: str, context_length: int = CONTEXT_LENGTH) -> "ToyTokenizer":
    if not os.path.exists(path):
      raise ToyTokenizerError(f"toy tokenizer file {path!r} not found; train one with "
                              "python -m lmbbo_jax.toyworld.train")
    return cls(Tokenizer.from_file(path), context_length)

  def save(self, path: str) -> None:
    self._tok.save(path)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode(list(ids))

  def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """[SOT] ids [EOT] padded to the context (too long: truncated, EOT kept).

    Returns:
      (ids int32 [N, context_length], eot_index int32 [N]).
    """
    n, ctx = len(texts), self.context_length
    out = np.full((n, ctx), self.pad_token_id, np.int32)
    eot = np.zeros((n,), np.int32)
    for i, ids in enumerate(self.encode_batch(texts)):
      ids = [self.sot_token_id] + ids[:ctx - 2] + [self.eot_token_id]
      out[i, :len(ids)] = ids
      eot[i] = len(ids) - 1
    return out, eot
