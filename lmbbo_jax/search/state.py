"""Data shared by the optimizer and the proposers: records, chain state, proposals.

Kept free of scoring internals: a record holds whatever per-split metrics
(accuracy, acc5, mean per-class recall) and log-probabilities the injected
scorer returned.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from lmbbo_jax.evaluator.types import METRICS, Score

SELECT_BY = ("train", "train_val")
# Which metric selects (`SearchConfig.select_metric`): "accuracy" (top-1, the paper's),
# "acc5" or "mean_per_class_recall" (`evaluator.types.METRICS`).
SELECT_METRICS = METRICS
# How equal selection accuracies are ordered: "logprob", by the mean log-probability
# of the true class on the same split (reads the logits); "none", by accuracy alone
# (strict black box, as the paper's premise), then the earliest evaluation.
TIE_BREAKS = ("logprob", "none")
# Which of a call's scored candidates enter the chain's pool (`SearchConfig.selection`):
# "all", or "halving" (`halving_survivors`).
SELECTIONS = ("all", "halving")


class SearchError(ValueError):
  """A search that cannot run as configured (one-line message says what to do)."""


def select_value(values: Mapping[str, float], select_by: str) -> float | None:
  """The selection metric from per-split values; never reads "test".

  "train": the train split. "train_val": the "train_val" entry `PromptScorer`
  gives (the metric over the joined train and val images); for scores without
  one (other scorers, logs of older versions) the mean of train and val, which
  equals it only when both splits have as many images (val has min(4, k) per
  class, so at 8-16 shots the mean over-weights val), else train.
  """
  if select_by == "train":
    return values.get("train")
  if select_by == "train_val":
    if "train_val" in values:
      return values["train_val"]
    if "train" in values and "val" in values:
      return 0.5 * (values["train"] + values["val"])
    return values.get("train")
  raise SearchError(f"select_by={select_by!r} is not one of {SELECT_BY}.")


def record_chain(row: Mapping[str, Any]) -> int:
  """The chain of a logged row (evaluation or transcript entry); rows of older
  versions also name it `restart`, which new rows no longer write."""
  return int(row["chain"] if "chain" in row else row["restart"])


@dataclasses.dataclass
class EvalRecord:
  """One evaluated template and where in the search it came from.

  `step` is 0 for the initial pool and 1 + reset * n_iter + iteration after;
  `seq` numbers the chain's evaluations 0, 1, 2, ...; (step, chain, seq) is the
  deterministic "earliest evaluation" order used to break ties. `eval_index`
  is the global arrival order in the log (informational: it depends on how
  concurrent chains interleave). `confusions` and `per_class` are the scorer's
  (`Score`), kept so that a resumed chain shows the LLM the same feedback;
  `pooled` is False for a candidate that successive halving
  (`SearchConfig.selection="halving"`) scored but kept out of the pool: it is
  never selected.
  """

  template: str
  accuracy: dict[str, float]
  logprob: dict[str, float]
  rejected: str | None
  chain: int
  reset: int | None
  iteration: int | None
  step: int
  seq: int
  proposer: str
  call_id: str | None = None
  eval_index: int = -1
  time: float = 0.0
  replayed: bool = False
  acc5: dict[str, float] = dataclasses.field(default_factory=dict)
  mean_per_class_recall: dict[str, float] = dataclasses.field(default_factory=dict)
  confusions: dict[str, list[tuple[int, int, int]]] = dataclasses.field(default_factory=dict)
  per_class: dict[str, list[float]] | None = None
  pooled: bool = True

  @property
  def ok(self) -> bool:
    return self.rejected is None

  @property
  def score(self) -> Score:
    return Score(template=self.template, accuracy=dict(self.accuracy),
                 logprob=dict(self.logprob), rejected=self.rejected, acc5=dict(self.acc5),
                 mean_per_class_recall=dict(self.mean_per_class_recall),
                 confusions=dict(self.confusions), per_class=self.per_class)

  def order(self) -> tuple[int, int, int]:
    return (self.step, self.chain, self.seq)

  def to_row(self) -> dict[str, Any]:
    return {"template": self.template, "accuracy": self.accuracy,
            "logprob": self.logprob, "rejected": self.rejected,
            "chain": self.chain, "reset": self.reset,
            "iteration": self.iteration, "step": self.step, "seq": self.seq,
            "proposer": self.proposer, "call_id": self.call_id,
            "eval_index": self.eval_index, "time": self.time, "acc5": self.acc5,
            "mean_per_class_recall": self.mean_per_class_recall,
            "confusions": {k: [list(c) for c in v] for k, v in self.confusions.items()},
            **({"per_class": self.per_class} if self.per_class is not None else {}),
            **({} if self.pooled else {"pooled": False})}

  @classmethod
  def from_row(cls, row: Mapping[str, Any]) -> "EvalRecord":
    return cls(template=row["template"], accuracy=dict(row.get("accuracy") or {}),
               logprob=dict(row.get("logprob") or {}),
               rejected=row.get("rejected"), chain=record_chain(row),
               reset=row.get("reset"), iteration=row.get("iteration"),
               step=int(row["step"]), seq=int(row["seq"]),
               proposer=row.get("proposer", "?"), call_id=row.get("call_id"),
               eval_index=int(row.get("eval_index", -1)),
               time=float(row.get("time", 0.0)), replayed=True,
               acc5=dict(row.get("acc5") or {}),
               mean_per_class_recall=dict(row.get("mean_per_class_recall") or {}),
               confusions={k: [tuple(c) for c in v]
                           for k, v in (row.get("confusions") or {}).items()},
               per_class=row.get("per_class"), pooled=bool(row.get("pooled", True)))


def metric_values(scored: Score | EvalRecord, select_metric: str) -> Mapping[str, float]:
  """Split -> value of the selecting metric of a `Score` or an `EvalRecord`."""
  if select_metric not in SELECT_METRICS:
    raise SearchError(f"select_metric={select_metric!r} is not one of {SELECT_METRICS}.")
  return getattr(scored, select_metric)


def selection_key(values: Mapping[str, float], logprob: Mapping[str, float] | None,
                  select_by: str, tie_break: str = "logprob") -> tuple[float, float]:
  """The one selection rule, as a sort key (smaller is better).

  `values` are the selecting metric's per-split values (`metric_values`: accuracy
  unless `SearchConfig.select_metric` says otherwise). Its value on the selection
  split (`select_value`) first; equal values by log-probability under
  `tie_break="logprob"`, or not at all under "none". Callers append their own
  deterministic order (`rank_key`: earliest first).
  """
  if tie_break not in TIE_BREAKS:
    raise SearchError(f"tie_break={tie_break!r} is not one of {TIE_BREAKS}.")
  acc = select_value(values, select_by)
  lp = (select_value(logprob, select_by)
        if tie_break == "logprob" and logprob else None)
  return (-acc if acc is not None else math.inf,
          -lp if lp is not None else math.inf)


def rank_key(record: EvalRecord, select_by: str, tie_break: str = "logprob",
             select_metric: str = "accuracy") -> tuple:
  """Sort key of a record, best first: `selection_key` of the selecting metric, then
  the earliest evaluation."""
  return (*selection_key(metric_values(record, select_metric), record.logprob, select_by,
                         tie_break),
          *record.order())


def best_of(records, select_by: str, tie_break: str = "logprob",
            select_metric: str = "accuracy") -> EvalRecord | None:
  """The best scored record that entered a pool (`rank_key`), or None."""
  ok = [r for r in records if r.ok and r.pooled]
  return (min(ok, key=lambda r: rank_key(r, select_by, tie_break, select_metric))
          if ok else None)


def halving_survivors(records, select_by: str, tie_break: str = "logprob",
                      select_metric: str = "accuracy") -> list[EvalRecord]:
  """Successive halving of one call's scored candidates, over the selection split then val.

  Round 1 keeps the best ceil(n/2) by the selecting metric on the selection split
  (`select_value`), equal values ordered by val; round 2 keeps the best ceil(n1/2) of
  those by val, equal values ordered by the selection split. Values still equal are
  ordered by log-probability under `tie_break="logprob"` only (never read under
  "none"), then by the earliest evaluation. A missing value ranks last. So ties on a
  coarse 1-shot train accuracy are broken by held-out accuracy, not by chance.

  Returns:
    The survivors (the records that enter the pool), in their given order.
  """
  ok = [r for r in records if r.ok]

  def value(r, split):
    v = (select_value(metric_values(r, select_metric), select_by) if split == "select"
         else metric_values(r, select_metric).get(split))
    return -v if v is not None and not math.isnan(v) else math.inf

  def key(r, first, second):
    lp = select_value(r.logprob, select_by) if tie_break == "logprob" else None
    return (value(r, first), value(r, second), -lp if lp is not None else math.inf,
            *r.order())

  survivors = sorted(ok, key=lambda r: key(r, "select", "val"))[:(len(ok) + 1) // 2]
  survivors = sorted(survivors, key=lambda r: key(r, "val", "select"))[:(len(survivors) + 1) // 2]
  keep = {id(r) for r in survivors}
  return [r for r in ok if id(r) in keep]


def selection_entry(by_split: Mapping[str, Any], select_by: str) -> Any:
  """A per-split entry that is not a number (per-class accuracies, confusions) on the
  selection split: "train", or under select_by="train_val" the joined train and val
  images' entry when there is one. Never "test"."""
  if select_by == "train_val" and "train_val" in by_split:
    return by_split["train_val"]
  return by_split.get("train")


