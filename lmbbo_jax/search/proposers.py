"""Proposers: where new templates come from (LLM, edits, or a recorded run).

* `LLMProposer`: the paper's method. Shows the chat LLM the chain's best
  (positive) and worst (negative) templates, parses and validates the reply;
  single-turn (a fresh message every iteration, as the official code) or
  multi-turn (the conversation grows with numeric feedback, as the paper's
  Figure 1; a reset starts a new conversation from the current pool).
* `APEProposer` / `IterativeAPEProposer`: the black-box baselines of APE (Zhou
  et al., ICLR 2023): the best of an LLM-written pool (fresh requests, unranked
  examples, no scores), and its iterative form that asks for semantic
  variations of the current top templates (no scores, no negatives).
* `EditProposer`: GrIPS-style edits (delete, swap, insert, replace of words or
  short phrases) and crossover of top templates, seeded by the chain's RNG;
  no network. The default without an LLM and the "is the LLM needed?" ablation.
* `ReplayProposer`: proposes what a recorded `transcript.jsonl` accepted at the
  same (chain, reset, iteration), e.g. to re-score a run with another model.
"""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

from absl import logging

from lmbbo_jax import templates as tpl
from lmbbo_jax.llm.errors import LLMRetriesExhausted
from lmbbo_jax.search import meta_prompts as mp
from lmbbo_jax.search import parsing
from lmbbo_jax.search import runlog
from lmbbo_jax.evaluator.types import TOP_CONFUSIONS
from lmbbo_jax.search.state import (ChainState, EvalRecord, Proposal, pareto_front,
                                    record_chain, selection_entry)

FEEDBACK_MODES = ("pos_neg", "pos", "neg", "confusion", "none")
# A class name as the LLM reads it, at most this long (names are untrusted text).
_CLASS_NAME_CHARS = 60
# Classes listed per template in a merge request.
_MERGE_CLASSES = 5
CONVERSATIONS = ("single_turn", "multi_turn")
REPLY_FORMATS = ("lines", "json")


# A template as words around one `{}`, an optional full stop at the end. No
# quote or backslash can occur, so llama.cpp's grammar cannot swallow the JSON
# around the string, and a small model cannot fill it with symbols or URLs.
_WORD = "[A-Za-z][A-Za-z'-]{0,19}"  # a word of at most 20 letters


def template_pattern(max_words: int) -> str:
  """A regex for templates of at most `max_words` words besides the slot.

  The bound is joint (words before plus words after), spelled out as one
  alternative per split so that a grammar built from it enforces it.
  """
  splits = "|".join(f"({_WORD},? ){{{before}}}[{{][}}](,? {_WORD}){{0,{max_words - before}}}"
                    for before in range(max_words + 1))
  return f"^({splits})[.]?$"


def reply_schema(n: int, max_words: int = 14) -> dict:
  """JSON schema of a reply holding exactly `n` templates (see `template_pattern`)."""
  return {"type": "object",
          "properties": {"templates": {
              "type": "array", "minItems": n, "maxItems": n,
              "items": {"type": "string", "pattern": template_pattern(max_words)}}},
          "required": ["templates"], "additionalProperties": False}


def _plural(n: int) -> str:
  return "template" if n == 1 else "templates"


def _count_values(m: int) -> dict[str, str]:
  """Slot values for how many templates are asked for ("one template")."""
  return {"n_new": "one" if m == 1 else str(m), "templates_word": _plural(m)}


def _rejection_rows(rejections: Sequence[tuple[str, str]]) -> list[dict]:
  return [{"template": t, "reason": r} for t, r in rejections]


