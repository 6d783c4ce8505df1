"""The paper's conversational hill-climbing, as concurrent, resumable chains.

Structure (the paper's Fig. 1 and the official code): `n_restart` chains run concurrently under
asyncio (one per restart). A chain samples its own initial pool from the
corpus with an RNG seeded from (seed, chain), scores it, then runs `n_reset`
conversations of `n_iter` iterations. Each iteration asks the proposer for
`m_new` templates, validates and scores them, and adds them to the chain's
pool; a reset clears the conversation but keeps the pool. All chains share the
scorer's async front (their evaluations are batched together by it) and a
memo, so a template two chains both propose is scored once.

Selection: by train accuracy (`select_by="train"`) or train+val
(`"train_val"`), or by the metric `select_metric` names (acc5, mean per-class
recall); equal accuracies rank by the same split's mean
log-probability (`tie_break="logprob"`) or not at all (`"none"`), then by the
earliest evaluation in the deterministic order (step, chain, seq): the one
rule, `state.selection_key`, used by the experiment and the report too.
Test accuracy is carried along for reporting and never read by the search.

Determinism and resume: a chain's trajectory depends only on (config, seed,
chain, corpus, scorer, LLM replies): it never reads another chain's state, its
RNG is its own, its LLM cache keys name (seed, chain, reset, iteration,
attempt), and its evaluations are numbered `seq` in a fixed order. A resumed
run re-executes every chain; evaluations already in prompts.jsonl are replayed
from the log (not re-scored) and LLM replies come from the response cache, so
after a kill -9 the run ends with the same evaluated set as an uninterrupted
one and repeats no answered LLM request.

Default hyper-parameters and why:
* k_pos = k_neg = 3, m_new = 1, n_iter = 10, init_pool_size = 80,
  single-turn, scores not shown, feedback pos_neg, selection by train: the
  official code's defaults (`--template_pool_size 3`, one template per call,
  `--num_iters 10`, 80 LAION-COCO samples, `method_1`, `--eval train`), the
  only setting whose values are verified (the paper's own n_restart/n_reset/
  n_iter/m/k values were not recoverable). Temperature 1 is the client's
  default (`LLMConfig.temperature`).
* n_restart = 1, n_reset = 1: the official code has neither loop. More
  restarts cost calls linearly but not wall time (chains run concurrently up to
  the client's `max_concurrency`), so raising n_restart is the cheap way to
  use the paper's restart idea; `PRESETS` has the paper-like variants.
* max_failed_attempts = 5 per iteration (the official code tries 15; with
  transport retries inside the client, 5 reply-level attempts suffice and
  bound the cost of a model that ignores the format), and a chain stops after
  max_skipped_iterations = 3 iterations in a row without a valid template.
* The ICLR version showed the top and bottom 15 (preset "iclr"); the paper's
  Figure 1 is multi-turn with numeric feedback (preset "paper_fig1").
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import random
import time
from typing import Any, Callable, Sequence

from absl import logging

from lmbbo_jax import templates as tpl
from lmbbo_jax.evaluator.types import Score
from lmbbo_jax.llm.errors import LLMBudgetExceeded
from lmbbo_jax.search import meta_prompts as mp
from lmbbo_jax.search import parsing
from lmbbo_jax.search import pool as pool_lib
from lmbbo_jax.search.proposers import (CONVERSATIONS, FEEDBACK_MODES, LLM_PROPOSERS,
                                        REPLY_FORMATS, EditProposer,
                                        LLMProposer, ReplayProposer)
from lmbbo_jax.search.runlog import RunLog
from lmbbo_jax.search.state import (SELECT_BY, SELECT_METRICS, SELECTIONS, TIE_BREAKS,
                                    ChainState, EvalRecord, Proposal, Proposer, SearchError,
                                    Turn, best_of, halving_survivors)
from lmbbo_jax.search.tracking import MetricWriter, SearchTracker


@dataclasses.dataclass
class SearchConfig:
  """Hyper-parameters of the search (the main job maps flags onto these).

  Attributes:
    n_restart: concurrent chains, each from a fresh initial sample.
    n_reset: conversations per chain; a reset clears the chat, keeps the pool.
    n_iter: LLM turns (iterations) per conversation.
    k_pos: best templates shown as positives.
    k_neg: worst templates shown as negatives.
    m_new: new templates scored per iteration, at most (m_ask sets how many are asked for).
    show_scores: show accuracies next to the listed templates.
    feedback: which lists the LLM sees: "pos_neg" (paper), "pos", "neg",
      "confusion" (P+N and the class pairs the best templates confuse most on the
      selection split, with counts, from the predictions alone), "none" (no scorer
      information at all, also no numeric feedback).
    conversation: "single_turn" (official code) or "multi_turn" (paper Fig. 1:
      numeric feedback after each turn).
    select_by: "train" or "train_val"; test accuracy is never used.
    tie_break: how equal accuracies rank ("logprob" or "none": accuracy
      only, the strict black box; `state.selection_key`).
    select_metric: the metric that selects and that the LLM is shown:
      "accuracy" (top-1, the paper's), "acc5" (top-5; tasks of 5 or more
      classes) or "mean_per_class_recall" (`state.SELECT_METRICS`).
    init_pool_size: initial templates sampled per chain.
    seed: seeds every chain's RNG (with the chain index) and the LLM cache keys.
    max_failed_attempts: proposer attempts per iteration that may yield no
      valid template before the iteration is skipped.
    max_skipped_iterations: a chain stops after this many skipped iterations
      in a row (e.g. a model that never follows the format).
    max_template_chars: longest accepted template.
    time_limit_s: stop the search cleanly after this long (None: no limit).
    m_ask: templates asked for per call (0: m_new). Asking for a few more
      than m_new leaves room for duplicates; at most m_new are scored.
    reply_format: "lines" (one per line, as the official code) or "json"
      (a {"templates": [...]} object, enforced by a schema where the
      server takes one).
    max_template_words: words besides the slot that a template may have: the
      meta-prompt asks for "under max_template_words + 1 words" (the official
      code: under 15) and the JSON reply schema enforces it.
    rejection_feedback: tell the model which templates of its reply were
      rejected and why (in the retry of a failed reply and in the next
      multi-turn feedback). Not in the official code, which resends the same
      request.
    merge_every: every merge_every-th call of a conversation (calls merge_every,
      2 * merge_every, ...) asks the LLM to merge two members of the chain's
      per-class Pareto front instead (proposers.pareto_front); 0: never.
    selection: which of a call's scored candidates enter the pool: "all", or
      "halving" (successive halving over the selection split then val; the others
      are logged, never selected: state.halving_survivors).
  """

  n_restart: int = 1
  n_reset: int = 1
  n_iter: int = 10
  k_pos: int = 3
  k_neg: int = 3
  m_new: int = 1
  show_scores: bool = False
  feedback: str = "pos_neg"
  conversation: str = "single_turn"
  select_by: str = "train"
  tie_break: str = "logprob"
  # Which metric selects: accuracy (paper), acc5 or mean_per_class_recall.
  select_metric: str = "accuracy"
  init_pool_size: int = 80
  seed: int = 0
  max_failed_attempts: int = 5
  max_skipped_iterations: int = 3
  max_template_chars: int = parsing.DEFAULT_MAX_CHARS
  time_limit_s: float | None = None
  m_ask: int = 0
  reply_format: str = "lines"
  rejection_feedback: bool = True
  max_template_words: int = 14
  merge_every: int = 0
  selection: str = "all"

  def validate(self) -> None:
    """Raises `SearchError` with a one-line fix for any bad value."""
    for name in ("n_restart", "n_reset", "n_iter", "m_new", "init_pool_size",
                 "max_failed_attempts", "max_skipped_iterations",
                 "max_template_words"):
      if getattr(self, name) < 1:
        raise SearchError(f"{name} must be at least 1 (got "
                          f"{getattr(self, name)}).")
    for name in ("k_pos", "k_neg", "merge_every"):
      if getattr(self, name) < 0:
        raise SearchError(f"{name} must be >= 0 (got {getattr(self, name)}).")
    if self.m_ask and self.m_ask < self.m_new:
      raise SearchError(f"m_ask={self.m_ask} must be 0 or at least m_new="
                        f"{self.m_new} (it asks for extra candidates).")
    for name, choices in (("feedback", FEEDBACK_MODES), ("conversation", CONVERSATIONS),
                          ("reply_format", REPLY_FORMATS), ("select_by", SELECT_BY),
                          ("tie_break", TIE_BREAKS), ("select_metric", SELECT_METRICS),
                          ("selection", SELECTIONS)):
      if getattr(self, name) not in choices:
        raise SearchError(f"{name}={getattr(self, name)!r}: use one of "
                          f"{', '.join(choices)}.")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# Named settings, as overrides of `SearchConfig`'s defaults (which are the
# official code's); `--preset=NAME` applies one and explicit flags win over it.
PRESETS: dict[str, dict[str, Any]] = {
    "official_code": {},
    # Fig. 1: one conversation with the new accuracy after each turn; the first
    # turn lists good and bad templates without scores; accuracy-only access
    # (no log-probability tie-break); restarts and resets as the text describes
    # them (their counts are not recovered, these are ours).
    "paper_fig1": dict(conversation="multi_turn", show_scores=False, tie_break="none",
                       n_restart=4, n_reset=2, n_iter=8),
    # The withdrawn ICLR version: the best 15 and worst 15 templates as feedback.
    "iclr": dict(k_pos=15, k_neg=15),
}


# Fields that may change between a run and its resume.
_RESUMABLE_CHANGES = ("time_limit_s",)
# Why a chain stopped (`SearchResult.chain_stop_reasons`).
STOP_REASONS = ("completed", "format_failures", "budget", "max_calls", "signal",
                "time_limit", "error")


def _new_chain_counts() -> dict[str, Any]:
  return {"llm_calls": 0, "cached_calls": 0, "llm_errors": 0,
          "templates_requested": 0, "valid_new": 0, "scored_new": 0,
          "failed_attempts": 0, "skipped_iterations": 0, "truncated": 0,
          "latency_s": 0.0, "queue_s": 0.0, "rejections": {}}


@dataclasses.dataclass
class SearchResult:
  """Outcome of `run_search`.

  Attributes:
    best / best_record: the selected template (selection rule above).
    initial_best / initial_best_record: the best of the initial pools.
    best_per_chain: chain -> its best record.
    records: every evaluation (all chains, rejected ones included), in the
      deterministic order (step, chain, seq).
    counts: evaluations, rejections by kind, failed attempts, skipped
      iterations, LLM calls, replayed evaluations, memo hits, ...
    stop_reason: "completed" when every chain ran its budget, else why the
      search (or its chains) stopped: "budget", "max_calls", "signal",
      "time_limit", or "format_failures" (a chain gave up after
      max_skipped_iterations iterations without a valid template).
    chain_stop_reasons: chain -> its own stop reason (`STOP_REASONS`).
    elapsed_s: wall time of this invocation.
    llm: the ledger summary when a ledger was given.
  """

  best: Score | None
  best_record: EvalRecord | None
  initial_best: Score | None
  initial_best_record: EvalRecord | None
  best_per_chain: dict[int, EvalRecord]
  records: list[EvalRecord]
  counts: dict[str, Any]
  stop_reason: str
  elapsed_s: float
  llm: dict | None = None
  chain_stop_reasons: dict[int, str] = dataclasses.field(default_factory=dict)

  def summary(self) -> dict[str, Any]:
    def rec(r):
      return None if r is None else {
          "template": r.template, "accuracy": r.accuracy, "logprob": r.logprob,
          "chain": r.chain, "step": r.step, "seq": r.seq}
    return {"best": rec(self.best_record),
            "initial_best": rec(self.initial_best_record),
            "counts": self.counts, "stop_reason": self.stop_reason,
            "chain_stop_reasons": {str(c): r for c, r in
                                   sorted(self.chain_stop_reasons.items())},
            "elapsed_s": round(self.elapsed_s, 3), "llm": self.llm}


def chain_seed(seed: int, chain: int) -> int:
  """Independent, platform-stable seed of a chain's RNG."""
  digest = hashlib.sha256(f"lmbbo-chain|{seed}|{chain}".encode()).digest()
  return int.from_bytes(digest[:8], "big")


