"""What a search reports while it runs: a small metric-writer interface.

`run_search(..., writer=...)` feeds a `MetricWriter` through a `SearchTracker`;
the backends (TensorBoard, Weights & Biases, MLflow) live at the top level
(`lmbbo_jax/tracking.py`), so this room depends on none of them.

Series a search writes (x = proposer calls so far, the x of report.py's plot):
* `search/best_train`, `search/best_val`: accuracies of the template the
  search would pick now (the selection rule, `state.best_of`), one point per
  proposer call of any chain (a call that gave no valid template included);
  with selection by train, `best_train` never decreases.
* `chain_<c>/best_train`, `chain_<c>/best_val`: the same for chain c alone, at
  step 0 (its initial pool) and after each of its calls.
* `search/llm_calls` (LLM requests, retries and cached replies included),
  `search/templates_scored` (scored by the scorer, not replayed from the log
  nor memo hits) and `search/templates_per_s` (those per second of this
  invocation), at each call.
* `llm/cost_usd`, `llm/calls`: the ledger's totals, when `run_search` has a
  ledger. A ledger shared by several searches (the seeds of one run) gives
  every search the same, run-wide totals.

Several searches feeding one writer (the seeds of a run) each get a
`PrefixedWriter` view (`seed_<s>/search/best_train`, ...): one run in the
tracking UI, one set of series per seed.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Mapping, Protocol, Sequence

from lmbbo_jax.search.state import EvalRecord, rank_key


class MetricWriter(Protocol):
  """Where a run's metrics go (`lmbbo_jax.tracking.open_writer` makes one)."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Scalars at `step`, keyed by tag ("search/best_train")."""

  def write_hparams(self, config: Mapping[str, Any]) -> None:
    """The run's configuration, once (nested mappings allowed)."""

  def write_summary(self, final: Mapping[str, Any]) -> None:
    """The run's final results, once (nested mappings allowed)."""

  def flush(self) -> None:
    """Makes everything written so far durable or sent."""

  def close(self) -> None:
    """Flushes and releases the backend; nothing may be written after."""


class NullWriter:
  """Writes nothing (`--tracking=none`)."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    pass

  def write_hparams(self, config: Mapping[str, Any]) -> None:
    pass

  def write_summary(self, final: Mapping[str, Any]) -> None:
    pass

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class MultiWriter:
  """Writes everything to each of `writers` (several backends at once)."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, config: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write_hparams(config)

  def write_summary(self, final: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write_summary(final)

  def flush(self) -> None:
    for w in self.writers:
      w.flush()

  def close(self) -> None:
    """Closes every writer, even when one fails (the first error is raised)."""
    error = None
    for w in self.writers:
      try:
        w.close()
      except Exception as e:  # pylint: disable=broad-except
        error = error or e
    if error is not None:
      raise error


class PrefixedWriter:
  """A view of `writer` whose tags (and hparams/summary keys) start with `prefix`.

  The view does not own `writer`: its `close()` only flushes; whoever opened
  `writer` closes it.
  """

  def __init__(self, writer: MetricWriter, prefix: str):
    self.writer = writer
    self.prefix = prefix

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self.writer.write_scalars(step, {self.prefix + k: v for k, v in scalars.items()})

  def write_hparams(self, config: Mapping[str, Any]) -> None:
    self.writer.write_hparams({self.prefix + k: v for k, v in config.items()})

  def write_summary(self, final: Mapping[str, Any]) -> None:
    self.writer.write_summary({self.prefix + k: v for k, v in final.items()})

  def flush(self) -> None:
    self.writer.flush()

  def close(self) -> None:
    self.writer.flush()


def _accuracies(prefix: str, record: EvalRecord) -> dict[str, float]:
  return {f"{prefix}/best_{split}": float(record.accuracy[split])
          for split in ("train", "val") if split in record.accuracy}


class SearchTracker:
  """Turns one search's progress into the series in the module docstring.

  Args:
    writer: where the series go.
    select_by / tie_break: the search's selection rule (`state.rank_key`).
    ledger: the search's `llm.Ledger` (its public `summary()`), or None.
  """

  def __init__(self, writer: MetricWriter, select_by: str, tie_break: str,
               ledger: Any = None):
    self.writer = writer
    self.rule = (select_by, tie_break)
    self.ledger = ledger
    self.calls = 0
    self.best: EvalRecord | None = None
    self.chain_best: dict[int, EvalRecord] = {}
    self.start = time.monotonic()

  def _better(self, current: EvalRecord | None,
              records: Iterable[EvalRecord]) -> EvalRecord | None:
    for r in records:
      if r.ok and r.pooled and (current is None or
                   rank_key(r, *self.rule) < rank_key(current, *self.rule)):
        current = r
    return current

  def _take(self, chain: int, records: Sequence[EvalRecord]) -> None:
    self.best = self._better(self.best, records)
    best = self._better(self.chain_best.get(chain), records)
    if best is not None:
      self.chain_best[chain] = best

  def initial_pool(self, chain: int, records: Sequence[EvalRecord]) -> None:
    """Chain `chain`'s initial pool is scored: its step-0 point."""
    self._take(chain, records)
    if chain in self.chain_best:
      self.writer.write_scalars(0, _accuracies(f"chain_{chain}", self.chain_best[chain]))

  def call(self, chain: int, step: int, records: Sequence[EvalRecord], *,
           llm_calls: int, templates_scored: int) -> None:
    """A proposer call of `chain` (its `step`-th) is answered and its templates
    (`records`, empty when it gave none) scored."""
    self._take(chain, records)
    self.calls += 1
    if chain in self.chain_best:
      self.writer.write_scalars(step, _accuracies(f"chain_{chain}", self.chain_best[chain]))
    elapsed = time.monotonic() - self.start
    scalars = {**(_accuracies("search", self.best) if self.best is not None else {}),
               "search/llm_calls": float(llm_calls),
               "search/templates_scored": float(templates_scored),
               "search/templates_per_s": templates_scored / elapsed if elapsed > 0 else 0.0}
    if self.ledger is not None:
      llm = self.ledger.summary()
      scalars["llm/cost_usd"] = float(llm["cost_usd"])
      scalars["llm/calls"] = float(llm["calls"])
    self.writer.write_scalars(self.calls, scalars)

  def finish(self, best: EvalRecord | None) -> None:
    """The search ended with `best`: a last point if the series does not end
    there yet (an initial pool scored after the last call), then a flush."""
    if best is not None and best is not self.best:
      self.best = best
      self.writer.write_scalars(self.calls, _accuracies("search", best))
    self.writer.flush()