class LLMProposer:
  """Asks a chat LLM for better templates (see module docstring).

  Args:
    client: an `LLMClient` (anything with `async chat(messages, *, chain_id,
      call_key)` returning an object with text/call_id/cached/usage/latency_s).
    config: the `SearchConfig` (k_pos, k_neg, m_new, show_scores, feedback,
      conversation, max_failed_attempts, max_template_chars).
    meta_prompts: the wording (data).
  """

  name = "llm"

  def __init__(self, client: Any, config: Any,
               meta_prompts: mp.MetaPrompts = mp.DEFAULT_META_PROMPTS):
    if config.feedback not in FEEDBACK_MODES:
      raise ValueError(f"feedback={config.feedback!r} not in {FEEDBACK_MODES}")
    if config.conversation not in CONVERSATIONS:
      raise ValueError(
          f"conversation={config.conversation!r} not in {CONVERSATIONS}")
    self.client = client
    self.config = config
    self.mp = meta_prompts

  # --- message building -------------------------------------------------------
  def _items(self, state: ChainState, records: Sequence[EvalRecord]) -> str:
    lines = []
    for r in records:
      if self.config.show_scores:
        lines.append(mp.render(self.mp.item_with_score, {
            "template": r.template, "score": mp.percent(state.value(r))}))
      else:
        lines.append(mp.render(self.mp.item, {"template": r.template}))
    return "\n".join(lines)

  def positives_negatives(self, state: ChainState
                          ) -> tuple[list[EvalRecord], list[EvalRecord]]:
    """Top-k (best first) and bottom-k (worst first), disjoint."""
    ranked = state.ranked()
    fb = self.config.feedback
    k_pos = self.config.k_pos if fb in ("pos_neg", "pos", "confusion") else 0
    k_neg = self.config.k_neg if fb in ("pos_neg", "neg", "confusion") else 0
    pos = ranked[:k_pos]
    rest = ranked[len(pos):]
    neg = list(reversed(rest))[:k_neg]
    return pos, neg

  @property
  def n_ask(self) -> int:
    """Templates asked for per call (`m_ask`, at least `m_new`)."""
    return max(self.config.m_new, getattr(self.config, "m_ask", 0) or 0)

  @property
  def json_replies(self) -> bool:
    return getattr(self.config, "reply_format", "lines") == "json"

  @property
  def max_words(self) -> int:
    return getattr(self.config, "max_template_words", 14)

  def requirements(self) -> str:
    return mp.render(self.mp.requirements_json if self.json_replies
                     else self.mp.requirements,
                     {**_count_values(self.n_ask), "max_words": str(self.max_words + 1)})

  def first_turn(self, state: ChainState) -> str:
    """The first user message of a conversation (or the single-turn message)."""
    pos, neg = self.positives_negatives(state)
    state.first_reference = state.value(pos[0]) if pos else None
    common = _count_values(self.n_ask)
    values = {
        **common,
        "score_note": self.mp.score_note if self.config.show_scores else "",
        "positives_block": mp.render(self.mp.positives_block,
                                     {"positives": self._items(state, pos)}),
        "negatives_block": mp.render(self.mp.negatives_block,
                                     {"negatives": self._items(state, neg)}),
        "requirements": self.requirements(),
    }
    if self.config.feedback == "confusion":
      values["confusions_block"] = self.confusions_block(state, pos)
    return mp.render(self.mp.first_turn[self.config.feedback], values)

  def _class_name(self, state: ChainState, index: int) -> str:
    names = state.class_names
    name = str(names[index]) if 0 <= index < len(names) else f"class {index}"
    return name[:_CLASS_NAME_CHARS]

  def confusions(self, records: Sequence[EvalRecord], select_by: str
                 ) -> list[tuple[int, int, int]]:
    """The class pairs `records` confuse most on the selection split (never test):
    (true class, predicted class, count), the counts of each record's reported pairs
    (`Score.confusions`: its most frequent ones) added up over the records, most
    frequent first, equal counts in (true, predicted) order; `TOP_CONFUSIONS` of them."""
    counts: dict[tuple[int, int], int] = {}
    for r in records:
      for true, pred, n in selection_entry(r.confusions, select_by) or ():
        counts[(int(true), int(pred))] = counts.get((int(true), int(pred)), 0) + int(n)
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_CONFUSIONS]
    return [(t, p, n) for (t, p), n in ordered]

  def confusions_block(self, state: ChainState, records: Sequence[EvalRecord]) -> str:
    """The confusion feedback about `records` (the templates that work well)."""
    pairs = self.confusions(records, self.config.select_by)
    if not pairs:
      return self.mp.no_confusions
    return mp.render(self.mp.confusions_block, {"confusions": "\n".join(
        mp.render(self.mp.confusion_item, {
            "true": self._class_name(state, t), "predicted": self._class_name(state, p),
            "count": str(n), "times_word": "time" if n == 1 else "times"})
        for t, p, n in pairs)})

  # --- the merge step (`SearchConfig.merge_every`) -----------------------------
  def merge_parents(self, state: ChainState) -> tuple[EvalRecord, EvalRecord] | None:
    """The two front members a merge call combines, or None (no merge this call).

    A merge call is every `merge_every`-th call of a conversation. Its parents are
    the chain's best front member (`state.pareto_front`, ranked by the selection
    rule) and the member better than it on the most classes (ties: the better
    ranked); None when the front has fewer than two members.
    """
    every = getattr(self.config, "merge_every", 0)
    if not every or (state.iteration + 1) % every:
      return None
    cfg = self.config
    front = pareto_front(state.pool, cfg.select_by, cfg.tie_break, cfg.select_metric)
    if len(front) < 2:
      return None
    first = front[0]
    gains = [sum(b > a for a, b in zip(self._per_class(first), self._per_class(r)))
             for r in front[1:]]
    return first, front[1 + max(range(len(gains)), key=lambda i: (gains[i], -i))]

  def _per_class(self, record: EvalRecord) -> list[float]:
    return [-1.0 if v != v else v  # NaN: a class without images
            for v in selection_entry(record.per_class or {}, self.config.select_by)]

  def merge_message(self, state: ChainState, first: EvalRecord, second: EvalRecord) -> str:
    """Asks for templates that combine `first` and `second`, naming the classes each
    is more accurate on (selection split)."""
    a, b = self._per_class(first), self._per_class(second)

    def item(record, wins):
      classes = ", ".join(f"\"{self._class_name(state, c)}\"" for c in wins[:_MERGE_CLASSES])
      more = len(wins) - _MERGE_CLASSES
      return mp.render(self.mp.merge_item, {
          "template": record.template,
          "classes": (classes + (f" and {more} more" if more > 0 else "")) or "-"})

    return mp.render(self.mp.merge, {
        **_count_values(self.n_ask), "requirements": self.requirements(),
        "first": item(first, [c for c, (x, y) in enumerate(zip(a, b)) if x > y]),
        "second": item(second, [c for c, (x, y) in enumerate(zip(a, b)) if y > x])})

  def rejected_list(self, rejections: Sequence[tuple[str, str]]) -> str:
    """The model-facing list of rejected templates and why (data, not format)."""
    words = self.mp.rejection_words
    seen, lines = set(), []
    for template, reason in rejections:
      kind = parsing.reason_kind(reason)
      if kind == "extra" or (template, kind) in seen:
        continue
      seen.add((template, kind))
      lines.append(mp.render(self.mp.rejected_item, {
          "template": template[:120],
          "reason": words.get(kind, words.get("other", reason))}))
    return "\n".join(lines)

  def retry_message(self, rejections: Sequence[tuple[str, str]]) -> str:
    """The follow-up after a reply with no usable template."""
    listed = self.rejected_list(rejections)
    if not listed:
      return mp.render(self.mp.retry_unreadable,
                       {"requirements": self.requirements()})
    return mp.render(self.mp.retry_rejected, {"rejected_list": listed,
                                              "requirements": self.requirements()})

  def feedback(self, state: ChainState) -> str:
    """The follow-up user message after the last turn (multi-turn)."""
    text = self._score_feedback(state)
    if self.config.feedback == "confusion":
      pos, _ = self.positives_negatives(state)
      text += "\n\n" + self.confusions_block(state, pos)
    rejections = state.turns[-1].rejections
    if getattr(self.config, "rejection_feedback", True) and rejections:
      listed = self.rejected_list(rejections)
      if listed:
        text = mp.render(self.mp.rejected_block,
                         {"rejected_list": listed}) + "\n\n" + text
    return text

  def _score_feedback(self, state: ChainState) -> str:
    last = state.turns[-1]
    common = _count_values(self.n_ask)
    if self.config.feedback == "none":
      return mp.render(self.mp.feedback_no_scores, common)
    ok = [r for r in last.records if r.ok]
    if not ok:
      reason = next((r.rejected for r in last.records if r.rejected),
                    "not scorable")
      return mp.render(self.mp.feedback_rejected, {**common, "reason": reason})
    best = max(state.value(r) for r in ok)
    if len(state.turns) >= 2:
      prev_ok = [r for r in state.turns[-2].records if r.ok]
      reference = (max(state.value(r) for r in prev_ok) if prev_ok
                   else state.first_reference)
    else:
      reference = state.first_reference
    improved = reference is None or best > reference
    text = mp.render(self.mp.feedback_improved if improved
                     else self.mp.feedback_dropped,
                     {**common, "score": mp.percent(best)})
    if len(last.records) > 1:
      scored = "\n".join(
          mp.render(self.mp.item_with_score,
                    {"template": r.template,
                     "score": mp.percent(state.value(r)) if r.ok
                     else "not scorable"})
          for r in last.records)
      text = mp.render(self.mp.feedback_scores_header,
                       {"scored_list": scored}) + "\n\n" + text
    return text

  def build_messages(self, state: ChainState) -> list[dict]:
    """The request for the current iteration of `state`: a merge call is one fresh
    message (a multi-turn conversation continues from it); else the first turn or
    the conversation so far with its feedback."""
    parents = self.merge_parents(state)
    if parents is not None:
      return self._fresh(self.merge_message(state, *parents))
    if self.config.conversation == "multi_turn" and state.turns:
      last = state.turns[-1]
      return [*last.messages, {"role": "assistant", "content": last.reply},
              {"role": "user", "content": self.feedback(state)}]
    return self._fresh(self.first_turn(state))

  def _fresh(self, text: str) -> list[dict]:
    """A new conversation: the system message, if any, and `text`."""
    messages = [{"role": "system", "content": self.mp.system}] if self.mp.system else []
    return [*messages, {"role": "user", "content": text}]

  # --- proposing --------------------------------------------------------------
  async def propose(self, state: ChainState) -> Proposal:
    """Asks for `m_ask` templates and keeps at most `m_new` valid new ones.

    A reply with no usable template is answered, within the same iteration,
    with what was wrong with each of its templates (`rejection_feedback`), and
    the model tries again, up to `max_failed_attempts` replies.
    """
    messages = self.build_messages(state)
    parents = self.merge_parents(state)
    out = Proposal(templates=[], messages=messages)
    schema = reply_schema(self.n_ask, self.max_words) if self.json_replies else None
    feedback_on = getattr(self.config, "rejection_feedback", True)
    instructions = parsing.instruction_text(messages, (r.template for r in state.pool))
    request = messages
    for attempt in range(self.config.max_failed_attempts):
      entry = {"kind": "attempt", "chain": state.chain, "reset": state.reset,
               "iteration": state.iteration, "attempt": attempt,
               "proposer": self.name}
      if parents is not None:
        entry["merge_parents"] = [r.template for r in parents]
      call_key = f"r{state.reset}-i{state.iteration}-a{attempt}"
      try:
        result = await self.client.chat(request, chain_id=state.chain_key,
                                        call_key=call_key,
                                        response_schema=schema)
      except LLMRetriesExhausted as e:
        out.failed_attempts += 1
        out.llm_errors += 1
        logging.warning("%s chain %d r%d i%d: LLM call failed: %s",
                        state.label, state.chain, state.reset, state.iteration, e)
        state.log_transcript({**entry, "messages": request, "error": str(e)})
        continue
      out.llm_calls += 1
      out.cached_calls += int(result.cached)
      out.requested += self.n_ask
      out.truncated += int(result.finish_reason == "length")
      out.queue_s += result.queue_s
      out.latency_s += result.latency_s
      # A refusal, tool calls or an empty reply was billed but holds nothing
      # to parse: its reason is recorded as the reply's rejection.
      reply_text = result.text if result.outcome == "text" else ""
      reading = await parsing.read_reply_off_loop(reply_text)
      check = parsing.validate(
          reading.candidates, seen=state.seen,
          context_check=state.context_check, max_new=self.config.m_new,
          max_chars=self.config.max_template_chars, instructions=instructions)
      check.rejections[:0] = reading.rejections  # caps hit while reading the reply
      if result.reason:
        check.rejections.insert(0, (result.text[:120], result.reason))
      extra = sum(1 for _, r in check.rejections
                  if parsing.reason_kind(r) == "extra")
      out.valid_candidates += len(check.valid) + extra
      for cand, reason in check.rejections:
        logging.debug("%s chain %d r%d i%d: rejected %r: %s", state.label,
                     state.chain, state.reset, state.iteration, cand, reason)
      out.rejections.extend(check.rejections)
      state.log_transcript({
          **entry, "call_id": result.call_id, "cached": result.cached,
          "messages": request, "reply": result.text,
          "accepted": check.valid,
          "rejections": _rejection_rows(check.rejections),
          "finish_reason": result.finish_reason, "outcome": result.outcome,
          "structured": result.structured,
          "usage": result.usage, "latency_s": round(result.latency_s, 4),
          "queue_s": round(result.queue_s, 4)})
      if check.valid:
        out.templates = check.valid
        out.call_id = result.call_id
        out.raw_text = result.text
        out.reply_rejections = [(t, r) for t, r in check.rejections
                                if parsing.reason_kind(r) != "extra"]
        return out
      out.failed_attempts += 1
      logging.debug("%s chain %d r%d i%d attempt %d: reply had no valid "
                   "template.", state.label, state.chain, state.reset,
                   state.iteration, attempt)
      if feedback_on:
        request = [*request, {"role": "assistant", "content": result.text},
                   {"role": "user", "content": self.retry_message(
                       check.rejections)}]
    return out


