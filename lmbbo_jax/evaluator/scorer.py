"""`PromptScorer`: few-shot accuracy of prompt templates, one jitted text encode + matmul.

How one `score(templates)` call runs:
1. Each template is validated (`templates.invalid_reason`), filled with every
   class name by plain substitution, and tokenized. Tokens are cached per
   template piece and per class name; a filled sentence is assembled from the
   cached pieces only where no token can straddle a piece boundary, else the
   whole sentence is tokenized (see `TokenCache`). Templates longer than the
   text context for some class are rejected, never truncated.
2. The template's *prefix*, the longest token prefix shared by all its class
   sentences (at least the start token), is encoded once; the causal text
   tower with absolute positions makes this exact. Each class's remaining
   tokens (its *suffix*) are sorted by length and cut into chunks of
   `class_chunk` classes; a chunk is padded to a small fixed set of suffix
   lengths (`SUFFIX_BUCKETS`) and its prefix to `PREFIX_BUCKETS`. A chunk with its
   prefix is a *unit*.
3. Units of equal (prefix bucket, suffix bucket) from all templates are stacked
   into calls of a power-of-two number of units (a remainder of 5 runs as 4 + 1). One jitted step per call shape
   encodes the units, L2-normalises, multiplies with all images of all splits
   and reduces over the unit's classes to per-image partial results (best
   logit and its class, log-sum-exp, true-class logit). The host merges the
   partials of a template's units into accuracy and log-probability per split.
   So the compiled shapes are bounded by |prefix buckets| x |suffix buckets| x
   log2(max units per call), each compiled (and logged) once.

Arrays are placed on a 1-D device mesh: images split over the data axis, the
classes of a unit split over the same axis, weights replicated.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmbbo_jax import templates as templates_lib
from lmbbo_jax.evaluator import sharding
from lmbbo_jax.evaluator.types import Score
from lmbbo_jax.models.clip import CLIPModel

log = logging.getLogger(__name__)

# Suffix lengths (class name + rest of the template + EOT) are padded up to one of these.
SUFFIX_BUCKETS = (2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 32, 40, 48, 64, 77)
# Prefix lengths (start token + template text before the first class token).
PREFIX_BUCKETS = (8, 16, 32, 48, 77)


def default_class_chunk(num_classes: int) -> int:
  """Classes per unit, aimed at: small chunks pad each to its own suffix length.

  Measured by executed token rows on the bench's templates (shared/reference/
  performance.md FLOP model): 25 is best at 100 classes, 25-50 at 1000 classes,
  where 50 needs fewer compiled shapes.
  """
  return 25 if num_classes <= 200 else 50


_NO_CLASS = np.iinfo(np.int32).max  # argmax tie-break sentinel: larger than any class index


class ScorerError(ValueError):
  """Bad input to the scorer (the message says what to change)."""


def _bucket(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  return buckets[-1]


def _pow2_floor(n: int) -> int:
  return 1 << (max(1, n).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


# ----------------------------------------------------------------------------- tokens
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


# ----------------------------------------------------------------------------- planning
@dataclasses.dataclass
class _Prepared:
  """One template's token layout (host side)."""
  ids: np.ndarray  # int32 [C, W]: start + sentence + end, padded
  lengths: np.ndarray  # int32 [C]
  prefix_len: int
  units: list[tuple[int, int, np.ndarray]]  # (prefix bucket, suffix bucket, class rows)


@dataclasses.dataclass
class _Partial:
  """Per-image partial results of one unit (host numpy, [N])."""
  best: np.ndarray
  best_class: np.ndarray
  lse: np.ndarray
  true: np.ndarray


