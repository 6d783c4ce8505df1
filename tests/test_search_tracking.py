"""What a search writes to a `MetricWriter`: the best-so-far series, counts, cost."""

import asyncio

import fake_llm_server as fake
from search_helpers import WordScorer
from lmbbo_jax.llm import Ledger, LLMClient, ResponseCache
from lmbbo_jax.search import (EditProposer, Proposal, RunLog, SearchConfig,
                              make_proposer_factory, run_search)
from lmbbo_jax.search.tracking import MultiWriter, NullWriter, PrefixedWriter


class RecordingWriter:
  """Keeps every call, in order."""

  def __init__(self):
    self.points: list[tuple[int, str, float]] = []
    self.hparams, self.summaries, self.flushes, self.closed = [], [], 0, False

  def write_scalars(self, step, scalars):
    self.points += [(step, tag, value) for tag, value in scalars.items()]

  def write_hparams(self, config):
    self.hparams.append(dict(config))

  def write_summary(self, final):
    self.summaries.append(dict(final))

  def flush(self):
    self.flushes += 1

  def close(self):
    self.closed = True

  def series(self, tag):
    return [(s, v) for s, t, v in self.points if t == tag]


class SometimesEmpty:
  """The edit proposer, but every third call gives no template (a skipped iteration)."""

  name = "sometimes_empty"

  def __init__(self, config):
    self.inner = EditProposer(config)

  async def propose(self, state):
    if state.step % 3 == 0:
      return Proposal(templates=[], failed_attempts=1)
    return await self.inner.propose(state)


def search(tmp_path, config, writer, *, factory=None, resume=False, name="w"):
  async def go():
    with RunLog(tmp_path / name, resume=resume, fsync=False) as log:
      return await run_search(config, WordScorer(),
                              factory or make_proposer_factory("edit", config), log,
                              writer=writer)
  return asyncio.run(go())


def test_best_so_far_per_call_and_per_chain(tmp_path):
  cfg = SearchConfig(n_restart=3, n_reset=2, n_iter=4, init_pool_size=8, m_new=2,
                     max_skipped_iterations=10)
  writer = RecordingWriter()
  result = search(tmp_path, cfg, writer, factory=lambda chain: SometimesEmpty(cfg))
  calls = result.counts["proposals"]
  assert calls == 3 * 2 * 4 and result.counts["skipped_iterations"] > 0
  best = writer.series("search/best_train")
  # One point per proposer call (skipped ones too), steps 1..calls, never decreasing,
  # ending at the search's best.
  assert [s for s, _ in best] == list(range(1, calls + 1))
  values = [v for _, v in best]
  assert values == sorted(values) and values[-1] == result.best.accuracy["train"]
  assert writer.series("search/best_val")[-1][1] == result.best.accuracy["val"]
  for chain, chain_best in result.best_per_chain.items():
    series = writer.series(f"chain_{chain}/best_train")
    assert [s for s, _ in series] == list(range(0, 2 * 4 + 1))  # initial pool, then calls
    assert series[0][1] == max(r.accuracy["train"] for r in result.records
                               if r.chain == chain and r.step == 0 and r.ok)
    assert series[-1][1] == chain_best.accuracy["train"]
  scored = writer.series("search/templates_scored")
  assert scored[-1][1] == result.counts["scored_templates"]
  assert all(v >= 0 for _, v in writer.series("search/templates_per_s"))
  assert writer.flushes >= 1 and not writer.closed  # the owner closes it


def test_llm_calls_and_cost_come_from_the_ledger(tmp_path):
  cfg = SearchConfig(n_restart=2, n_reset=1, n_iter=3, init_pool_size=6)
  writer = RecordingWriter()
  ledger = Ledger("gpt-4o-mini")

  async def go():
    client = LLMClient(srv.base_url, "gpt-4o-mini", ledger=ledger,
                       cache=ResponseCache(tmp_path / "c", "readwrite"))
    try:
      with RunLog(tmp_path / "w", fsync=False) as log:
        return await run_search(cfg, WordScorer(),
                                make_proposer_factory("llm", cfg, client=client), log,
                                ledger=ledger, writer=PrefixedWriter(writer, "seed_3/"))
    finally:
      await client.aclose()

  with fake.FakeLLMServer() as srv:
    result = asyncio.run(go())
  cost = [v for _, v in writer.series("seed_3/llm/cost_usd")]
  assert cost == sorted(cost) and cost[-1] == result.llm["cost_usd"] > 0
  assert writer.series("seed_3/llm/calls")[-1][1] == result.llm["calls"]
  assert writer.series("seed_3/search/llm_calls")[-1][1] == result.counts["llm_calls"]
  assert not writer.series("search/best_train")  # every tag carries the prefix


def test_a_resumed_search_writes_the_same_series(tmp_path):
  cfg = SearchConfig(n_restart=2, n_reset=1, n_iter=5, init_pool_size=8)
  full = RecordingWriter()
  search(tmp_path, cfg, full, name="full")
  # The log of a run stopped after 20 evaluations: resuming replays them.
  (tmp_path / "part").mkdir()
  (tmp_path / "part" / "search_config.json").write_bytes(
      (tmp_path / "full" / "search_config.json").read_bytes())
  lines = (tmp_path / "full" / "prompts.jsonl").read_bytes().splitlines(keepends=True)
  (tmp_path / "part" / "prompts.jsonl").write_bytes(b"".join(lines[:20]))
  resumed = RecordingWriter()
  result = search(tmp_path, cfg, resumed, resume=True, name="part")
  assert result.counts["replayed"] == 20
  # A chain's series is deterministic; the run's depends on how the chains'
  # calls interleave (replayed ones wait for no scorer), but not where it ends.
  for tag in ("chain_0/best_train", "chain_1/best_train", "chain_1/best_val"):
    assert resumed.series(tag) == full.series(tag)
  assert len(resumed.series("search/best_train")) == len(full.series("search/best_train"))
  assert resumed.series("search/best_train")[-1] == full.series("search/best_train")[-1]


def test_multi_and_null_writers():
  a, b = RecordingWriter(), RecordingWriter()
  both = MultiWriter([a, b])
  both.write_scalars(2, {"x": 1.0})
  both.write_hparams({"lr": 1})
  both.write_summary({"acc": 0.5})
  both.flush()
  both.close()
  for w in (a, b):
    assert w.points == [(2, "x", 1.0)] and w.hparams == [{"lr": 1}]
    assert w.summaries == [{"acc": 0.5}] and w.flushes == 1 and w.closed
  view = PrefixedWriter(a, "seed_1/")
  view.write_scalars(3, {"search/best_train": 0.25})
  view.close()
  assert a.points[-1] == (3, "seed_1/search/best_train", 0.25) and a.flushes == 2
  null = NullWriter()
  null.write_scalars(0, {"x": 1.0})
  null.close()