class APEProposer(LLMProposer):
  """APE as a proposer: every call a fresh request, its pool's best is the pick.

  The request shows `k_pos` templates drawn at random (seeded per chain, reset
  and iteration) from the chain's initial pool as unranked examples of the
  task's templates, with no score and no negative, and asks for `m_ask` new
  ones; the selection rule picks the best of everything scored, as APE picks
  the best of its candidates. The conversation setting does not apply.
  """

  name = "ape"

  def _examples(self, state: ChainState) -> list[EvalRecord]:
    initial = [r for r in state.pool if r.step == 0]
    rng = random.Random(f"ape-{state.config.seed}-{state.chain}-{state.reset}-"
                        f"{state.iteration}")
    return rng.sample(initial, min(max(1, self.config.k_pos), len(initial)))

  def generation_message(self, state: ChainState) -> str:
    return mp.render(self.mp.ape_generate, {
        **_count_values(self.n_ask), "requirements": self.requirements(),
        "examples": "\n".join(mp.render(self.mp.item, {"template": r.template})
                              for r in self._examples(state))})

  def build_messages(self, state: ChainState) -> list[dict]:
    return self._fresh(self.generation_message(state))


class IterativeAPEProposer(APEProposer):
  """Iterative APE: generate as APE for the first half of a chain's calls, then
  ask for semantic variations of the chain's current top `k_pos` templates
  (ranked by the selection rule, shown without scores; no negatives)."""

  name = "iterative_ape"

  def resampling(self, state: ChainState) -> bool:
    calls = self.config.n_reset * self.config.n_iter
    return state.reset * self.config.n_iter + state.iteration >= (calls + 1) // 2

  def build_messages(self, state: ChainState) -> list[dict]:
    if not self.resampling(state):
      return super().build_messages(state)
    top = state.ranked()[:max(1, self.config.k_pos)]
    values = _count_values(self.n_ask)
    values["variations_word"] = "variation" if self.n_ask == 1 else "variations"
    return self._fresh(mp.render(self.mp.ape_resample, {
        **values, "requirements": self.requirements(),
        "examples": "\n".join(mp.render(self.mp.item, {"template": r.template})
                              for r in top)}))


