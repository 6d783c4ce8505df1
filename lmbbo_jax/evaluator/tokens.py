"""Token ids of filled templates, assembled from cached pieces where that is exact.

A template's class sentences share their literal pieces; `TokenCache` tokenizes each
piece and each class name once and concatenates the ids where no token can straddle a
piece boundary (see `TokenCache`), else it tokenizes the whole filled sentence.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from typing import Any

from lmbbo_jax import templates as templates_lib

log = logging.getLogger(__name__)

_CONTRACTION_STARTS = frozenset("stmdrvl")  # 's 't 'm 'd 're 've 'll


def _char_kind(ch: str) -> str:
  if ch.isspace():
    return "space"
  if ch.isalpha():
    return "letter"
  if ch.isdigit():
    return "digit"
  return "other"


def _plain_text(text: str) -> bool:
  """Text that CLIP's cleaning leaves alone (no ftfy, no HTML entities) except spacing."""
  return text.isascii() and text.isprintable() and "&" not in text


def _space_boundary(a: str, b: str) -> bool:
  """Whitespace-splitting tokenizers: only a whitespace boundary is a token boundary."""
  return a.isspace() or b.isspace()


def _clip_boundary(a: str, b: str) -> bool:
  """CLIP's pre-tokenizer (`'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`).

  On ASCII text a pre-token ends between characters of different kinds
  (space, letter, digit, other), and between two digits; an apostrophe
  followed by a contraction letter starts one pre-token ("'s"), so it must not
  be cut.
  """
  ka, kb = _char_kind(a), _char_kind(b)
  if "space" in (ka, kb):
    return True
  if a == "'" and b.lower() in _CONTRACTION_STARTS:
    return False
  return ka != kb or ka == "digit"


def _whitespace_splits(tokenizer: Any, probe_words: Sequence[str]) -> bool:
  """Whether `tokenizer` treats whitespace as a pure separator (CLIP's BPE does).

  Then tokens("x y") == tokens("x") + tokens("y") and a lone space has no token.
  Byte-level BPEs that glue the space to the next word fail this, and the
  scorer then always tokenizes whole sentences.
  """
  words = [w for w in probe_words if w and _plain_text(w)][:8]
  words += ["a photo of a", "dog", "thing.", "x"]
  pairs = [(words[i], words[(i + 1) % len(words)]) for i in range(len(words))]
  texts = []
  for a, b in pairs:
    texts += [a + " " + b, a, b, a + " ", " " + b]
  enc = tokenizer.encode_batch(texts)
  for i in range(len(pairs)):
    ab, a, b, a_sp, sp_b = enc[5 * i: 5 * i + 5]
    if ab != a + b or a_sp != a or sp_b != b:
      return False
  return True


def _boundary_rule(tokenizer: Any, probe_words: Sequence[str]):
  """The piece-boundary rule that is exact for `tokenizer`, or None (never assemble)."""
  if not _whitespace_splits(tokenizer, probe_words):
    return None
  is_clip = getattr(tokenizer, "boundary_rule", None) == "clip"
  try:
    from lmbbo_jax.models.tokenizer import ClipBPETokenizer
    is_clip = is_clip or isinstance(tokenizer, ClipBPETokenizer)
  except ImportError:  # The models room without its tokenizer: space rule only.
    pass
  return _clip_boundary if is_clip else _space_boundary


class TokenCache:
  """Token ids of filled templates, assembled from cached pieces when that is exact.

  The cache keys are template pieces (the literal text between `{}` slots) and
  class names. A sentence is the concatenation of its pieces' and names' ids
  only when no token can straddle a boundary between them: the tokenizer must
  split on whitespace (probed once), both sides must be plain ASCII text that
  its cleaning leaves alone, and the two touching characters must be a
  pre-token boundary (`_clip_boundary` for CLIP's BPE, else whitespace only).
  Otherwise the whole filled sentence is tokenized. Either way the ids equal
  tokenizing the filled sentence; one class per template is re-checked
  against the whole sentence as a guard, and a mismatch switches assembly off.
  """

  def __init__(self, tokenizer: Any, class_names: Sequence[str], max_pieces: int = 8192):
    self.tokenizer = tokenizer
    self.class_names = list(class_names)
    self._name_ids = tokenizer.encode_batch(self.class_names)
    self._name_plain = [_plain_text(n) for n in self.class_names]
    self._pieces: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
    self._max_pieces = max_pieces
    self.rule = _boundary_rule(tokenizer, self.class_names)
    self._check_counter = 0
    self.stats = collections.Counter()

  @property
  def name_ids(self) -> list[list[int]]:
    """Token ids of each class name alone."""
    return self._name_ids

  @property
  def assemble(self) -> bool:
    return self.rule is not None

  def _piece(self, text: str) -> list[int]:
    ids = self._pieces.get(text)
    if ids is None:
      ids = self.tokenizer.encode_batch([text])[0]
      self._pieces[text] = ids
      if len(self._pieces) > self._max_pieces:
        self._pieces.popitem(last=False)
    else:
      self._pieces.move_to_end(text)
    return ids

  def _assembled(self, pieces: list[str], c: int) -> list[int] | None:
    if not self._name_plain[c]:
      return None
    name = self.class_names[c]
    segments = [pieces[0]]
    for piece in pieces[1:]:
      segments += [name, piece]
    segments = [s for s in segments if s]
    if any(not self.rule(a[-1], b[0]) for a, b in zip(segments, segments[1:])):
      return None
    out: list[int] = []
    for i, piece in enumerate(pieces):
      if i:
        out += self._name_ids[c]
      if piece:
        out += self._piece(piece)
    return out

  def sentences(self, template: str) -> list[list[int]]:
    """Ids of `fill(template, name)` for every class (no start/end tokens)."""
    rows: list[list[int] | None] = [None] * len(self.class_names)
    pieces = templates_lib.split_slots(template)
    if self.assemble and all(_plain_text(p) for p in pieces):
      rows = [self._assembled(pieces, c) for c in range(len(self.class_names))]
    todo = [c for c, r in enumerate(rows) if r is None]
    if todo:
      whole = self.tokenizer.encode_batch(
          [templates_lib.fill(template, self.class_names[c]) for c in todo])
      for c, ids in zip(todo, whole):
        rows[c] = ids
    self.stats["assembled"] += len(rows) - len(todo)
    self.stats["whole"] += len(todo)
    if len(todo) < len(rows):
      skip = set(todo)
      c = next(c for c in self._check_order() if c not in skip)
      truth = self.tokenizer.encode_batch([templates_lib.fill(template, self.class_names[c])])[0]
      if truth != rows[c]:
        log.warning("token assembly disagreed with whole-sentence tokenization for %r "
                    "(class %r); tokenizing whole sentences from now on",
                    template, self.class_names[c])
        self.rule = None
        return self.sentences(template)
    return rows  # type: ignore[return-value]

  def clear(self) -> None:
    """Drops the cached pieces (class names stay: they are fixed per scorer)."""
    self._pieces.clear()

  def _check_order(self):
    # Rotate the checked class so that every class name gets checked over time.
    n = len(self.class_names)
    start = self._check_counter % n
    self._check_counter += 1
    return [(start + i) % n for i in range(n)]