class _SharedScorer:
  """Memoises scores over all chains; concurrent requests for one template
  are scored once (the scorer itself batches across chains)."""

  def __init__(self, scorer: Any):
    self.scorer = scorer
    self.memo: dict[str, Score] = {}
    self.pending: dict[str, asyncio.Future] = {}
    self.calls = 0
    self.scored = 0
    self.memo_hits = 0

  async def score(self, templates: Sequence[str]) -> list[Score]:
    mine: list[str] = []
    loop = asyncio.get_running_loop()
    for t in dict.fromkeys(templates):
      if t in self.memo or t in self.pending:
        self.memo_hits += 1
      else:
        mine.append(t)
        self.pending[t] = loop.create_future()
    if mine:
      try:
        self.calls += 1
        scores = list(await self.scorer.score_async(list(mine)))
        if len(scores) != len(mine):
          raise SearchError(f"scorer returned {len(scores)} scores for "
                            f"{len(mine)} templates.")
      except BaseException as e:
        for t in mine:
          fut = self.pending.pop(t)
          if isinstance(e, asyncio.CancelledError):
            fut.cancel()
          else:
            fut.set_exception(e)
            fut.exception()  # mark retrieved; waiters still get it
        raise
      self.scored += len(mine)
      for t, s in zip(mine, scores):
        self.memo[t] = s
        self.pending.pop(t).set_result(s)
    out = []
    for t in templates:
      if t not in self.memo:
        await asyncio.shield(self.pending[t])
      out.append(self.memo[t])
    return out