def _l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _partials(text: jax.Array, class_idx: jax.Array, images: jax.Array, labels: jax.Array,
              scale: jax.Array):
  """Per-image reductions of the logits against one unit's classes.

  Args:
    text: float32 [U, K, E] normalised class features.
    class_idx: int32 [U, K], the class of each row (-1 = padding row).
    images: float32 [N, E] normalised image features.
    labels: int32 [N] (-1 = padding image).
    scale: float32 scalar logit scale.

  Returns:
    best [U, N], best_class [U, N] (lowest class index among ties), lse [U, N]
    (log-sum-exp of the scaled logits), true [U, N] (scaled logit of the true
    class if it is in the unit, else -inf).
  """
  logits = scale * jnp.einsum("ne,uke->unk", images, text,
                              preferred_element_type=jnp.float32)
  valid = (class_idx >= 0)[:, None, :]
  masked = jnp.where(valid, logits, -jnp.inf)
  best = masked.max(axis=-1)
  best_class = jnp.where(masked == best[..., None], class_idx[:, None, :], _NO_CLASS).min(-1)
  safe = jnp.where(jnp.isfinite(best), best, 0.0)
  lse = safe + jnp.log(jnp.sum(jnp.exp(masked - safe[..., None]), axis=-1))
  is_true = class_idx[:, None, :] == labels[None, :, None]
  true = jnp.where(is_true, logits, -jnp.inf).max(axis=-1)
  return best, best_class, lse, true