def pareto_front(records, select_by: str, tie_break: str = "logprob",
                 select_metric: str = "accuracy") -> list[EvalRecord]:
  """The per-class Pareto front of the pooled records, best first (`rank_key`).

  A record is on the front when it has the highest accuracy on the selection split
  (`selection_entry` of `EvalRecord.per_class`) of at least one class among the
  records, and no other record is at least as accurate on every class and more
  accurate on one. So a template that is best on some classes stays even when it is
  not best on average. Of records with equal per-class accuracies, the best ranked
  stands for them all. Records without per-class accuracies are left out.
  """
  ranked = sorted((r for r in records if r.ok and r.pooled and r.per_class
                   and selection_entry(r.per_class, select_by) is not None),
                  key=lambda r: rank_key(r, select_by, tie_break, select_metric))
  if not ranked:
    return []
  # Classes without images (NaN for every template) compare equal.
  acc = np.nan_to_num(np.array([selection_entry(r.per_class, select_by) for r in ranked],
                               np.float64), nan=-1.0)
  _, first = np.unique(acc, axis=0, return_index=True)  # one record per distinct vector
  keep = sorted(i for i in first if (acc[i] == acc.max(axis=0)).any())
  front = [i for i in keep
           if not any((acc[j] >= acc[i]).all() and (acc[j] > acc[i]).any() for j in keep)]
  return [ranked[i] for i in front]