class _Search:
  """One invocation of `run_search` (state shared by its chains)."""

  def __init__(self, config: SearchConfig, scorer: Any,
               proposer_factory: Callable[[int], Proposer], runlog: RunLog,
               corpus: Sequence[str], progress: Callable[[dict], Any] | None,
               label: str = "search", tracker: SearchTracker | None = None):
    self.label = label
    self.tracker = tracker
    self.chain_stops: dict[int, str] = {}
    self.per_chain: dict[int, dict[str, Any]] = {}
    self.config = config
    self.scorer = _SharedScorer(scorer)
    self.context_check = getattr(scorer, "rejection_reason", None)
    self.class_names = list(getattr(scorer, "class_names", None) or [])
    self.proposer_factory = proposer_factory
    self.runlog = runlog
    self.corpus = list(corpus)
    self.progress = progress
    self.records: list[EvalRecord] = []
    self.counts: dict[str, Any] = {
        "evaluated": 0, "rejected_by_scorer": 0, "replayed": 0,
        "proposals": 0, "proposed_templates": 0, "failed_attempts": 0,
        "skipped_iterations": 0, "chains_stopped_early": 0, "llm_calls": 0,
        "llm_cached_calls": 0, "rejections": {}}
    self.stop_reason: str | None = None
    self.fatal: BaseException | None = None
    self.tasks: list[asyncio.Task] = []

  # --- evaluation -------------------------------------------------------------
  async def evaluate(self, state: ChainState, templates: Sequence[str], *,
                     proposer: str, call_id: str | None) -> list[EvalRecord]:
    """Scores (or replays from the log) `templates` in `state`'s seq order."""
    slots: list[tuple[int, str, dict | None]] = []
    for t in templates:
      seq = state.next_seq
      state.next_seq += 1
      logged = self.runlog.lookup(state.chain, seq)
      if logged is not None and logged["template"] != t:
        raise SearchError(
            f"resume diverged at chain {state.chain} evaluation {seq}: the log "
            f"has {logged['template']!r}, the run now proposes {t!r}; resume "
            "with the original settings and response cache, or start a new "
            "--workdir.")
      slots.append((seq, t, logged))
      state.seen.add(tpl.normalize(t))
    # Context check before scoring (the initial pool; proposals were checked).
    precheck: dict[str, str] = {}
    if self.context_check is not None and proposer == "init":
      for seq, t, logged in slots:
        if logged is None:
          reason = self.context_check(t)
          if reason:
            precheck[t] = reason
    need = [t for _, t, logged in slots if logged is None and t not in precheck]
    scores = dict(zip(need, await self.scorer.score(need))) if need else {}
    built = []
    for seq, t, logged in slots:
      if logged is not None:
        rec = EvalRecord.from_row(logged)
        self.counts["replayed"] += 1
      else:
        s = scores.get(t)
        rec = EvalRecord(
            template=t,
            accuracy=dict(s.accuracy) if s is not None else {},
            logprob=dict(s.logprob) if s is not None else {},
            acc5=dict(s.acc5) if s is not None else {},
            mean_per_class_recall=dict(s.mean_per_class_recall) if s is not None else {},
            confusions=dict(s.confusions) if s is not None else {},
            # The front's input (merge_every), never the test split's.
            per_class=({k: v for k, v in s.per_class.items() if k != "test"}
                       if s is not None and s.per_class and self.config.merge_every
                       else None),
            rejected=s.rejected if s is not None else precheck[t],
            chain=state.chain,
            reset=None if proposer == "init" else state.reset,
            iteration=None if proposer == "init" else state.iteration,
            step=state.step, seq=seq, proposer=proposer, call_id=call_id,
            time=time.time())
        if rec.ok and state.value(rec) is None:
          few = (" (acc5 needs a task of 5 or more classes: use another "
                 "select_metric)" if self.config.select_metric == "acc5" else "")
          raise SearchError(
              f"the scorer gave no {self.config.select_by!r} "
              f"{self.config.select_metric} for {t!r}{few}; it must report the "
              "splits and metric used for selection.")
      built.append((rec, logged))
    if self.config.selection == "halving" and proposer != "init":
      cfg = self.config
      keep = {id(r) for r in halving_survivors([r for r, _ in built], cfg.select_by,
                                               cfg.tie_break, cfg.select_metric)}
      for rec, _ in built:
        rec.pooled = id(rec) in keep or not rec.ok
    records = []
    for rec, logged in built:
      if logged is None:
        rec.eval_index = self.runlog.append_eval(rec.to_row())["eval_index"]
      records.append(rec)
      self.records.append(rec)
      if rec.ok:
        if rec.pooled:
          state.pool.append(rec)
        self.counts["evaluated"] += 1
      else:
        self.counts["rejected_by_scorer"] += 1
        self._count_rejection(rec.rejected)
      if self.progress is not None:
        self.progress({"event": "eval", "chain": state.chain,
                       "step": state.step, "template": rec.template,
                       "value": state.value(rec) if rec.ok else None,
                       "replayed": rec.replayed})
    return records

  def _count_rejection(self, reason: str) -> None:
    kind = parsing.reason_kind(reason)
    self.counts["rejections"][kind] = self.counts["rejections"].get(kind, 0) + 1

  # --- a chain ----------------------------------------------------------------
  async def run_chain(self, chain: int) -> None:
    cfg = self.config
    state = ChainState(chain=chain, config=cfg,
                       rng=random.Random(chain_seed(cfg.seed, chain)),
                       context_check=self.context_check,
                       class_names=self.class_names,
                       log_transcript=self.runlog.append_transcript,
                       label=self.label)
    mine = self.per_chain.setdefault(chain, _new_chain_counts())
    initial = pool_lib.sample_initial_pool(self.corpus, cfg.init_pool_size,
                                           state.rng)
    initial_records = await self.evaluate(state, initial, proposer="init", call_id=None)
    if self.tracker is not None:
      self.tracker.initial_pool(chain, initial_records)
    if not state.pool:
      raise SearchError(f"chain {chain}: no initial template could be scored; "
                        "check the initial pool and the scorer.")
    proposer = self.proposer_factory(chain)
    skipped_in_a_row = 0
    for reset in range(cfg.n_reset):
      state.reset = reset
      state.turns = []
      state.first_reference = None
      for it in range(cfg.n_iter):
        state.iteration = it
        state.step = 1 + reset * cfg.n_iter + it
        try:
          proposal = await proposer.propose(state)
        except LLMBudgetExceeded as e:
          logging.warning("%s chain %d stops: %s", self.label, chain, e)
          self.stop_reason = self.stop_reason or e.reason
          self.chain_stops[chain] = e.reason
          return
        self._count_proposal(mine, proposal)
        if not proposal.templates:
          self._track_call(state, [])
          self.counts["skipped_iterations"] += 1
          mine["skipped_iterations"] += 1
          skipped_in_a_row += 1
          if skipped_in_a_row >= cfg.max_skipped_iterations:
            logging.warning(
                "%s chain %d stops early after %d of %d turns: %d iterations in "
                "a row gave no valid template (rejections %s; the replies are in "
                "transcript.jsonl).", self.label, chain, state.step,
                cfg.n_reset * cfg.n_iter, skipped_in_a_row,
                mine["rejections"] or "none")
            self.counts["chains_stopped_early"] += 1
            self.chain_stops[chain] = "format_failures"
            return
          continue
        skipped_in_a_row = 0
        self.counts["proposed_templates"] += len(proposal.templates)
        records = await self.evaluate(state, proposal.templates,
                                      proposer=getattr(proposer, "name", "?"),
                                      call_id=proposal.call_id)
        mine["scored_new"] += sum(1 for r in records if r.ok)
        self._track_call(state, records)
        state.turns.append(Turn(messages=list(proposal.messages or []),
                                reply=proposal.raw_text or "",
                                records=records,
                                rejections=list(proposal.reply_rejections)))
    self.chain_stops[chain] = "completed"

  def _track_call(self, state: ChainState, records: Sequence[EvalRecord]) -> None:
    if self.tracker is not None:
      self.tracker.call(state.chain, state.step, records,
                        llm_calls=self.counts["llm_calls"],
                        templates_scored=self.scorer.scored)

  def _count_proposal(self, mine: dict[str, Any], proposal: Proposal) -> None:
    self.counts["proposals"] += 1
    self.counts["failed_attempts"] += proposal.failed_attempts
    self.counts["llm_calls"] += proposal.llm_calls
    self.counts["llm_cached_calls"] += proposal.cached_calls
    mine["llm_calls"] += proposal.llm_calls
    mine["cached_calls"] += proposal.cached_calls
    mine["llm_errors"] += proposal.llm_errors
    mine["templates_requested"] += proposal.requested
    mine["valid_new"] += proposal.valid_candidates
    mine["failed_attempts"] += proposal.failed_attempts
    mine["truncated"] += proposal.truncated
    mine["latency_s"] += proposal.latency_s
    mine["queue_s"] += proposal.queue_s
    for _, reason in proposal.rejections:
      self._count_rejection(reason)
      kind = parsing.reason_kind(reason)
      mine["rejections"][kind] = mine["rejections"].get(kind, 0) + 1

  async def guard(self, chain: int) -> None:
    try:
      await self.run_chain(chain)
    except asyncio.CancelledError:
      self.chain_stops.setdefault(chain, self.stop_reason or "error")
      if self.stop_reason is None and self.fatal is None:
        raise
    except Exception as e:  # pylint: disable=broad-except
      self.chain_stops.setdefault(chain, "error")
      if self.fatal is None:
        self.fatal = e
      self.cancel_all()

  def cancel_all(self) -> None:
    current = asyncio.current_task()
    for t in self.tasks:
      if t is not current and not t.done():
        t.cancel()

  def request_stop(self, reason: str) -> None:
    if self.stop_reason is None:
      self.stop_reason = reason
    self.cancel_all()