class PromptScorer:
  """Scores prompt templates by few-shot CLIP accuracy (see module doc).

  Thread-safe: calls are serialised by a lock (the device is one resource).
  """

  def __init__(self, clip: Any, features_by_split: Mapping[str, Any],
               labels_by_split: Mapping[str, Any], class_names: Sequence[str], *,
               mesh: jax.sharding.Mesh | None = None, dtype: Any = None,
               per_class: bool = False, max_templates_per_call: int | None = None,
               class_chunk: int | None = None, max_rows_per_call: int | None = None,
               suffix_buckets: Sequence[int] = SUFFIX_BUCKETS,
               prefix_buckets: Sequence[int] = PREFIX_BUCKETS):
    """Places the image features on the mesh and prepares the tokenizer cache.

    Args:
      clip: a `lmbbo_jax.models.api.CLIP`.
      features_by_split: split -> float [N, E] image features (normalised here).
      labels_by_split: split -> int [N] labels; rows with label -1 are ignored
        (padding, unreadable images).
      class_names: the task's class names in label order.
      mesh: device mesh (default: all devices).
      dtype: compute dtype of the text tower (default: the CLIP's).
      per_class: also report per-class accuracy per split.
      max_templates_per_call: most units (template class chunks) per device
        call; default 16 on CPU, 256 on accelerators.
      class_chunk: classes per unit, aimed at (equal chunks, rounded up to
        the mesh size); default `default_class_chunk(num_classes)`.
      max_rows_per_call: token rows per call the unit count is sized for;
        default 2048 on CPU (fits the caches), 65536 on accelerators.
      suffix_buckets, prefix_buckets: padded lengths (ascending, the last one
        >= the text context): fewer buckets mean fewer compiled shapes and more
        padding.
    """
    if not class_names:
      raise ScorerError("no class names; the task must have at least one class")
    if set(features_by_split) != set(labels_by_split):
      raise ScorerError(f"features splits {sorted(features_by_split)} != labels splits "
                        f"{sorted(labels_by_split)}; pass both for the same splits")
    self.clip = clip
    self.class_names = [str(c) for c in class_names]
    self.num_classes = len(self.class_names)
    self.mesh = mesh if mesh is not None else sharding.make_mesh()
    self.per_class = per_class
    self.dtype = jnp.dtype(dtype) if dtype is not None else clip.dtype
    self.context_length = clip.context_length
    self.suffix_buckets = tuple(sorted(suffix_buckets))
    self.prefix_buckets = tuple(sorted(prefix_buckets))
    if min(self.suffix_buckets[-1], self.prefix_buckets[-1]) < self.context_length:
      raise ScorerError(f"the largest suffix and prefix buckets must be >= the text context "
                        f"({self.context_length})")
    self.logit_scale = float(clip.logit_scale)
    self.tokenizer = clip.tokenizer
    shards = sharding.num_shards(self.mesh)
    on_cpu = self.mesh.devices.flat[0].platform == "cpu"
    self.max_units = max_templates_per_call or (16 if on_cpu else 256)
    self.max_rows = max_rows_per_call or (2048 if on_cpu else 65536)
    # Small chunks pad each to its own suffix length; several units per call keep
    # the calls big.
    class_chunk = class_chunk or default_class_chunk(self.num_classes)
    chunks = -(-self.num_classes // max(1, class_chunk))
    # Equal chunks, padded to the mesh: 100 classes -> 4 x 25, 101 -> 5 x 21.
    self.class_chunk = sharding.round_up(-(-self.num_classes // chunks), shards)

    self._model = CLIPModel(clip.config, self.dtype)
    params = clip.variables["params"]
    self._text_vars = sharding.put_replicated(
        {"params": {"text": params["text"], "logit_scale": params["logit_scale"]}}, self.mesh)
    self._load_images(features_by_split, labels_by_split)

    self.tokens = TokenCache(self.tokenizer, self.class_names)
    self._prepared: collections.OrderedDict[str, _Prepared | str] = collections.OrderedDict()
    self._lock = threading.Lock()
    self._prep_lock = threading.Lock()
    self._shapes_seen: set[tuple] = set()
    self._stats = collections.Counter()
    self._front = None
    self._score_fn = jax.jit(self._score_step)
    self._weights_fn = jax.jit(_partials)

  # -- images ------------------------------------------------------------------------
  def _load_images(self, features_by_split, labels_by_split) -> None:
    feats, labels, self.splits = [], [], {}
    start = 0
    for split in features_by_split:
      f = np.asarray(features_by_split[split], np.float32)
      y = np.asarray(labels_by_split[split], np.int32).reshape(-1)
      if f.ndim != 2 or f.shape[0] != y.shape[0] or f.shape[1] != self.clip.embed_dim:
        raise ScorerError(f"split {split!r}: features {f.shape} and labels {y.shape} must be "
                          f"[N, {self.clip.embed_dim}] and [N]")
      if y.size and (y.max() >= self.num_classes or y.min() < -1):
        raise ScorerError(f"split {split!r}: labels must be in -1..{self.num_classes - 1}")
      feats.append(f)
      labels.append(y)
      self.splits[split] = (start, start + len(y))
      start += len(y)
    n = sharding.round_up(max(start, 1), sharding.num_shards(self.mesh))
    f = np.zeros((n, self.clip.embed_dim), np.float32)
    y = np.full((n,), -1, np.int32)
    if start:
      f[:start] = np.concatenate(feats)
      y[:start] = np.concatenate(labels)
    self._labels = y
    self._images = jax.jit(_l2_normalize)(sharding.put_sharded(f, self.mesh))
    self._labels_dev = sharding.put_sharded(y, self.mesh)
    self.num_images = start

  # -- jitted steps ------------------------------------------------------------------
  def _encode_step(self, variables, prefix_ids, prefix_len, suffix_ids, eot):
    text = self._model.apply(variables, prefix_ids, prefix_len, suffix_ids, eot,
                             method=CLIPModel.encode_text_prefixed)
    text = _l2_normalize(text)
    # Gather the class axis before the image matmul (images are split over the mesh).
    return jax.lax.with_sharding_constraint(text, sharding.replicated(self.mesh))

  def _score_step(self, variables, prefix_ids, prefix_len, suffix_ids, eot, class_idx,
                  images, labels, scale):
    """(normalised text features [U, K, E], partials): one compiled program per shape.

    The score path leaves the features on the device; the encode path
    (ensembles, `text_features`) ignores the partials, so both share compiles.
    """
    text = self._encode_step(variables, prefix_ids, prefix_len, suffix_ids, eot)
    class_idx = jax.lax.with_sharding_constraint(class_idx, sharding.replicated(self.mesh))
    return text, _partials(text, class_idx, images, labels, scale)

  # -- validation & preparation ----------------------------------------------------
  def rejection_reason(self, template: str) -> str | None:
    """Why `template` cannot be scored (format or context length), or None."""
    prepared = self._prepare(template)
    return prepared if isinstance(prepared, str) else None

  def _prepare(self, template: str) -> _Prepared | str:
    # Own short lock: the event loop may validate while a worker thread scores.
    with self._prep_lock:
      found = self._prepared.get(template)
      if found is not None:
        self._prepared.move_to_end(template)
        return found
      prepared = self._build(template)
      self._prepared[template] = prepared
      if len(self._prepared) > 256:
        self._prepared.popitem(last=False)
      return prepared

  def _build(self, template: str) -> _Prepared | str:
    reason = templates_lib.invalid_reason(template)
    if reason:
      return reason
    rows = self.tokens.sentences(template)
    tok = self.tokenizer
    lengths = np.array([len(r) + 2 for r in rows], np.int32)
    worst = int(lengths.argmax())
    if lengths[worst] > self.context_length:
      return (f"too long: {int(lengths[worst])} tokens with class "
              f"{self.class_names[worst]!r} (context {self.context_length}); shorten it")
    ids = np.full((len(rows), int(lengths.max())), tok.pad_token_id, np.int32)
    for c, r in enumerate(rows):
      ids[c, 0] = tok.sot_token_id
      ids[c, 1:len(r) + 1] = r
      ids[c, len(r) + 1] = tok.eot_token_id
    # Shared prefix: equal columns from the start, leaving every class >= 1 own token.
    upto = int(lengths.min()) - 1
    same = (ids[:, :upto] == ids[0, :upto]).all(axis=0)
    prefix_len = int(upto if same.all() else same.argmin())
    suffix_len = lengths - prefix_len
    order = np.argsort(suffix_len, kind="stable").astype(np.int32)
    p_bucket = _bucket(prefix_len, self.prefix_buckets)
    units = []
    for start in range(0, len(order), self.class_chunk):
      rows_ = order[start:start + self.class_chunk]
      s_bucket = _bucket(int(suffix_len[rows_].max()), self.suffix_buckets)
      units.append((p_bucket, s_bucket, rows_))
    # Room for the widest padded suffix, so slicing never runs short (kept small:
    # prepared templates are cached).
    width = prefix_len + max(u[1] for u in units)
    if width > ids.shape[1]:
      ids = np.pad(ids, ((0, 0), (0, width - ids.shape[1])),
                   constant_values=tok.pad_token_id)
    return _Prepared(ids, lengths, prefix_len, units)

  # -- running units -----------------------------------------------------------------
  def _units_per_call(self, s_bucket: int) -> int:
    fit = self.max_rows // (self.class_chunk * s_bucket)
    return _pow2_floor(max(1, min(self.max_units, fit)))

  def _unit_arrays(self, units: list[tuple[_Prepared, int]], u_pad: int, p_bucket: int,
                   s_bucket: int):
    """Host arrays of one call: units padded to `u_pad` with empty units."""
    k, pad = self.class_chunk, self.tokenizer.pad_token_id
    prefix_ids = np.full((u_pad, p_bucket), pad, np.int32)
    prefix_len = np.ones((u_pad,), np.int32)
    suffix = np.full((u_pad, k, s_bucket), pad, np.int32)
    eot = np.zeros((u_pad, k), np.int32)
    class_idx = np.full((u_pad, k), -1, np.int32)
    for u, (prep, j) in enumerate(units):
      plen = prep.prefix_len
      rows = prep.units[j][2]
      prefix_ids[u, :min(plen, p_bucket)] = prep.ids[0, :min(plen, p_bucket)]
      prefix_len[u] = plen
      suffix[u, :len(rows)] = prep.ids[rows, plen:plen + s_bucket]
      eot[u, :len(rows)] = prep.lengths[rows] - plen - 1
      class_idx[u, :len(rows)] = rows
      self._stats["token_rows_real"] += int(prep.lengths[rows].sum() - plen * len(rows))
      self._stats["token_rows_real"] += plen if j == 0 else 0
    self._stats["token_rows"] += u_pad * (p_bucket + k * s_bucket)
    self._stats["attention_keys"] += u_pad * (p_bucket * p_bucket
                                              + k * s_bucket * (p_bucket + s_bucket))
    return prefix_ids, prefix_len, suffix, eot, class_idx

  def _place(self, prefix_ids, prefix_len, suffix, eot, class_idx):
    mesh = self.mesh
    return (sharding.put_replicated(prefix_ids, mesh), sharding.put_replicated(prefix_len, mesh),
            sharding.put_sharded(suffix, mesh, 1), sharding.put_sharded(eot, mesh, 1),
            sharding.put_sharded(class_idx, mesh, 1))

  def _note_shape(self, kind: str, shape: tuple) -> float | None:
    key = (kind,) + shape
    if key in self._shapes_seen:
      return None
    self._shapes_seen.add(key)
    log.info("scorer: compiling %s step for shape %s (units, prefix, classes, suffix) "
             "x %d images, %s", kind, shape, len(self._labels), self.dtype.name)
    return time.perf_counter()

  def _calls(self, work: list[tuple[_Prepared, int]]):
    """Groups (template, unit) pairs by shape into calls: yields (units, u_pad, P, S)."""
    groups: dict[tuple[int, int], list[tuple[_Prepared, int]]] = collections.defaultdict(list)
    for prep, j in work:
      p_bucket, s_bucket, _ = prep.units[j]
      groups[(p_bucket, s_bucket)].append((prep, j))
    for (p_bucket, s_bucket), items in sorted(groups.items()):
      per_call = self._units_per_call(s_bucket)
      # Full calls, then the rest in power-of-two calls (5 -> 4 + 1): no padded
      # units, the same bounded set of shapes. Remainders too small to fill a
      # GEMM well (< 1/4 of a full call) are padded up instead of split further.
      sizes, rest = [], len(items)
      while rest:
        u = min(per_call, _pow2_floor(rest))
        if u < rest and rest <= per_call // 4:
          u = _pow2_ceil(rest)
        sizes.append(u)
        rest -= min(u, rest)
      at = 0
      for u in sizes:
        chunk = items[at:at + u]
        at += len(chunk)
        yield chunk, u, p_bucket, s_bucket

  def _run(self, work: list[tuple[_Prepared, int]], encode_only: bool = False):
    """Runs every unit; returns {(id(prep), j): _Partial or np.ndarray [rows, E]}."""
    pending = []
    scale = jnp.float32(self.logit_scale)
    for chunk, u_pad, p_bucket, s_bucket in self._calls(work):
      arrays = self._place(*self._unit_arrays(chunk, u_pad, p_bucket, s_bucket))
      shape = (u_pad, p_bucket, self.class_chunk, s_bucket)
      started = self._note_shape("text", shape)
      text, partials = self._score_fn(self._text_vars, *arrays, self._images,
                                      self._labels_dev, scale)
      out = text if encode_only else partials
      if started is not None:  # Wait, so the log says what the compile + first run cost.
        jax.block_until_ready(out)
        compile_s = time.perf_counter() - started
        self._stats["seconds_compile"] += compile_s
        log.info("scorer: shape %s compiled and ran in %.1f s", shape, compile_s)
      pending.append((chunk, out))
      self._stats["calls"] += 1
    results = {}
    for chunk, out in pending:
      if encode_only:
        feats = np.asarray(out)
        for u, (prep, j) in enumerate(chunk):
          results[(id(prep), j)] = feats[u, :len(prep.units[j][2])]
      else:
        best, best_class, lse, true = (np.asarray(a) for a in out)
        for u, (prep, j) in enumerate(chunk):
          results[(id(prep), j)] = _Partial(best[u], best_class[u], lse[u], true[u])
    return results

  # -- merging ---------------------------------------------------------------------------
  def _merge(self, template: str, partials: list[_Partial]) -> Score:
    best = np.stack([p.best for p in partials])
    top = best.max(axis=0)
    pred = np.where(best == top, np.stack([p.best_class for p in partials]), _NO_CLASS).min(0)
    lse = np.logaddexp.reduce(np.stack([p.lse for p in partials]).astype(np.float64), axis=0)
    true = np.stack([p.true for p in partials]).max(axis=0).astype(np.float64)
    logp = true - lse
    accuracy, logprob, per_class = {}, {}, {}
    for split, (lo, hi) in self.splits.items():
      y = self._labels[lo:hi]
      keep = y >= 0
      y = y[keep]
      correct = (pred[lo:hi][keep] == y)
      accuracy[split] = float(correct.mean()) if y.size else float("nan")
      logprob[split] = float(logp[lo:hi][keep].mean()) if y.size else float("nan")
      if self.per_class:
        hits = np.bincount(y, weights=correct, minlength=self.num_classes)
        counts = np.bincount(y, minlength=self.num_classes)
        with np.errstate(invalid="ignore", divide="ignore"):
          per_class[split] = [float(v) for v in hits / counts]
    return Score(template, accuracy, logprob, per_class if self.per_class else None)

  # -- public API ------------------------------------------------------------------------
  def score(self, templates: Sequence[str]) -> list[Score]:
    """Accuracy and log-probability per split for each template (see module doc).

    Invalid or too long templates come back as `Score(rejected=reason)`.
    Duplicates are scored once.
    """
    if isinstance(templates, str):
      raise ScorerError("score() takes a list of templates, not one string")
    with self._lock:
      started = time.perf_counter()
      prepared = {t: self._prepare(t) for t in templates if isinstance(t, str)}
      ok = {t: p for t, p in prepared.items() if not isinstance(p, str)}
      work = [(p, j) for p in ok.values() for j in range(len(p.units))]
      ran = time.perf_counter()
      results = self._run(work)
      merged = time.perf_counter()
      out = []
      for t in templates:
        p = prepared.get(t) if isinstance(t, str) else templates_lib.invalid_reason(t)
        if isinstance(p, str):
          out.append(Score(t if isinstance(t, str) else repr(t), rejected=p))
        else:
          out.append(self._merge(t, [results[(id(p), j)] for j in range(len(p.units))]))
      self._stats["templates"] += len(ok)
      self._stats["rejected"] += sum(1 for s in out if not s.ok)
      self._stats["score_calls"] += 1
      done = time.perf_counter()
      self._stats["seconds_busy"] += done - started
      self._stats["seconds_prepare"] += ran - started  # tokenize, prefix, plan
      self._stats["seconds_device"] += merged - ran  # host arrays, dispatch, wait
      self._stats["seconds_merge"] += done - merged
    return out

  def text_features(self, templates: Sequence[str]) -> np.ndarray:
    """float32 [T, C, E] normalised class features of valid templates (raises otherwise)."""
    with self._lock:
      return self._text_features(templates)

  def _text_features(self, templates: Sequence[str]) -> np.ndarray:
    preps = []
    for t in templates:
      p = self._prepare(t)
      if isinstance(p, str):
        raise ScorerError(f"template {t!r} cannot be encoded: {p}")
      preps.append(p)
    uniq = list({id(p): p for p in preps}.values())
    results = self._run([(p, j) for p in uniq for j in range(len(p.units))], encode_only=True)
    out = np.zeros((len(preps), self.num_classes, self.clip.embed_dim), np.float32)
    for i, p in enumerate(preps):
      for j, (_, _, rows) in enumerate(p.units):
        out[i, rows] = results[(id(p), j)]
    return out

  def score_ensemble(self, groups: Sequence[Sequence[str]]) -> list[Score]:
    """Scores each group of templates as one classifier.

    A class's weight is the mean of its normalised text features over the
    group's templates, renormalised (CLIP's prompt ensembling). A group with an
    invalid template is rejected with that template's reason.
    """
    with self._lock:
      started = time.perf_counter()
      out: list[Score | None] = [None] * len(groups)
      good: list[tuple[int, list[str]]] = []
      for g, group in enumerate(groups):
        group = list(group)
        name = " | ".join(str(t) for t in group)
        if not group:
          out[g] = Score(name, rejected="empty ensemble")
          continue
        bad = [(t, self.rejection_reason(t) if isinstance(t, str) else "not a string")
               for t in group]
        bad = [(t, r) for t, r in bad if r]
        if bad:
          out[g] = Score(name, rejected=f"template {bad[0][0]!r}: {bad[0][1]}")
          continue
        good.append((g, group))
      if good:
        uniq = list(dict.fromkeys(t for _, grp in good for t in grp))
        feats = dict(zip(uniq, self._text_features(uniq)))
        weights = np.stack([np.mean([feats[t] for t in grp], axis=0) for _, grp in good])
        weights /= np.maximum(np.linalg.norm(weights, axis=-1, keepdims=True), 1e-12)
        partials = self._run_weights(weights)
        for i, (g, group) in enumerate(good):
          out[g] = self._merge(" | ".join(group), partials[i])
      self._stats["ensembles"] += len(good)
      self._stats["seconds_busy"] += time.perf_counter() - started
    return out  # type: ignore[return-value]

  def _run_weights(self, weights: np.ndarray) -> list[list[_Partial]]:
    """Partials of classifiers given directly as class weights [G, C, E]."""
    k = self.class_chunk
    work = [(g, lo) for g in range(len(weights)) for lo in range(0, self.num_classes, k)]
    per_call = _pow2_floor(max(1, self.max_units))
    results: list[list[_Partial]] = [[] for _ in weights]
    scale = jnp.float32(self.logit_scale)
    for i in range(0, len(work), per_call):
      chunk = work[i:i + per_call]
      u_pad = _pow2_ceil(len(chunk))
      w = np.zeros((u_pad, k, weights.shape[-1]), np.float32)
      idx = np.full((u_pad, k), -1, np.int32)
      for u, (g, lo) in enumerate(chunk):
        hi = min(lo + k, self.num_classes)
        w[u, :hi - lo] = weights[g, lo:hi]
        idx[u, :hi - lo] = np.arange(lo, hi)
      self._note_shape("weights", (u_pad, k))
      out = self._weights_fn(sharding.put_replicated(w, self.mesh),
                             sharding.put_replicated(idx, self.mesh),
                             self._images, self._labels_dev, scale)
      best, best_class, lse, true = (np.asarray(a) for a in out)
      for u, (g, _) in enumerate(chunk):
        results[g].append(_Partial(best[u], best_class[u], lse[u], true[u]))
      self._stats["calls"] += 1
    return results

  async def score_async(self, templates: Sequence[str]) -> list[Score]:
    """`score` for asyncio callers, coalesced with concurrent calls (see front.py)."""
    from lmbbo_jax.evaluator.front import ScoringFront  # Avoids an import cycle.
    if self._front is None:
      self._front = ScoringFront(self)
    return await self._front.score_async(templates)

  def max_context_ok(self, template: str) -> str | None:
    """None when `template` fits the context with every class name, else the reason."""
    return self.rejection_reason(template)

  @property
  def preferred_batch(self) -> int:
    """Templates per `score` call that fill the device calls well."""
    return max(1, self.max_units)

  def stats(self) -> dict[str, float]:
    """Counters for throughput reports.

    templates (valid templates scored), rejected, ensembles, score_calls,
    calls (device step calls), compiles, seconds_busy (wall time inside
    score/score_ensemble; of score's: seconds_prepare for tokenization and
    planning, seconds_device for the device calls, seconds_merge for merging
    partials on the host), token_rows (executed, with padding),
    token_rows_real (without padding), gflops_text (executed, by the FLOP
    model of performance.md), gflops_images (image-text matmuls), and the
    token cache's assembled/whole sentence counts.
    """
    s = dict(self._stats)
    s["compiles"] = len(self._shapes_seen)  # Never reset: compiled programs stay.
    s.update({f"sentences_{k}": v for k, v in self.tokens.stats.items()})
    cfg = self.clip.config.text
    params = cfg.layers * (4 * cfg.width ** 2 + 2 * cfg.width * int(cfg.width * cfg.mlp_ratio))
    s["gflops_text"] = (2 * params * s.get("token_rows", 0)
                        + 4 * cfg.layers * cfg.width * s.get("attention_keys", 0)) / 1e9
    s["gflops_images"] = (2 * len(self._labels) * self.clip.embed_dim * self.num_classes
                          * (s.get("templates", 0) + s.get("ensembles", 0))) / 1e9
    for key in ("templates", "rejected", "ensembles", "score_calls", "calls", "compiles",
                "seconds_busy", "token_rows", "token_rows_real"):
      s.setdefault(key, 0)
    return s

  def clear_caches(self) -> None:
    """Forgets prepared templates and cached piece tokens (benchmarks: cold tokenization)."""
    with self._prep_lock:
      self._prepared.clear()
      self.tokens.clear()

  def reset_stats(self) -> None:
    self._stats.clear()
    self.tokens.stats.clear()