@dataclasses.dataclass
class Turn:
  """One answered LLM turn of a conversation and the scores of its templates."""

  messages: list[dict]
  reply: str
  records: list[EvalRecord]
  rejections: list[tuple[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Proposal:
  """What a proposer returns for one iteration.

  Attributes:
    templates: valid new templates to score (empty: the iteration failed).
    call_id: the LLM call whose reply gave them (None offline).
    raw_text: that reply.
    messages: the request that produced the reply (for multi-turn history).
    failed_attempts: attempts that gave no valid template.
    rejections: (candidate, reason) pairs over all attempts.
    reply_rejections: those of the reply that gave `templates` (beyond the
      m_new cap), told to the model in the next multi-turn feedback.
    llm_calls / cached_calls: calls made / replayed from the cache.
    llm_errors: calls that failed after the client's retries.
    requested: templates asked for over all calls (m_ask per call).
    valid_candidates: valid new templates the replies held (before the
      m_new cap).
    truncated: replies cut at the completion cap.
    latency_s / queue_s: summed call latency, and its queueing part.
  """

  templates: list[str]
  call_id: str | None = None
  raw_text: str | None = None
  messages: list[dict] | None = None
  failed_attempts: int = 0
  rejections: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  llm_calls: int = 0
  cached_calls: int = 0
  llm_errors: int = 0
  reply_rejections: list[tuple[str, str]] = dataclasses.field(
      default_factory=list)
  requested: int = 0
  valid_candidates: int = 0
  truncated: int = 0
  latency_s: float = 0.0
  queue_s: float = 0.0


@dataclasses.dataclass
class ChainState:
  """Everything a proposer may read about its chain.

  Attributes:
    chain: chain index (a chain is one of the paper's restarts).
    config: the `SearchConfig`.
    rng: the chain's RNG, seeded from (seed, chain); the initial sample and
      the edit proposer draw from it, so a chain replays identically.
    reset, iteration, step: current position.
    pool: the chain's successfully scored records, in evaluation order.
    seen: normalised templates the chain has evaluated (or rejected).
    turns: answered turns of the current conversation (cleared on reset).
    first_reference: selection value of the best positive shown in the first
      turn of the conversation (the baseline of the first feedback message).
    context_check: the scorer's `rejection_reason`, if it has one.
    class_names: the task's class names in label order (the scorer's; empty when it
      has none): confusion feedback and the merge step name classes with them.
    log_transcript: writes one transcript entry.
    label: names the run in log lines (e.g. "seed 1").
  """

  chain: int
  config: Any
  rng: random.Random
  reset: int = 0
  iteration: int = 0
  step: int = 0
  next_seq: int = 0
  pool: list[EvalRecord] = dataclasses.field(default_factory=list)
  seen: set[str] = dataclasses.field(default_factory=set)
  turns: list[Turn] = dataclasses.field(default_factory=list)
  first_reference: float | None = None
  context_check: Callable[[str], str | None] | None = None
  class_names: Sequence[str] = ()
  log_transcript: Callable[[dict], Any] = lambda row: None
  label: str = "search"

  @property
  def chain_key(self) -> str:
    """Names the chain in LLM cache keys: the seed and the chain index."""
    return f"s{self.config.seed}-c{self.chain}"

  def ranked(self) -> list[EvalRecord]:
    """The chain's pool, best first (deterministic)."""
    return sorted(self.pool, key=lambda r: rank_key(r, self.config.select_by,
                                                  self.config.tie_break,
                                                  self.config.select_metric))

  def value(self, record: EvalRecord) -> float | None:
    """The record's selecting metric on the selection split (what the LLM is shown)."""
    return select_value(metric_values(record, self.config.select_metric),
                        self.config.select_by)


class Proposer(Protocol):
  """Proposes new templates for one iteration of a chain."""

  name: str

  async def propose(self, state: ChainState) -> Proposal:
    ...
