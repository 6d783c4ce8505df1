"""`PromptScorer`: few-shot accuracy of prompt templates, one jitted text encode + matmul.

How one `score(templates)` call runs:
1. Each template is validated (`templates.invalid_reason`), filled with every
   class name by plain substitution and tokenized (`tokens.TokenCache`
   assembles ids from cached pieces where that is exact). Templates longer than
   the text context for some class are rejected, never truncated.
2. `text_encoder.PackedTextEncoder` lays each template out as its shared prefix
   plus its classes' segments packed into rows of the text context, and groups
   the rows of all templates into calls of a fixed shape set (3 row counts per
   (model, classes), compiled ahead of time in a background thread).
3. Per call, a second small program multiplies the normalised class features
   with all images of all splits and reduces over each template's classes in
   the call to per-image partial results (the 5 best logits and their classes,
   log-sum-exp, true-class logit). The host merges the partials of a template's
   calls into exact top-1 and top-5 accuracy, mean per-class recall,
   log-probability and the most frequent confusions per split (`metrics.py`).

Arrays are placed on a 1-D device mesh: images split over the data axis, token
rows split over the same axis, weights replicated.

SigLIP: its text rows are encoded one sentence per row (the encoder's plain
rows mode, same programs). Accuracy is the argmax of its logits
exp(logit_scale) * cosine + logit_bias over the classes; the log-probability is
the log-softmax over the classes of those logits, the same reduction as
CLIP's. The bias, one constant for every class, cancels in both, so the
partials use the scale alone. (SigLIP trains each pair's sigmoid; the
log-softmax is the multi-class reading of the same logits, the one
`CLIP_benchmark` and transformers' zero-shot examples rank by, and it keeps one
partials program for both families.)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmbbo_jax import templates as templates_lib
from lmbbo_jax.evaluator import metrics, sharding
from lmbbo_jax.evaluator.text_encoder import (_NO_CLASS, CallShape, PackedTemplate,
                                              PackedTextEncoder, l2_normalize)
from lmbbo_jax.evaluator.types import METRICS, Score

log = logging.getLogger(__name__)

# How `score_descriptions` turns a class's sentences into its score (see there).
DESCRIPTION_MODES = ("mean_embedding", "mean_logit")


class ScorerError(ValueError):
  """Bad input to the scorer (the message says what to change)."""


@dataclasses.dataclass
class _Partial:
  """Per-image partial results of one template over some of its classes (host).

  top, top_class: [TOP_K, N] the best logits among these classes, best first, and their
  classes (-inf and _NO_CLASS past the last class); lse, true: [N].
  """
  top: np.ndarray
  top_class: np.ndarray
  lse: np.ndarray
  true: np.ndarray


def _segment_partials(text, seg_class, seg_slot, images, labels, scale, *, num_slots,
                      top_k=metrics.TOP_K):
  """Per-image reductions of the logits over each slot's segments (classes).

  Args:
    text: float32 [M, E] normalised class features, one per segment.
    seg_class: int32 [M], the class of each segment (-1 = padding).
    seg_slot: int32 [M], the slot (template) of each segment, in 0..num_slots
      (num_slots = padding).
    images: float32 [N, E] normalised image features.
    labels: int32 [N] (-1 = padding image).
    scale: float32 scalar logit scale.
    top_k: K, how many of each slot's highest logits to keep (1: top-1 only).

  Returns:
    top [S, K, N] (the K highest scaled logits of each slot, best first; -inf
    past the slot's last class), top_class [S, K, N] (their classes,
    the lowest index first among equal logits; _NO_CLASS past the last), lse
    [S, N] (log-sum-exp of the scaled logits), true [S, N] (scaled logit of the
    true class if the slot has it, else -inf), S = num_slots.
  """
  n = num_slots + 1
  valid = seg_class >= 0
  slot = jnp.where(valid, seg_slot, num_slots)
  logits = scale * jnp.einsum("me,ne->mn", text, images, preferred_element_type=jnp.float32)
  logits = jnp.where(valid[:, None], logits, -jnp.inf)
  # The top K by K rounds of (max, its lowest class, take that class out); a class has
  # one segment per slot.
  top, top_class, rest = [], [], logits
  for _ in range(top_k):
    best = jax.ops.segment_max(rest, slot, n)
    at_best = (rest == best[slot]) & (rest > -jnp.inf)
    best_class = jax.ops.segment_min(jnp.where(at_best, seg_class[:, None], _NO_CLASS),
                                     slot, n)
    top.append(best)
    top_class.append(best_class)
    rest = jnp.where(seg_class[:, None] == best_class[slot], -jnp.inf, rest)
  best = top[0]
  safe = jnp.where(jnp.isfinite(best), best, 0.0)
  lse = safe + jnp.log(jax.ops.segment_sum(jnp.exp(logits - safe[slot]), slot, n))
  is_true = seg_class[:, None] == labels[None, :]
  true = jax.ops.segment_max(jnp.where(is_true, logits, -jnp.inf), slot, n)
  return (jnp.stack(top, 1)[:num_slots], jnp.stack(top_class, 1)[:num_slots],
          lse[:num_slots], true[:num_slots])


segment_partials = jax.jit(_segment_partials, static_argnames=("num_slots", "top_k"))


class PromptScorer:
  """Scores prompt templates by few-shot CLIP accuracy (see module doc).

  Thread-safe: calls are serialised by a lock (the device is one resource).
  """

  def __init__(self, clip: Any, features_by_split: Mapping[str, Any],
               labels_by_split: Mapping[str, Any], class_names: Sequence[str], *,
               mesh: jax.sharding.Mesh | None = None, dtype: Any = None,
               per_class: bool = False, text_encoder: PackedTextEncoder | None = None,
               rows_per_call: int | None = None, precompile: bool = True,
               acc5: bool = True):
    """Places the image features on the mesh and starts compiling in the background.

    Args:
      clip: a `lmbbo_jax.models.api.CLIP`.
      features_by_split: split -> float [N, E] image features (normalised here).
      labels_by_split: split -> int [N] labels; rows with label -1 are ignored
        (padding, unreadable images).
      class_names: the task's class names in label order.
      mesh: device mesh (default: all devices, or the text encoder's).
      dtype: compute dtype of the text tower (default: the CLIP's).
      per_class: also report per-class accuracy per split.
      text_encoder: a `PackedTextEncoder` for these class names to share (e.g.
        across seeds, so its programs compile once); default: a new one.
      rows_per_call: the new encoder's largest call (see PackedTextEncoder).
      precompile: compile every program ahead of time in a background thread.
      acc5: also report top-5 accuracy (the partials program then runs 5 rounds of
        per-slot max instead of 1; False: `Score.acc5` stays empty).
    """
    if not class_names:
      raise ScorerError("no class names; the task must have at least one class")
    if set(features_by_split) != set(labels_by_split):
      raise ScorerError(f"features splits {sorted(features_by_split)} != labels splits "
                        f"{sorted(labels_by_split)}; pass both for the same splits")
    if text_encoder is not None and list(text_encoder.class_names) != [str(c) for c in class_names]:
      raise ScorerError("the shared text encoder was built for other class names; "
                        "build one per task's class names")
    self.clip = clip
    self.class_names = [str(c) for c in class_names]
    self.num_classes = len(self.class_names)
    self.per_class = per_class
    self._top_k = metrics.TOP_K if acc5 else 1
    if text_encoder is None:
      text_encoder = PackedTextEncoder(clip, self.class_names, mesh=mesh, dtype=dtype,
                                       rows_per_call=rows_per_call)
    self.text_encoder = text_encoder
    self.mesh = text_encoder.mesh
    self.dtype = text_encoder.dtype
    self.context_length = clip.context_length
    self.logit_scale = float(clip.logit_scale)
    self.tokenizer = clip.tokenizer
    self.tokens = text_encoder.tokens
    self._load_images(features_by_split, labels_by_split)
    self._prepared: collections.OrderedDict[str, PackedTemplate | str] = collections.OrderedDict()
    self._lock = threading.Lock()
    self._prep_lock = threading.Lock()
    self._stats = collections.Counter()
    self._front = None
    # Set on process 0 of a several-process search (`multihost.Lockstep.call`): each
    # device call is announced first, so that the other processes run it too.
    self.lockstep = None
    if precompile:
      self.precompile()

  def _announced(self, op: str, **args):
    return self.lockstep(op, args) if self.lockstep is not None else contextlib.nullcontext()

  # -- images ------------------------------------------------------------------------
  def _load_images(self, features_by_split, labels_by_split) -> None:
    """All splits' features as one normalised array sharded over the mesh.

    Device-resident features (`encode_task`'s) are joined, padded and
    normalised on the devices, with no trip through the host.
    """
    parts, labels, self.splits = [], [], {}
    start = 0
    for split in features_by_split:
      f = features_by_split[split]
      if not isinstance(f, jax.Array):
        f = np.asarray(f, np.float32)
      y = np.asarray(labels_by_split[split], np.int32).reshape(-1)
      if f.ndim != 2 or f.shape[0] != y.shape[0] or f.shape[1] != self.clip.embed_dim:
        raise ScorerError(f"split {split!r}: features {f.shape} and labels {y.shape} must be "
                          f"[N, {self.clip.embed_dim}] and [N]")
      if y.size and (y.max() >= self.num_classes or y.min() < -1):
        raise ScorerError(f"split {split!r}: labels must be in -1..{self.num_classes - 1}")
      parts.append(f)
      labels.append(y)
      self.splits[split] = (start, start + len(y))
      start += len(y)
    # Image rows of each split, and of "train_val": the joined train and val images (the
    # selection split of select_by="train_val"; not the mean of the two, which would
    # over-weight val when it has fewer images per class than train).
    self._split_rows = {k: np.arange(lo, hi) for k, (lo, hi) in self.splits.items()}
    if "train" in self.splits and "val" in self.splits:
      self._split_rows["train_val"] = np.concatenate(
          [self._split_rows["train"], self._split_rows["val"]])
    n = sharding.round_up(max(start, 1), sharding.num_shards(self.mesh))
    y = np.full((n,), -1, np.int32)
    if start:
      y[:start] = np.concatenate(labels)

    def assemble(*xs):
      x = (jnp.concatenate([a.astype(jnp.float32) for a in xs]) if xs
           else jnp.zeros((0, self.clip.embed_dim), jnp.float32))
      return l2_normalize(jnp.pad(x, ((0, n - start), (0, 0))))

    on_mesh = sharding.sharded_along(self.mesh, 2)
    mesh_devices = set(self.mesh.devices.flat)
    # Arrays on other devices than the mesh's go through the host once.
    parts = [f if isinstance(f, np.ndarray) or f.sharding.device_set <= mesh_devices
             else np.asarray(f, np.float32) for f in parts]
    self._images = jax.jit(assemble, out_shardings=on_mesh)(*parts)
    self._labels = y
    self._labels_dev = sharding.put_sharded(y, self.mesh)
    self.num_images = start

  # -- programs ----------------------------------------------------------------------
  def _partials_key(self, shape: CallShape):
    return ("partials", shape.segments, shape.slots, len(self._labels), self._top_k)

  def _build_partials(self, shape: CallShape):
    rep = sharding.replicated(self.mesh)
    e = self.clip.embed_dim
    program = segment_partials
    if not rep.is_fully_addressable:  # Several processes: every host reads the results.
      program = jax.jit(_segment_partials, static_argnames=("num_slots", "top_k"),
                        out_shardings=(rep,) * 4)
    return program.lower(
        jax.ShapeDtypeStruct((shape.segments, e), jnp.float32, sharding=rep),
        jax.ShapeDtypeStruct((shape.segments,), jnp.int32, sharding=rep),
        jax.ShapeDtypeStruct((shape.segments,), jnp.int32, sharding=rep),
        self._images, self._labels_dev, jnp.float32(self.logit_scale),
        num_slots=shape.slots, top_k=self._top_k).compile()

  def _partials_program(self, shape: CallShape):
    return self.text_encoder.programs.get(self._partials_key(shape),
                                          functools.partial(self._build_partials, shape))

  def precompile(self) -> None:
    """Compiles every text and partials program in the encoder's background thread."""
    extra = [(self._partials_key(s), functools.partial(self._build_partials, s))
             for s in self.text_encoder.shapes]
    self.text_encoder.precompile(extra)

  # -- validation & preparation ----------------------------------------------------
  def rejection_reason(self, template: str) -> str | None:
    """Why `template` cannot be scored (format or context length), or None."""
    prepared = self._prepare(template)
    return prepared if isinstance(prepared, str) else None

  def _prepare(self, template: str) -> PackedTemplate | str:
    # Own short lock: the event loop may validate while a worker thread scores.
    with self._prep_lock:
      found = self._prepared.get(template)
      if found is not None:
        self._prepared.move_to_end(template)
        return found
      prepared = self.text_encoder.pack(template)
      self._prepared[template] = prepared
      if len(self._prepared) > 256:
        self._prepared.popitem(last=False)
      return prepared

  # -- running calls -------------------------------------------------------------------
  def _run(self, preps: list[PackedTemplate], encode_only: bool = False):
    """Runs every row of `preps`.

    Returns, per template index, a list of _Partial (score) or of
    (classes, features [k, E]) pairs (encode_only).
    """
    enc = self.text_encoder
    scale = jnp.float32(self.logit_scale)
    pending = []
    for shape, call in enc.plan(preps):
      arrays, seg_class, seg_slot, template_of = enc.call_arrays(shape, preps, call)
      text, waited = enc.run(shape, enc.place(arrays))
      if encode_only:
        out = text
      else:
        fn, waited_p = self._partials_program(shape)
        waited += waited_p
        out = fn(text, sharding.put_replicated(seg_class, self.mesh),
                 sharding.put_replicated(seg_slot, self.mesh), self._images,
                 self._labels_dev, scale)
      self._stats["seconds_compile"] += waited
      rows, keys, pooled = enc.cost(shape)
      self._stats["token_rows"] += rows
      self._stats["attention_keys"] += keys
      self._stats["pooled_tokens"] += pooled
      self._stats["calls"] += 1
      pending.append((out, seg_class, seg_slot, template_of))
    results: dict[int, list] = collections.defaultdict(list)
    for out, seg_class, seg_slot, template_of in pending:
      if encode_only:
        feats = sharding.to_host(out)
        for slot, t in template_of.items():
          keep = (seg_slot == slot) & (seg_class >= 0)
          results[t].append((seg_class[keep], feats[keep]))
      else:
        top, top_class, lse, true = (sharding.to_host(a) for a in out)
        for slot, t in template_of.items():
          results[t].append(_Partial(top[slot], top_class[slot], lse[slot], true[slot]))
    for prep in preps:
      self._stats["token_rows_real"] += prep.tokens
    return results

  # -- merging ---------------------------------------------------------------------------
  def _merge(self, template: str, partials: list[_Partial]) -> Score:
    top = np.concatenate([p.top for p in partials])  # [calls * TOP_K, N]
    top_class = np.concatenate([p.top_class for p in partials])
    pred = np.where(top == top.max(axis=0), top_class, _NO_CLASS).min(axis=0)
    lse = np.logaddexp.reduce(np.stack([p.lse for p in partials]).astype(np.float64), axis=0)
    true = np.stack([p.true for p in partials]).max(axis=0)
    logp = true.astype(np.float64) - lse
    # CLIP_benchmark has no acc5 below 5 classes.
    top_hit = (metrics.top_k_hits(top, top_class, true, self._labels)
               if self._top_k == metrics.TOP_K and self.num_classes >= metrics.TOP_K
               else None)
    by_metric: dict[str, dict[str, float]] = {name: {} for name in METRICS}
    logprob, per_class, confusions = {}, {}, {}
    for split, rows in self._split_rows.items():
      y = self._labels[rows]
      keep = y >= 0
      y = y[keep]
      values = metrics.split_metrics(pred[rows][keep], None if top_hit is None
                                     else top_hit[rows][keep], y, self.num_classes)
      for name, value in values.items():
        by_metric[name][split] = value
      logprob[split] = float(logp[rows][keep].mean()) if y.size else float("nan")
      if split != "test":  # Feedback reads the selection splits; test is the largest.
        confusions[split] = metrics.top_confusions(pred[rows][keep], y, self.num_classes)
      if self.per_class:  # train_val too: the front reads the selection split
        correct = pred[rows][keep] == y
        hits = np.bincount(y, weights=correct, minlength=self.num_classes)
        counts = np.bincount(y, minlength=self.num_classes)
        with np.errstate(invalid="ignore", divide="ignore"):
          per_class[split] = [float(v) for v in hits / counts]
    return Score(template, logprob=logprob, per_class=per_class if self.per_class else None,
                 confusions=confusions, **by_metric)

  # -- public API ------------------------------------------------------------------------
  def score(self, templates: Sequence[str]) -> list[Score]:
    """Accuracy and log-probability per split for each template (see module doc).

    Invalid or too long templates come back as `Score(rejected=reason)`.
    Duplicates are scored once.
    """
    if isinstance(templates, str):
      raise ScorerError("score() takes a list of templates, not one string")
    with self._announced("score", templates=list(templates)), self._lock:
      started = time.perf_counter()
      prepared = {t: self._prepare(t) for t in templates if isinstance(t, str)}
      ok = {t: p for t, p in prepared.items() if not isinstance(p, str)}
      order = list(ok)
      ran = time.perf_counter()
      results = self._run([ok[t] for t in order])
      index = {t: i for i, t in enumerate(order)}
      merged = time.perf_counter()
      out = []
      for t in templates:
        p = prepared.get(t) if isinstance(t, str) else templates_lib.invalid_reason(t)
        if isinstance(p, str):
          out.append(Score(t if isinstance(t, str) else repr(t), rejected=p))
        else:
          out.append(self._merge(t, results[index[t]]))
      self._stats["templates"] += len(ok)
      self._stats["rejected"] += sum(1 for s in out if not s.ok)
      self._stats["score_calls"] += 1
      done = time.perf_counter()
      self._stats["seconds_busy"] += done - started
      self._stats["seconds_prepare"] += ran - started  # tokenize, prefix, pack
      self._stats["seconds_device"] += merged - ran  # plan, host arrays, dispatch, wait
      self._stats["seconds_merge"] += done - merged
    return out

  def text_features(self, templates: Sequence[str]) -> np.ndarray:
    """float32 [T, C, E] normalised class features of valid templates (raises otherwise)."""
    with self._announced("text_features", templates=list(templates)), self._lock:
      return self._text_features(templates)

  def _text_features(self, templates: Sequence[str]) -> np.ndarray:
    preps = []
    for t in templates:
      p = self._prepare(t)
      if isinstance(p, str):
        raise ScorerError(f"template {t!r} cannot be encoded: {p}")
      preps.append(p)
    uniq = list({id(p): p for p in preps}.values())
    results = self._run(uniq, encode_only=True)
    index = {id(p): i for i, p in enumerate(uniq)}
    out = np.zeros((len(preps), self.num_classes, self.clip.embed_dim), np.float32)
    for i, p in enumerate(preps):
      for classes, feats in results[index[id(p)]]:
        out[i, classes] = feats
    return out

  def score_ensemble(self, groups: Sequence[Sequence[str]]) -> list[Score]:
    """Scores each group of templates as one classifier.

    A class's weight is the mean of its normalised text features over the
    group's templates, renormalised (CLIP's prompt ensembling). A group with an
    invalid template is rejected with that template's reason.
    """
    with self._announced("score_ensemble", groups=[list(g) for g in groups]), self._lock:
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

  def score_descriptions(self, sets: Sequence[Sequence[Sequence[str]]],
                         mode: str = "mean_embedding",
                         names: Sequence[str] | None = None) -> list[Score]:
    """Scores each set of class descriptions (per class, in label order, its literal
    sentences: no `{}` slots) as one classifier.

    mode "mean_embedding": a class's weight is the normalised mean of its sentences'
    normalised features (CLIP's ensembling, as CuPL uses it); "mean_logit": a class's
    score is the mean over its sentences of the image-sentence logit (DCLIP), which is
    the logit of the unnormalised mean feature (the logit is linear in the text feature;
    SigLIP's bias is the same for every sentence and cancels), so both modes run as class
    weights through `_run_weights`. All sets' distinct sentences are encoded together
    (each class's sentences share their token prefix) in the task's fixed call shapes.
    A set with a class without sentences, or with a sentence that cannot be encoded,
    is rejected with the reason. `names` label the Scores (default descriptions[i]).
    """
    if mode not in DESCRIPTION_MODES:
      raise ScorerError(f"mode {mode!r}: use one of {', '.join(DESCRIPTION_MODES)}")
    if isinstance(sets, str) or (sets and sets[0] and isinstance(sets[0][0], str)):
      raise ScorerError("score_descriptions() takes a list of description sets, each a list "
                        "of per-class sentence lists")
    names = list(names) if names is not None else [f"descriptions[{i}]" for i in range(len(sets))]
    if len(names) != len(sets):
      raise ScorerError(f"{len(names)} names for {len(sets)} description sets")
    with self._announced("score_descriptions", sets=[[list(c) for c in d] for d in sets],
                         mode=mode, names=names), self._lock:
      started = time.perf_counter()
      out: list[Score | None] = [None] * len(sets)
      index: dict[str, int] = {}  # distinct sentence -> its row in `feats`
      groups: list[list[str]] = [[] for _ in range(self.num_classes)]
      for i, per_class in enumerate(sets):
        reason = self._descriptions_reason(per_class)
        if reason:
          out[i] = Score(names[i], rejected=reason)
          continue
        for c, sentences in enumerate(per_class):
          for sentence in sentences:
            if sentence not in index:
              index[sentence] = len(index)
              groups[c].append(sentence)
      order = [s for g in groups for s in g]  # `index` renumbered by group
      index = {s: i for i, s in enumerate(order)}
      feats, too_long = self._sentence_features(groups)
      good = []
      for i, per_class in enumerate(sets):
        if out[i] is not None:
          continue
        bad = next((too_long[index[s]] for c in per_class for s in c if index[s] in too_long),
                   None)
        if bad:
          out[i] = Score(names[i], rejected=bad)
          continue
        good.append(i)
        self._stats["description_sentences"] += sum(len(c) for c in per_class)
      if good:
        weights = np.stack([
            np.stack([feats[[index[s] for s in c]].astype(np.float64).mean(axis=0)
                      for c in sets[i]]) for i in good])
        if mode == "mean_embedding":
          weights /= np.maximum(np.linalg.norm(weights, axis=-1, keepdims=True), 1e-12)
        partials = self._run_weights(weights.astype(np.float32))
        for k, i in enumerate(good):
          out[i] = self._merge(names[i], partials[k])
      self._stats["description_sets"] += len(good)
      self._stats["seconds_busy"] += time.perf_counter() - started
    return out  # type: ignore[return-value]

  def sentence_reasons(self, sentences: Sequence[str]) -> list[str | None]:
    """Per literal sentence, why `score_descriptions` cannot encode it (too long), or None."""
    return self.text_encoder.sentence_reasons(sentences)

  def sentence_features(self, groups: Sequence[Sequence[str]]) -> np.ndarray:
    """float32 [S, E] normalised features of the literal sentences of `groups` (flattened
    in order; a group's sentences share their token prefix); raises if one cannot be
    encoded."""
    groups = [list(g) for g in groups]
    with self._announced("sentence_features", groups=groups), self._lock:
      feats, too_long = self._sentence_features(groups)
    if too_long:
      raise ScorerError(next(iter(too_long.values())))
    return feats

  def _sentence_features(self, groups: Sequence[Sequence[str]]):
    preps, too_long = self.text_encoder.pack_sentences(groups)
    feats = np.zeros((sum(len(g) for g in groups), self.clip.embed_dim), np.float32)
    for parts in self._run(preps, encode_only=True).values():
      for labels, f in parts:
        feats[labels] = f
    return feats, too_long

  def _descriptions_reason(self, per_class: Sequence[Sequence[str]]) -> str | None:
    if len(per_class) != self.num_classes:
      return f"{len(per_class)} classes of descriptions for {self.num_classes} classes"
    for c, sentences in enumerate(per_class):
      if isinstance(sentences, str) or not sentences:
        return f"class {self.class_names[c]!r} has no list of sentences"
      if not all(isinstance(s, str) for s in sentences):
        return f"class {self.class_names[c]!r}: every description must be a string"
    return None

  def _run_weights(self, weights: np.ndarray) -> list[list[_Partial]]:
    """Partials of classifiers given directly as class weights [G, C, E].

    Runs through the partials programs of the text calls (same segment and slot
    counts), so ensembles compile nothing of their own.
    """
    shape = self.text_encoder.shapes[-1]
    fn, waited = self._partials_program(shape)
    self._stats["seconds_compile"] += waited
    scale = jnp.float32(self.logit_scale)
    work = [(g, c) for g in range(len(weights)) for c in range(self.num_classes)]
    per_call = min(shape.segments, shape.slots * self.num_classes)
    results: list[list[_Partial]] = [[] for _ in weights]
    at = 0
    while at < len(work):
      text = np.zeros((shape.segments, weights.shape[-1]), np.float32)
      seg_class = np.full((shape.segments,), -1, np.int32)
      seg_slot = np.full((shape.segments,), shape.slots, np.int32)
      slot_of: dict[int, int] = {}
      m = 0
      while at < len(work) and m < per_call:
        g, c = work[at]
        if g not in slot_of:
          if len(slot_of) == shape.slots:  # More groups than slots: the next call.
            break
          slot_of[g] = len(slot_of)
        text[m], seg_class[m], seg_slot[m] = weights[g, c], c, slot_of[g]
        m += 1
        at += 1
      rep = functools.partial(sharding.put_replicated, mesh=self.mesh)
      out = fn(rep(text), rep(seg_class), rep(seg_slot), self._images, self._labels_dev, scale)
      top, top_class, lse, true = (np.asarray(a) for a in out)
      for g, slot in slot_of.items():
        results[g].append(_Partial(top[slot], top_class[slot], lse[slot], true[slot]))
      self._stats["calls"] += 1
    return results

  async def score_async(self, templates: Sequence[str]) -> list[Score]:
    """`score` for asyncio callers, coalesced with concurrent calls (see front.py)."""
    # Imported where first needed: synchronous callers never load asyncio's front.
    from lmbbo_jax.evaluator.front import ScoringFront
    if self._front is None:
      self._front = ScoringFront(self)
    return await self._front.score_async(templates)

  @property
  def front(self):
    """The async front of `score_async` (busy intervals, `aclose`), None until first used."""
    return self._front

  @property
  def preferred_batch(self) -> int:
    """Templates per `score` call that fill the device calls well."""
    return max(1, self.text_encoder.shapes[-1].slots // 2)

  def stats(self) -> dict[str, float]:
    """Counters for throughput reports.

    templates (valid templates scored), rejected, ensembles, description_sets and
    description_sentences (`score_descriptions`: classifiers, their sentences), score_calls,
    calls (device calls), seconds_busy (wall time inside score/score_ensemble;
    of score's: seconds_prepare for tokenization and packing, seconds_device
    for the device calls, seconds_merge for merging partials on the host),
    seconds_compile (of seconds_busy: compiling, or waiting for the background
    compile), compiles and compile_s_total (programs of the text encoder, which
    scorers may share, and their compile time in any thread, background
    included), call_shapes (the encoder's fixed call shapes), busy_intervals
    ((start, end) wall times of the async front's scoring calls), token_rows (executed, with padding),
    token_rows_real (without padding), gflops_text (executed, by
    `TextConfig.flops`), gflops_images (image-text matmuls), and the
    token cache's assembled/whole sentence counts.
    """
    s = dict(self._stats)
    s["compiles"] = self.text_encoder.programs.compiled  # Never reset: programs stay.
    s["compile_s_total"] = self.text_encoder.programs.compile_s
    s.update({f"sentences_{k}": v for k, v in self.tokens.stats.items()})
    s["gflops_text"] = self.clip.config.text.flops(
        s.get("token_rows", 0), s.get("attention_keys", 0), s.get("pooled_tokens", 0)) / 1e9
    s["gflops_images"] = (2 * len(self._labels) * self.clip.embed_dim * self.num_classes
                          * (s.get("templates", 0) + s.get("ensembles", 0)
                             + s.get("description_sets", 0))) / 1e9
    for key in ("templates", "rejected", "ensembles", "score_calls", "calls", "compiles",
                "seconds_busy", "seconds_compile", "token_rows", "token_rows_real"):
      s.setdefault(key, 0)
    s["call_shapes"] = [dataclasses.asdict(shape) for shape in self.text_encoder.shapes]
    s["busy_intervals"] = list(self._front.intervals) if self._front is not None else []
    return s

  def clear_caches(self) -> None:
    """Forgets prepared templates and cached piece tokens (benchmarks: cold tokenization)."""
    with self._prep_lock:
      self._prepared.clear()
      self.tokens.clear()

  def wait_compiled(self) -> None:
    """Blocks until every program is compiled (benchmarks: steady state)."""
    for shape in self.text_encoder.shapes:
      self.text_encoder.program(shape)
      self._partials_program(shape)

  def close(self) -> None:
    """Stops compiling ahead of time (idempotent); the scorer still scores, compiling on use."""
    self.text_encoder.programs.stop()

  async def aclose(self) -> None:
    """Closes the async front of `score_async`, if it was used (pending calls finish)."""
    if self._front is not None:
      front, self._front = self._front, None  # A later score_async starts a new one.
      await front.aclose()

  def reset_stats(self) -> None:
    self._stats.clear()
    self.tokens.stats.clear()
