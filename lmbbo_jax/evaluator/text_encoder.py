"""`PackedTextEncoder`: every class sentence of a template through a fixed set of programs.

One device call has fixed shapes, whatever templates arrive (`CallShape`):
- prefix slots [slots, P]: a template's *prefix*, the tokens all its class
  sentences share (from the start token on), at most `PREFIX_TOKENS` of them; a
  longer shared prefix leaves the rest in every class's segment, which is
  still exact, only less shared.
- rows [rows, L], L = the text context: each row continues the prefix of one
  template and holds *segments* (one class's tokens after the prefix, EOT
  included) end to end, packed first-fit by length. A token attends to its
  template's prefix and, causally, to its own segment (a block-diagonal mask),
  at absolute position prefix_len + offset, so each segment's EOT feature is
  the plain encode of its full sentence (the parity tests check 1e-5).
- segment slots [segments]: where each segment's EOT sits, its class and its
  prefix slot.

Padding is a few tokens at the end of a row and the unused slots of the last
call, instead of every class padded to a length bucket. The only shape choice
is the row count: `ROW_FRACTIONS` of `rows_per_call` (3 programs), each call
taking the smallest that fits, so a run compiles at most 3 text programs per
(model, classes), and `precompile()` builds them in a background thread while
images are encoded and the first proposals are made.

A bidirectional text tower (SigLIP: every token sees the whole row, pads
included, and the last token is pooled) can neither share prefixes nor pack:
its *plain rows* mode gives each class sentence one row of the text length,
padded with the pad token exactly as the model was trained, pooled at the
row's last token (one segment per row, no prefix slots). The calls, the
shapes (`ROW_FRACTIONS`), the planning and the partials programs are the same,
so the program set stays as bounded.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import functools
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmbbo_jax import templates as templates_lib
from lmbbo_jax.evaluator import sharding
from lmbbo_jax.evaluator.tokens import TokenCache
from lmbbo_jax.models.clip import build_model

log = logging.getLogger(__name__)

# Prefix slot width. Tokens before the class name of LLM-written templates rarely
# exceed 15 ("A high-quality photograph of a" is 8 with the start token).
PREFIX_TOKENS = 16
# Row counts of the compiled calls, as fractions of rows_per_call: full calls,
# and smaller ones for the tail of a batch and for single templates.
ROW_FRACTIONS = (1 / 16, 1 / 4, 1)
# Tokens per segment besides the class name, for sizing prefix and segment
# slots (the rest of a typical template and the EOT).
_SEGMENT_EXTRA_TOKENS = 4
# Segment slots per call, over the segments the rows hold at the estimated length.
_SEGMENT_SLACK = 1.5
_NO_CLASS = np.iinfo(np.int32).max  # argmax tie-break sentinel: larger than any class


class TemplateTooLong(ValueError):
  pass


def l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True)
class CallShape:
  """One compiled program's sizes: token rows, prefix slots, segment slots."""
  rows: int
  slots: int
  segments: int


@dataclasses.dataclass
class PackedTemplate:
  """One template's class sentences laid out as prefix + packed rows (host side)."""
  prefix: np.ndarray  # int32 [p], p <= PREFIX_TOKENS
  row_ids: np.ndarray  # int32 [n, L]
  row_segment: np.ndarray  # int32 [n, L], segment start column (-1 = padding)
  row_pos: np.ndarray  # int32 [n, L]
  row_eot: list[np.ndarray]  # per row: int32 [k] EOT column of each segment
  row_classes: list[np.ndarray]  # per row: int32 [k] class of each segment
  tokens: int  # real tokens: the prefix once + all segments

  @property
  def num_rows(self) -> int:
    return len(self.row_ids)