LLM_PROPOSERS = {"llm": LLMProposer, "ape": APEProposer, "iterative_ape": IterativeAPEProposer}


# --- edit-based search (GrIPS-style) ------------------------------------------
# Generic words for insert/replace; the pool's own words are added per chain.
BUILTIN_WORDS = (
    "photo", "picture", "image", "clear", "bright", "natural", "detailed",
    "close-up", "high-quality", "blurry", "small", "large", "colorful", "real",
    "typical", "beautiful", "centered", "good", "sharp", "simple", "whole",
    "of", "a", "the", "with", "in", "on", "showing", "background", "view",
    "lighting", "style", "type", "kind", "object", "scene",
)
EDIT_OPS = ("delete", "swap", "insert", "replace", "crossover")
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]*")


def _tokens(template: str) -> list[str]:
  return template.split()


def _is_slot(token: str) -> bool:
  return tpl.SLOT in token


class EditProposer:
  """Word/phrase edits and crossover of the chain's top templates.

  Args:
    config: the `SearchConfig` (m_new, k_pos, select_by, max_template_chars).
    ops: edit operations to draw from (`EDIT_OPS`).
    max_phrase: longest phrase (in words) that delete/swap act on.
    max_tries: edits tried per iteration before giving up.
    vocabulary: extra words for insert/replace (added to `BUILTIN_WORDS`).
  """

  name = "edit"

  def __init__(self, config: Any, *, ops: Sequence[str] = EDIT_OPS,
               max_phrase: int = 3, max_tries: int = 100,
               vocabulary: Sequence[str] = ()):
    bad = set(ops) - set(EDIT_OPS)
    if bad:
      raise ValueError(f"unknown edit ops {sorted(bad)}; use {EDIT_OPS}")
    self.config = config
    self.ops = tuple(ops)
    self.max_phrase = max_phrase
    self.max_tries = max_tries
    self.vocabulary = tuple(vocabulary)

  def _vocab(self, state: ChainState) -> list[str]:
    words = set(BUILTIN_WORDS) | set(self.vocabulary)
    for r in state.pool:
      for w in _WORD_RE.findall(r.template.replace(tpl.SLOT, " ")):
        words.add(w.lower())
    return sorted(words)  # sorted: the draw must not depend on set order

  def _span(self, rng, toks: list[str]) -> tuple[int, int] | None:
    """A random phrase [i, j) of 1..max_phrase words holding no slot."""
    starts = [i for i, t in enumerate(toks) if not _is_slot(t)]
    if not starts:
      return None
    i = rng.choice(starts)
    j = i + 1
    limit = rng.randint(1, self.max_phrase)
    while j < len(toks) and j - i < limit and not _is_slot(toks[j]):
      j += 1
    return i, j

  def edit(self, op: str, parent: str, other: str, vocab: list[str],
           rng) -> str | None:
    """One edit of `parent` (`other` is the crossover partner)."""
    toks = _tokens(parent)
    if op == "delete":
      span = self._span(rng, toks)
      if span is None or span[1] - span[0] >= len(toks):
        return None
      toks = toks[:span[0]] + toks[span[1]:]
    elif op == "swap":
      if len(toks) < 2:
        return None
      a = self._span(rng, toks)
      b = self._span(rng, toks)
      if a is None or b is None or a == b:
        # Swapping the slot with a word moves the class name.
        i, j = rng.sample(range(len(toks)), 2)
        toks[i], toks[j] = toks[j], toks[i]
      else:
        (a0, a1), (b0, b1) = sorted([a, b])
        if a1 > b0:
          return None  # overlapping phrases
        toks = (toks[:a0] + toks[b0:b1] + toks[a1:b0] + toks[a0:a1]
                + toks[b1:])
    elif op == "insert":
      n = rng.randint(1, 2)
      pos = rng.randint(0, len(toks))
      toks = toks[:pos] + [rng.choice(vocab) for _ in range(n)] + toks[pos:]
    elif op == "replace":
      choices = [i for i, t in enumerate(toks) if not _is_slot(t)]
      if not choices:
        return None
      i = rng.choice(choices)
      toks[i] = rng.choice(vocab)
    elif op == "crossover":
      o = _tokens(other)
      ia = next((i for i, t in enumerate(toks) if _is_slot(t)), None)
      ib = next((i for i, t in enumerate(o) if _is_slot(t)), None)
      if ia is None or ib is None or parent == other:
        return None
      # Head of one parent up to its slot, slot and tail from the other.
      toks = toks[:ia] + o[ib:] if rng.random() < 0.5 else o[:ib] + toks[ia:]
    return " ".join(toks)

  async def propose(self, state: ChainState) -> Proposal:
    rng = state.rng
    ranked = state.ranked()
    parents = [r.template for r in ranked[:max(1, self.config.k_pos)]]
    if not parents:
      return Proposal(templates=[], failed_attempts=1)
    vocab = self._vocab(state)
    out: list[str] = []
    rejections: list[tuple[str, str]] = []
    local: set[str] = set()
    for _ in range(self.max_tries):
      op = rng.choice(self.ops)
      parent = rng.choice(parents)
      other = rng.choice(parents)
      child = self.edit(op, parent, other, vocab, rng)
      if child is None:
        continue
      check = parsing.validate([child], seen=state.seen | local,
                               context_check=state.context_check,
                               max_chars=self.config.max_template_chars)
      if check.valid:
        out.append(child)
        local.add(tpl.normalize(child))
        if len(out) >= self.config.m_new:
          break
      else:
        rejections.extend(check.rejections)
    state.log_transcript({
        "kind": "attempt", "chain": state.chain,
        "reset": state.reset, "iteration": state.iteration, "attempt": 0,
        "proposer": self.name, "accepted": out,
        "rejections": _rejection_rows(rejections[-20:])})
    return Proposal(templates=out, failed_attempts=0 if out else 1,
                    rejections=[r for r in rejections
                                if not r[1].startswith("duplicate")])