async def run_search(config: SearchConfig, scorer: Any,
                     proposer_factory: Callable[[int], Proposer],
                     runlog: RunLog, *,
                     corpus: Sequence[str] | None = None,
                     progress: Callable[[dict], Any] | None = None,
                     stop_event: asyncio.Event | None = None,
                     ledger: Any = None, label: str = "search",
                     writer: MetricWriter | None = None) -> SearchResult:
  """Runs (or resumes) the search; see the module docstring.

  Args:
    config: hyper-parameters.
    scorer: `async score_async(templates) -> list[Score]`, optionally
      `rejection_reason(template) -> reason | None`.
    proposer_factory: chain index -> its `Proposer`.
    runlog: the run's `RunLog` (opened with resume=True to resume).
    corpus: initial template corpus (default: the built-in generic pool).
    progress: called with a dict after each evaluation.
    stop_event: when set (e.g. by SIGINT/SIGTERM via
      `runlog.install_signal_handlers(event.set)`), chains stop at once;
      everything evaluated so far is already logged.
    ledger: an `llm.Ledger`, whose summary is put in the result.
    label: names the run in log lines ("seed 1").
    writer: receives the search's metric series as it runs (`search/tracking.py`;
      several searches sharing one writer each take a `PrefixedWriter`); flushed
      at the end, never closed (its owner closes it).

  Returns:
    A `SearchResult`.

  Raises:
    LLMFatalError: the endpoint refused for good (401, quota, ...); the error
      carries `.partial_result` (a `SearchResult`) and the logs are complete.
    SearchError: bad configuration or a resume that diverges.
  """
  config.validate()
  runlog.check_config(config.to_dict(), may_change=_RESUMABLE_CHANGES,
                      defaults=SearchConfig().to_dict())
  corpus = pool_lib.builtin_corpus() if corpus is None else corpus
  tracker = (SearchTracker(writer, config.select_by, config.tie_break, ledger)
             if writer is not None else None)
  search = _Search(config, scorer, proposer_factory, runlog, corpus, progress,
                   label=label, tracker=tracker)
  start = time.monotonic()
  search.tasks = [asyncio.create_task(search.guard(c), name=f"chain-{c}")
                  for c in range(config.n_restart)]
  watchers = []
  if stop_event is not None:
    async def watch_signal():
      await stop_event.wait()
      search.request_stop("signal")
    watchers.append(asyncio.create_task(watch_signal()))
  if config.time_limit_s is not None:
    async def watch_time():
      await asyncio.sleep(config.time_limit_s)
      search.request_stop("time_limit")
    watchers.append(asyncio.create_task(watch_time()))
  try:
    await asyncio.gather(*search.tasks, return_exceptions=False)
  finally:
    for w in watchers:
      w.cancel()
  records = sorted(search.records, key=lambda r: r.order())
  rule = (config.select_by, config.tie_break, config.select_metric)
  best = best_of(records, *rule)
  initial_best = best_of([r for r in records if r.step == 0], *rule)
  per_chain = {}
  for c in range(config.n_restart):
    b = best_of([r for r in records if r.chain == c], *rule)
    if b is not None:
      per_chain[c] = b
  counts = dict(search.counts)
  counts["scorer_calls"] = search.scorer.calls
  counts["scored_templates"] = search.scorer.scored
  counts["memo_hits"] = search.scorer.memo_hits
  counts["per_chain"] = {str(c): _chain_summary(v) for c, v in
                         sorted(search.per_chain.items())}
  stops = dict(sorted(search.chain_stops.items()))
  stop_reason = search.stop_reason or (
      "format_failures" if "format_failures" in stops.values() else "completed")
  result = SearchResult(
      best=best.score if best else None, best_record=best,
      initial_best=initial_best.score if initial_best else None,
      initial_best_record=initial_best, best_per_chain=per_chain,
      records=records, counts=counts,
      stop_reason=stop_reason, elapsed_s=time.monotonic() - start,
      llm=ledger.summary() if ledger is not None else None,
      chain_stop_reasons=stops)
  if tracker is not None:
    tracker.finish(best)
  if search.fatal is not None:
    search.fatal.partial_result = result  # type: ignore[attr-defined]
    raise search.fatal
  return result