def pack_segments(lengths: np.ndarray, width: int, open_rows: int = 8,
                  max_segments: int | None = None):
  """First-fit decreasing of segment lengths into rows of `width`, at most
  `max_segments` segments a row (a call's segment slots must hold a whole row).

  Returns (row, column) int32 [C, 2] per segment and the number of rows. Only
  the last `open_rows` rows are searched, so it stays linear in C.
  """
  place = np.zeros((len(lengths), 2), np.int32)
  free: list[int] = []
  count: list[int] = []
  cap = max_segments or len(lengths) or 1
  for c in np.argsort(-lengths, kind="stable"):
    n = int(lengths[c])
    row = next((r for r in range(max(0, len(free) - open_rows), len(free))
                if free[r] >= n and count[r] < cap), None)
    if row is None:
      free.append(width)
      count.append(0)
      row = len(free) - 1
    place[c] = (row, width - free[row])
    free[row] -= n
    count[row] += 1
  return place, len(free)


def plain_call_shapes(num_classes: int, rows_per_call: int,
                      shards: int) -> tuple[CallShape, ...]:
  """The fixed shape set of the plain rows mode (one segment per row, ascending rows):
  a call of R rows spans at most ceil(R / classes) + 1 templates."""
  shapes = {}
  for frac in ROW_FRACTIONS:
    rows = sharding.round_up(max(1, round(rows_per_call * frac)), shards)
    slots = min(rows, math.ceil(rows / max(num_classes, 1)) + 1)
    shapes[rows] = CallShape(rows, slots, sharding.round_up(rows, 8))
  return tuple(shapes[r] for r in sorted(shapes))


def call_shapes(num_classes: int, segment_tokens: float, width: int, rows_per_call: int,
                shards: int) -> tuple[CallShape, ...]:
  """The fixed shape set for a task (ascending rows).

  Prefix slots are sized for a quarter more than the templates a call of that
  many rows holds at `segment_tokens` per class, plus one (a call usually starts
  and ends inside a template); segment slots for `_SEGMENT_SLACK` times the
  segments of `segment_tokens` that fill the rows (every segment slot costs an
  image-matmul row, so they are not sized for the worst case: a call of shorter
  segments ends when its slots are used), and always for one full row of
  one-token segments, so any single row fits any shape.
  """
  rows_per_template = max(1.0, num_classes * segment_tokens / width)
  shapes = {}
  for frac in ROW_FRACTIONS:
    rows = sharding.round_up(max(1, round(rows_per_call * frac)), shards)
    slots = min(rows, math.ceil(1.25 * rows / rows_per_template) + 1)
    segments = max(min(slots * num_classes, math.ceil(_SEGMENT_SLACK * rows * width / segment_tokens)),
                   min(num_classes, width))
    shapes[rows] = CallShape(rows, slots, sharding.round_up(segments, 8))
  return tuple(shapes[r] for r in sorted(shapes))


_exiting = threading.Event()
_TRACING = threading.Lock()  # see PackedTextEncoder._build_program
_warming: "weakref.WeakSet[_Programs]" = weakref.WeakSet()


def stop_background_compiles() -> None:
  """Ends every encoder's ahead-of-time compiling after the compile in progress (programs
  not built yet compile when first used)."""
  for programs in list(_warming):
    programs.stop()


@atexit.register
def _finish_compiles() -> None:
  # A daemon thread killed inside an XLA compile aborts the interpreter: let the
  # compile in progress finish, start no other.
  _exiting.set()
  stop_background_compiles()