class ReplayProposer:
  """Re-proposes the templates a recorded transcript accepted, in place.

  Args:
    transcript: path of a transcript.jsonl (or its workdir), or its entries.
    chain_map: optional {new chain: recorded chain}; default identity.
    seed: with a run's merged transcript (entries carry a `seed` field), the
      few-shot seed whose entries are replayed.
  """

  name = "replay"

  def __init__(self, transcript: str | Sequence[dict], *,
               chain_map: dict[int, int] | None = None, seed: int | None = None):
    entries = (runlog.read_transcript(transcript)
               if isinstance(transcript, str) else list(transcript))
    if seed is not None and any("seed" in e for e in entries):
      entries = [e for e in entries if e.get("seed") == seed]
    self._by_pos: dict[tuple, dict] = {}
    for e in entries:
      if e.get("kind", "attempt") == "attempt" and e.get("accepted"):
        self._by_pos[(record_chain(e), e["reset"], e["iteration"])] = e
    if not self._by_pos:
      raise runlog.RunLogError("the transcript has no accepted templates to "
                               "replay.")
    self.chain_map = chain_map or {}

  async def propose(self, state: ChainState) -> Proposal:
    chain = self.chain_map.get(state.chain, state.chain)
    entry = self._by_pos.get((chain, state.reset, state.iteration))
    if entry is None:
      return Proposal(templates=[], failed_attempts=1)
    check = parsing.validate(entry["accepted"], seen=state.seen,
                             context_check=state.context_check,
                             max_chars=self.config_max_chars(state))
    state.log_transcript({
        "kind": "attempt", "chain": state.chain,
        "reset": state.reset, "iteration": state.iteration, "attempt": 0,
        "proposer": self.name, "call_id": entry.get("call_id"),
        "accepted": check.valid,
        "rejections": _rejection_rows(check.rejections)})
    return Proposal(templates=check.valid, call_id=entry.get("call_id"),
                    raw_text=entry.get("reply"),
                    messages=entry.get("messages"),
                    failed_attempts=0 if check.valid else 1,
                    rejections=check.rejections)

  @staticmethod
  def config_max_chars(state: ChainState) -> int:
    return getattr(state.config, "max_template_chars",
                   parsing.DEFAULT_MAX_CHARS)