def sum_chain_counts(chains: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Several chains' counts added up, with the rates recomputed (`_chain_summary`)."""
  total = _new_chain_counts()
  for c in chains:
    for k, v in c.items():
      if k == "rejections":
        for kind, n in v.items():
          total["rejections"][kind] = total["rejections"].get(kind, 0) + n
      elif k in total:
        total[k] += v
  total["rejections"] = dict(sorted(total["rejections"].items()))
  return _chain_summary(total)


def _chain_summary(c: dict[str, Any]) -> dict[str, Any]:
  """A chain's counts with the rates a reader wants (per call, per request)."""
  calls = c["llm_calls"]
  out = dict(c)
  out["latency_s"] = round(c["latency_s"], 3)
  out["queue_s"] = round(c["queue_s"], 3)
  out["valid_new_per_call"] = round(c["valid_new"] / calls, 3) if calls else None
  out["valid_new_fraction"] = (round(c["valid_new"] / c["templates_requested"], 4)
                               if c["templates_requested"] else None)
  return out


def make_proposer_factory(kind: str, config: SearchConfig, *,
                          client: Any = None,
                          transcript: str | None = None,
                          replay_seed: int | None = None,
                          meta_prompts: mp.MetaPrompts = mp.DEFAULT_META_PROMPTS
                          ) -> Callable[[int], Proposer]:
  """chain -> proposer for kind "llm", "ape", "iterative_ape" (these need `client`),
  "edit" or "replay".

  `replay_seed` picks one few-shot seed's entries of a merged transcript.
  """
  if kind in LLM_PROPOSERS:
    if client is None:
      raise SearchError(f"the {kind} proposer needs an LLM (--llm=local or --llm_base_url).")
    proposer = LLM_PROPOSERS[kind](client, config, meta_prompts)
    return lambda chain: proposer  # stateless: all state is in ChainState
  if kind == "edit":
    return lambda chain: EditProposer(config)
  if kind == "replay":
    if not transcript:
      raise SearchError("the replay proposer needs a transcript.jsonl path.")
    replay = ReplayProposer(transcript, seed=replay_seed)
    return lambda chain: replay
  raise SearchError(f"proposer {kind!r}: use {', '.join([*LLM_PROPOSERS, 'edit', 'replay'])}.")


def estimate_tokens(text: str) -> int:
  """Rough tokens of English meta-prompt text (3.5 characters per token, the
  ratio of BPE tokenizers on this wording) plus a message's template tokens."""
  return math.ceil(len(text) / 3.5) + 4


def estimate(config: SearchConfig, ledger: Any,
             corpus: Sequence[str] | None = None,
             meta_prompts: mp.MetaPrompts = mp.DEFAULT_META_PROMPTS,
             max_tokens: int | None = None) -> dict[str, Any]:
  """Dry-run estimate of LLM calls, tokens and cost (nothing is sent).

  Every piece is measured on rendered text: the first request (system prompt
  and first turn), a reply holding the `m_ask` templates asked for, and a real
  multi-turn feedback message (the scores of the last turn's templates), so a
  multi-turn conversation's growth is counted turn by turn. With `max_tokens`
  the worst case, every reply at the cap, is given too.
  """
  config.validate()
  corpus = list(pool_lib.builtin_corpus() if corpus is None else corpus)
  rng = random.Random(chain_seed(config.seed, 0))
  sample = pool_lib.sample_initial_pool(corpus, config.init_pool_size, rng)
  state = ChainState(chain=0, config=config, rng=rng)
  for i, t in enumerate(sample):
    state.pool.append(EvalRecord(
        template=t, accuracy={"train": 0.5, "val": 0.5}, logprob={},
        rejected=None, chain=0, reset=None, iteration=None, step=0, seq=i,
        proposer="init"))
  proposer = LLMProposer(None, config, meta_prompts)
  first = proposer.build_messages(state)
  asked = [r.template for r in state.pool[:proposer.n_ask]]
  reply = ('{"templates": [' + ", ".join(f'"{t}"' for t in asked) + "]}"
           if config.reply_format == "json" else
           "\n".join(f"- {t}" for t in asked))
  state.turns = [Turn(messages=first, reply=reply,
                      records=state.pool[:config.m_new])]
  feedback = proposer.feedback(state)
  return ledger.estimate(
      config, first_prompt_tokens=sum(estimate_tokens(m["content"]) for m in first),
      reply_tokens=estimate_tokens(reply),
      feedback_tokens=estimate_tokens(feedback) + estimate_tokens(""),
      max_tokens=max_tokens)