class _Programs:
  """Compiled executables by key: built once, ahead of time in a background thread
  (`warm`) or by the first caller that needs one; a caller whose program is being
  built waits for it. Thread-safe."""

  def __init__(self):
    self._lock = threading.Lock()
    self._futures: dict[Hashable, concurrent.futures.Future] = {}
    self.compiled = 0
    self.compile_s = 0.0
    self._thread: threading.Thread | None = None
    self._queue: queue.Queue = queue.Queue()

  def _claim(self, key) -> tuple[concurrent.futures.Future, bool]:
    with self._lock:
      fut = self._futures.get(key)
      if fut is not None:
        return fut, False
      fut = concurrent.futures.Future()
      self._futures[key] = fut
      return fut, True

  def _build(self, key, build: Callable[[], Any], fut) -> None:
    started = time.perf_counter()
    try:
      exe = build()
    except BaseException as e:  # The waiting caller re-raises it.
      fut.set_exception(e)
      return
    seconds = time.perf_counter() - started
    with self._lock:
      self.compiled += 1
      self.compile_s += seconds
    log.debug("text encoder: compiled %s in %.2f s", key, seconds)
    fut.set_result(exe)

  def get(self, key, build: Callable[[], Any]) -> tuple[Any, float]:
    """(executable, seconds this caller spent compiling or waiting for it)."""
    fut, mine = self._claim(key)
    if fut.done():
      return fut.result(), 0.0
    started = time.perf_counter()
    if mine:
      self._build(key, build, fut)
    exe = fut.result()
    return exe, time.perf_counter() - started

  def warm(self, jobs: Sequence[tuple[Hashable, Callable[[], Any]]]) -> None:
    """Queues `jobs` for the one background thread (one compile at a time, in order)."""
    with self._lock:
      for job in jobs:
        self._queue.put(job)
      if self._thread is None:
        self._thread = threading.Thread(target=self._work, name="lmbbo-precompile",
                                        daemon=True)
        _warming.add(self)
        self._thread.start()

  def _work(self) -> None:
    while not _exiting.is_set():
      job = self._queue.get()
      if job is None:
        return
      key, build = job
      fut, mine = self._claim(key)
      if mine:
        self._build(key, build, fut)

  def stop(self) -> None:
    """Ends the background thread after the compile in progress (queued jobs are dropped)."""
    thread = self._thread
    if thread is None:
      return
    while True:  # Drop what is queued; a caller that needs it compiles it itself.
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._queue.put(None)
    thread.join()
    with self._lock:
      self._thread = None

  def is_ready(self, key) -> bool:
    with self._lock:
      fut = self._futures.get(key)
    return fut is not None and fut.done()


class PackedTextEncoder:
  """Normalised text features of templates x class names in fixed-shape device calls.

  One encoder serves every scorer of the same (model, class names, mesh,
  dtype), e.g. all seeds of an experiment, so its programs compile once. A model
  whose text tower is not causal (SigLIP) is encoded in plain rows (module doc).
  """

  def __init__(self, clip: Any, class_names: Sequence[str], *, mesh=None, dtype=None,
               rows_per_call: int | None = None, prefix_tokens: int = PREFIX_TOKENS):
    """Args:
      clip: a `lmbbo_jax.models.api.CLIP`.
      class_names: the task's class names in label order.
      mesh: device mesh (default: all devices).
      dtype: compute dtype of the text tower (default: the CLIP's).
      rows_per_call: token rows (of the text context each) of the largest call;
        default 32 on CPU (about 2.5k tokens, cache-sized), 1024 on accelerators.
      prefix_tokens: prefix slot width.
    """
    self.clip = clip
    self.class_names = [str(c) for c in class_names]
    self.num_classes = len(self.class_names)
    self.mesh = mesh if mesh is not None else sharding.make_mesh()
    self.dtype = jnp.dtype(dtype) if dtype is not None else clip.dtype
    self.context_length = clip.context_length
    self.width = self.context_length
    self.plain = not clip.config.text_causal
    self.prefix_tokens = 0 if self.plain else min(prefix_tokens, self.context_length)
    self.tokenizer = clip.tokenizer
    self.tokens = TokenCache(self.tokenizer, self.class_names)
    on_cpu = self.mesh.devices.flat[0].platform == "cpu"
    self.rows_per_call = rows_per_call or (32 if on_cpu else 1024)
    shards = sharding.num_shards(self.mesh)
    if self.plain:
      self.shapes = plain_call_shapes(self.num_classes, self.rows_per_call, shards)
    else:
      name_tokens = (float(np.mean([len(ids) for ids in self.tokens.name_ids]))
                     if self.num_classes else 1.0)
      self.shapes = call_shapes(self.num_classes, name_tokens + _SEGMENT_EXTRA_TOKENS,
                                self.width, self.rows_per_call, shards)
    self.programs = _Programs()
    self._frame = clip.frame
    self._model = build_model(clip.config, self.dtype)
    # Every top-level parameter but the image tower (the model's setup declares them all).
    text_params = {k: v for k, v in clip.variables["params"].items() if k != "visual"}
    self._text_vars = sharding.put_replicated({"params": text_params}, self.mesh)
    self._encode = jax.jit(self._plain_step if self.plain else self._encode_step)

  def stats(self) -> dict[str, Any]:
    """Programs compiled (in any thread, background included), their compile seconds,
    and the fixed call shapes as (rows, prefix slots, segment slots) tuples."""
    return {"compiles": self.programs.compiled, "compile_s": self.programs.compile_s,
            "call_shapes": [dataclasses.astuple(shape) for shape in self.shapes]}

  # -- the program -------------------------------------------------------------------
  def _encode_step(self, variables, prefix_ids, prefix_len, row_ids, row_prefix,
                   row_segment, row_pos, eot_flat):
    text = self._model.apply(variables, prefix_ids, prefix_len, row_ids, row_prefix,
                             row_segment, row_pos, eot_flat, method="encode_text_packed")
    return self._gathered(text)

  def _plain_step(self, variables, row_ids, eot_flat):
    return self._gathered(self._model.apply(variables, row_ids, eot_flat,
                                            method="encode_text_rows"))

  def _gathered(self, text):
    # Gathered before the image matmul (images are split over the mesh).
    return jax.lax.with_sharding_constraint(l2_normalize(text),
                                            sharding.replicated(self.mesh))

  def _input_specs(self, shape: CallShape):
    rep, mesh = sharding.replicated(self.mesh), self.mesh
    rows2 = sharding.sharded_along(mesh, 2, 0)
    rows1 = sharding.sharded_along(mesh, 1, 0)
    i32 = jnp.int32
    if self.plain:
      return (jax.ShapeDtypeStruct((shape.rows, self.width), i32, sharding=rows2),
              jax.ShapeDtypeStruct((shape.segments,), i32, sharding=rep))
    return (jax.ShapeDtypeStruct((shape.slots, self.prefix_tokens), i32, sharding=rep),
            jax.ShapeDtypeStruct((shape.slots,), i32, sharding=rep),
            jax.ShapeDtypeStruct((shape.rows, self.width), i32, sharding=rows2),
            jax.ShapeDtypeStruct((shape.rows,), i32, sharding=rows1),
            jax.ShapeDtypeStruct((shape.rows, self.width), i32, sharding=rows2),
            jax.ShapeDtypeStruct((shape.rows, self.width), i32, sharding=rows2),
            jax.ShapeDtypeStruct((shape.segments,), i32, sharding=rep))

  def _build_program(self, shape: CallShape):
    # Tracing runs flax's module code, which is not thread-safe: two encoders tracing the
    # same tower classes at once (their background threads) once raised "dictionary changed
    # size during iteration" inside flax. Tracing is serialised; compiling is not.
    with _TRACING:
      lowered = self._encode.lower(self._text_vars, *self._input_specs(shape))
    return lowered.compile()

  def program(self, shape: CallShape) -> tuple[Any, float]:
    return self.programs.get(("text", shape), functools.partial(self._build_program, shape))

  def precompile(self, extra: Sequence[tuple[Hashable, Callable[[], Any]]] = ()) -> None:
    """Compiles every text program (smallest first: the first template needs it) and
    then `extra` jobs, in the background thread."""
    jobs = [(("text", s), functools.partial(self._build_program, s)) for s in self.shapes]
    self.programs.warm(jobs + list(extra))

  # -- preparation ---------------------------------------------------------------------
  def pack(self, template: str) -> PackedTemplate | str:
    """The template's packed layout (or plain rows), or why it cannot be encoded."""
    reason = templates_lib.invalid_reason(template)
    if reason:
      return reason
    rows = [self._frame(r) for r in self.tokens.sentences(template)]
    lengths = np.array([len(r) for r in rows], np.int32)
    worst = int(lengths.argmax())
    if lengths[worst] > self.context_length:
      return (f"too long: {int(lengths[worst])} tokens with class "
              f"{self.class_names[worst]!r} (context {self.context_length}); shorten it")
    return self._layout(rows, np.arange(len(rows), dtype=np.int32))

  def _sentence_rows(self, sentences: Sequence[str]) -> list[list[int]]:
    if not sentences:
      return []
    return [self._frame(ids) for ids in self.tokenizer.encode_batch(list(sentences))]

  def _too_long(self, sentence: str, row: Sequence[int]) -> str:
    return (f"too long: {len(row)} tokens in {sentence[:60]!r} (context "
            f"{self.context_length}); shorten it")

  def sentence_reasons(self, sentences: Sequence[str]) -> list[str | None]:
    """Per literal sentence, why it cannot be encoded (too long), or None."""
    return [self._too_long(s, r) if len(r) > self.context_length else None
            for s, r in zip(sentences, self._sentence_rows(sentences))]

  def pack_sentences(self, groups: Sequence[Sequence[str]]
                     ) -> tuple[list[PackedTemplate], dict[int, str]]:
    """Literal sentences (no `{}` slots: class descriptions) laid out for `plan`.

    Each segment's label is its sentence's index in the flattened `groups`. A group
    (e.g. one class's descriptions, "a photo of a dog, which has ...") shares the token
    prefix its sentences share, in one prefix slot; groups that share no more than the
    start token are packed together. Plain mode: one layout of plain rows. Returns the
    layouts and, by index, why a sentence was left out (too long; never truncated).
    """
    flat = [s for g in groups for s in g]
    rows = self._sentence_rows(flat)
    rejected = {i: self._too_long(flat[i], r) for i, r in enumerate(rows)
                if len(r) > self.context_length}
    labels = np.array([i for i in range(len(flat)) if i not in rejected], np.int32)
    if not len(labels):
      return [], rejected
    if self.plain:
      return [self._layout([rows[i] for i in labels], labels)], rejected
    start_tokens = 0 if self.tokenizer.sot_token_id is None else 1
    out, pooled, at = [], [], 0
    for group in groups:
      members = np.array([i for i in range(at, at + len(group)) if i not in rejected], np.int32)
      at += len(group)
      if len(members) > 1:
        prep = self._layout([rows[i] for i in members], members)
        if len(prep.prefix) > start_tokens:
          out.append(prep)
          continue
      pooled.extend(members)
    if pooled:
      out.append(self._layout([rows[i] for i in pooled], np.asarray(pooled, np.int32)))
    return out, rejected

  def _padded(self, rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
    ids = np.full((len(rows), width), self.tokenizer.pad_token_id, np.int32)
    for c, r in enumerate(rows):
      ids[c, :len(r)] = r
    return ids

  def _layout(self, rows: Sequence[Sequence[int]], labels: np.ndarray) -> PackedTemplate:
    """Framed sentences (each <= the context) as shared prefix + packed segments, or plain
    rows; each segment carries its sentence's label (a template's: the class)."""
    lengths = np.array([len(r) for r in rows], np.int32)
    if self.plain:
      return self._plain_rows(self._padded(rows, self.context_length), labels)
    ids = self._padded(rows, int(lengths.max()))
    # Shared prefix: equal columns from the start, leaving every sentence >= 1 own token.
    upto = min(int(lengths.min()) - 1, self.prefix_tokens)
    same = (ids[:, :upto] == ids[0, :upto]).all(axis=0)
    plen = int(upto if same.all() else same.argmin())
    seg_len = lengths - plen
    # Identical sentences (ImageNet has two "crane"s) share one segment: computed once,
    # and tied exactly, so ties go to the lowest class.
    first: dict[bytes, int] = {}
    same_as = np.array([first.setdefault(ids[c, :lengths[c]].tobytes(), c)
                        for c in range(len(rows))], np.int32)
    uniq = np.flatnonzero(same_as == np.arange(len(rows)))
    place = np.zeros((len(rows), 2), np.int32)
    place[uniq], n_rows = pack_segments(seg_len[uniq], self.width,
                                        max_segments=self.shapes[-1].segments)
    width = self.width
    row_ids = np.full((n_rows, width), self.tokenizer.pad_token_id, np.int32)
    row_segment = np.full((n_rows, width), -1, np.int32)
    row_pos = np.zeros((n_rows, width), np.int32)
    per_row: list[list[tuple[int, int]]] = [[] for _ in range(n_rows)]
    for c in range(len(rows)):
      r, col = (int(v) for v in place[same_as[c]])
      n = int(seg_len[c])
      if same_as[c] == c:
        row_ids[r, col:col + n] = ids[c, plen:plen + n]
        row_segment[r, col:col + n] = col
        row_pos[r, col:col + n] = np.arange(plen, plen + n)
      per_row[r].append((col + n - 1, int(labels[c])))
    row_eot = [np.array([e for e, _ in seg], np.int32) for seg in per_row]
    row_classes = [np.array([c for _, c in seg], np.int32) for seg in per_row]
    return PackedTemplate(ids[0, :plen].copy(), row_ids, row_segment, row_pos, row_eot,
                          row_classes, int(plen + seg_len[uniq].sum()))

  def _plain_rows(self, ids: np.ndarray, labels: np.ndarray) -> PackedTemplate:
    """One padded row per distinct sentence, pooled at its last column (the plain mode)."""
    first: dict[bytes, int] = {}
    same_as = [first.setdefault(row.tobytes(), c) for c, row in enumerate(ids)]
    uniq = sorted(first.values())
    row_of = {c: r for r, c in enumerate(uniq)}
    width = self.width
    row_classes = [[] for _ in uniq]
    for c, s in enumerate(same_as):  # Identical sentences share a row, tied exactly.
      row_classes[row_of[s]].append(int(labels[c]))
    return PackedTemplate(
        prefix=np.zeros((0,), np.int32), row_ids=ids[uniq],
        row_segment=np.zeros((len(uniq), width), np.int32),
        row_pos=np.broadcast_to(np.arange(width, dtype=np.int32), (len(uniq), width)),
        row_eot=[np.full((len(cs),), width - 1, np.int32) for cs in row_classes],
        row_classes=[np.array(cs, np.int32) for cs in row_classes],
        tokens=len(uniq) * width)

  # -- planning --------------------------------------------------------------------------
  def plan(self, templates: Sequence[PackedTemplate]):
    """Groups the templates' rows into calls: yields (shape, [(template index, row)]).

    Each call takes the largest shape whose rows the remaining work fills (the
    smallest at the end), and as many rows as fit its slots, so a 12-row batch
    runs as 8 + 2 + 2 rows rather than padded to 32.
    """
    work = [(t, r) for t, prep in enumerate(templates) for r in range(prep.num_rows)]
    at = 0
    while at < len(work):
      left = len(work) - at
      shape = next((s for s in reversed(self.shapes) if s.rows <= left), self.shapes[0])
      call: list[tuple[int, int]] = []
      slots: set[int] = set()
      segments = 0
      while at < len(work) and len(call) < shape.rows:
        t, r = work[at]
        k = len(templates[t].row_classes[r])
        if k > shape.segments and not call:
          shape = next((s for s in self.shapes if s.segments >= k), None)
          if shape is None:
            raise ValueError(f"one token row holds {k} classes, more than a call's "
                             f"{self.shapes[-1].segments} segment slots (many duplicate "
                             f"class names?)")
        if len(slots | {t}) > shape.slots or segments + k > shape.segments:
          break
        call.append((t, r))
        slots.add(t)
        segments += k
        at += 1
      yield shape, call

  def call_arrays(self, shape: CallShape, templates: Sequence[PackedTemplate],
                  call: Sequence[tuple[int, int]]):
    """Host arrays of one call and its segment table (class, template) per segment slot."""
    pad = self.tokenizer.pad_token_id
    p, width = self.prefix_tokens, self.width
    prefix_ids = np.full((shape.slots, p), pad, np.int32)
    prefix_len = np.ones((shape.slots,), np.int32)
    row_ids = np.full((shape.rows, width), pad, np.int32)
    row_prefix = np.zeros((shape.rows,), np.int32)
    row_segment = np.full((shape.rows, width), -1, np.int32)
    row_pos = np.zeros((shape.rows, width), np.int32)
    eot_flat = np.zeros((shape.segments,), np.int32)
    seg_class = np.full((shape.segments,), -1, np.int32)
    seg_template = np.full((shape.segments,), -1, np.int32)
    slot_of: dict[int, int] = {}
    at = 0
    for i, (t, r) in enumerate(call):
      prep = templates[t]
      slot = slot_of.get(t)
      if slot is None:
        slot = slot_of[t] = len(slot_of)
        prefix_ids[slot, :len(prep.prefix)] = prep.prefix
        prefix_len[slot] = len(prep.prefix)
      row_ids[i] = prep.row_ids[r]
      row_prefix[i] = slot
      row_segment[i] = prep.row_segment[r]
      row_pos[i] = prep.row_pos[r]
      k = len(prep.row_classes[r])
      eot_flat[at:at + k] = i * width + prep.row_eot[r]
      seg_class[at:at + k] = prep.row_classes[r]
      seg_template[at:at + k] = t
      at += k
    seg_slot = np.array([slot_of.get(int(t), shape.slots) for t in seg_template], np.int32)
    if self.plain:
      arrays = (row_ids, eot_flat)
    else:
      arrays = (prefix_ids, prefix_len, row_ids, row_prefix, row_segment, row_pos, eot_flat)
    return arrays, seg_class, seg_slot, {s: t for t, s in slot_of.items()}

  def place(self, arrays):
    rep = functools.partial(sharding.put_replicated, mesh=self.mesh)
    rows = functools.partial(sharding.put_sharded, mesh=self.mesh)
    if self.plain:
      row_ids, eot_flat = arrays
      return rows(row_ids), rep(eot_flat)
    prefix_ids, prefix_len, row_ids, row_prefix, row_segment, row_pos, eot_flat = arrays
    return (rep(prefix_ids), rep(prefix_len), rows(row_ids), rows(row_prefix),
            rows(row_segment), rows(row_pos), rep(eot_flat))

  def run(self, shape: CallShape, placed) -> tuple[jax.Array, float]:
    """(normalised text features [segments, E] on the device, seconds spent compiling)."""
    exe, waited = self.program(shape)
    return exe(self._text_vars, *placed), waited

  def cost(self, shape: CallShape) -> tuple[int, int, int]:
    """(token rows, attention keys, pooled tokens) one call of `shape` executes (the
    last layer's output projection and MLP run for the pooled tokens only)."""
    p, width = self.prefix_tokens, self.width
    if self.plain:  # every token of a row sees the whole row
      return shape.rows * width, shape.rows * width * width, shape.segments
    rows = shape.slots * p + shape.rows * width
    keys = shape.slots * p * p + shape.rows * width * (p + width)
    return rows, keys, shape.segments
