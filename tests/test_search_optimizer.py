"""End-to-end searches against the fake server and fake scorer (known answers)."""

import asyncio
import glob
import os
import shutil
import time

import orjson
import pytest

import fake_llm_server as fake
from search_helpers import WordScorer
from lmbbo_jax import templates as tpl
from lmbbo_jax.evaluator.types import Score
from lmbbo_jax.llm import Ledger, LLMClient, LLMFatalError, ResponseCache
from lmbbo_jax.search import (RunLog, RunLogError, SearchConfig, SearchError,
                              estimate, make_proposer_factory, run_search)

SECRET = "sk-test-SECRET-abcdef123456"


@pytest.fixture
def server():
  with fake.FakeLLMServer() as srv:
    yield srv


def small_config(**kw):
  base = dict(n_restart=2, n_reset=2, n_iter=3, init_pool_size=10,
              conversation="multi_turn", seed=0)
  base.update(kw)
  return SearchConfig(**base)


async def llm_search(config, server, workdir, cache_dir, *, scorer=None,
                     resume=False, ledger=None, stop_event=None, **client_kw):
  ledger = ledger or Ledger("gpt-4o-mini")
  client_kw.setdefault("initial_backoff_s", 0.01)
  client_kw.setdefault("max_backoff_s", 0.05)
  client = LLMClient(server.base_url, "gpt-4o-mini", ledger=ledger,
                     api_key_env="LMBBO_TEST_KEY",
                     cache=ResponseCache(cache_dir, "readwrite"), **client_kw)
  scorer = scorer or WordScorer()
  try:
    with RunLog(workdir, resume=resume, fsync=False) as log:
      return await run_search(config, scorer,
                              make_proposer_factory("llm", config,
                                                    client=client),
                              log, ledger=ledger, stop_event=stop_event)
  finally:
    await client.aclose()


def evaluated_set(result):
  return sorted((r.chain, r.seq, r.template) for r in result.records)


def logged_rows(workdir):
  with open(os.path.join(workdir, "prompts.jsonl"), "rb") as f:
    return [orjson.loads(l) for l in f.read().splitlines()]


def test_faults_are_survived_counted_and_only_valid_templates_scored(
    server, tmp_path):
  server.script([
      fake.rate_limit(retry_after=0.05), fake.status(500), fake.status(503),
      fake.timeout(6.0), fake.drop(), fake.non_json(), fake.empty_choices(),
      fake.null_content(),
      fake.reply("Sure, happy to help with that!"),
      fake.reply('- "a photo of a dog"'),
      fake.reply('- "A {} with {0.__class__}"\n- "{name} photo of {}"'),
      fake.echo(),
  ])
  scorer = WordScorer()
  cfg = small_config()
  result = asyncio.run(llm_search(cfg, server, tmp_path / "w",
                                  tmp_path / "c", scorer=scorer,
                                  timeout_s=2.0, max_retries=10))
  assert result.stop_reason == "completed"
  assert result.llm["faults"] == {
      "http_429": 1, "http_500": 1, "http_503": 1, "timeout": 1,
      "connection": 1, "malformed_json": 1, "no_choices": 1,
      "null_content": 1}
  # Four replies had no valid template: each is a failed attempt, retried.
  assert result.counts["failed_attempts"] == 4
  assert result.counts["skipped_iterations"] == 0
  rej = result.counts["rejections"]
  assert rej["format_field"] == 2 and rej["no_slot"] == 1
  assert rej["duplicate"] >= 1
  # Every iteration of every chain produced one scored template.
  proposed = [r for r in result.records if r.step > 0]
  assert len(proposed) == cfg.n_restart * cfg.n_reset * cfg.n_iter
  assert all(r.ok for r in result.records)
  for t in scorer.received:
    assert tpl.invalid_reason(t) is None
    assert "{0" not in t and "{name}" not in t
  # The transcript keeps each rejection with its reason.
  with open(tmp_path / "w" / "transcript.jsonl", "rb") as f:
    rows = [orjson.loads(l) for l in f.read().splitlines()]
  reasons = [r["reason"] for row in rows for r in row.get("rejections", [])]
  assert any(r.startswith("format field '{0.__class__}'") for r in reasons)
  assert any(r.startswith("format field '{name}'") for r in reasons)


@pytest.mark.parametrize("action,words", [
    (fake.quota(), "quota"), (fake.unauthorized(), "LMBBO_TEST_KEY")])
def test_quota_and_401_stop_the_run_and_keep_work(server, tmp_path,
                                                  monkeypatch, action, words):
  monkeypatch.setenv("LMBBO_TEST_KEY", SECRET)
  server.fault_fn = lambda i, body: action
  cfg = small_config()
  with pytest.raises(LLMFatalError) as err:
    asyncio.run(llm_search(cfg, server, tmp_path / "w", tmp_path / "c"))
  assert words in str(err.value) and SECRET not in str(err.value)
  assert len(server.requests) <= cfg.n_restart  # never retried
  partial = err.value.partial_result
  assert len(logged_rows(tmp_path / "w")) == len(partial.records) > 0
  assert partial.initial_best is not None
  for f in glob.glob(str(tmp_path / "**" / "*"), recursive=True):
    if os.path.isfile(f):
      assert SECRET.encode() not in open(f, "rb").read()


def test_llm_search_improves_on_the_initial_pool(server, tmp_path):
  result = asyncio.run(llm_search(small_config(n_iter=5), server,
                                  tmp_path / "w", tmp_path / "c"))
  best, init = result.best, result.initial_best
  assert best.accuracy["train"] > init.accuracy["train"]
  train = [r.accuracy["train"] for r in result.records if r.ok]
  assert best.accuracy["train"] == max(train)
  # One call per iteration, plus one per reply that gave no new template.
  assert result.llm["calls"] == 2 * 2 * 5 + result.counts["failed_attempts"]
  assert result.counts["proposals"] == 2 * 2 * 5


def edit_search(tmp_path, name, scorer, **kw):
  cfg = small_config(n_iter=6, m_new=2, **kw)

  async def go():
    with RunLog(tmp_path / name, fsync=False) as log:
      return await run_search(cfg, scorer, make_proposer_factory("edit", cfg),
                              log)
  return asyncio.run(go())


def test_test_accuracy_never_influences_the_search(tmp_path):
  a = edit_search(tmp_path, "a", WordScorer(test_fn=lambda train: 1 - train))
  b = edit_search(tmp_path, "b", WordScorer(test_fn=lambda train: 0.5))
  assert evaluated_set(a) == evaluated_set(b)
  assert a.best.template == b.best.template
  assert a.best.accuracy["train"] == max(
      r.accuracy["train"] for r in a.records)
  assert a.best.accuracy["train"] > a.initial_best.accuracy["train"]
  # The edit search is seeded: a rerun gives the same records.
  c = edit_search(tmp_path, "c", WordScorer())
  assert evaluated_set(a) == evaluated_set(c)


class TieScorer:
  """All templates tie on train accuracy; logprob ties for 'tie' templates."""

  async def score_async(self, templates):
    out = []
    for t in templates:
      lp = -0.5 if "tie" in t else -1.0 - 0.01 * len(t)
      out.append(Score(template=t, accuracy={"train": 0.5, "val": 0.5,
                                             "test": 0.9 if "bad" in t else 0},
                       logprob={"train": lp}))
    return out


def test_tie_break_logprob_then_earliest(tmp_path):
  corpus = ["a bad {}", "a tie {} one", "a tie {} two", "a {} long long long"]
  cfg = SearchConfig(n_restart=2, n_reset=1, n_iter=1, init_pool_size=4)

  async def go():
    with RunLog(tmp_path / "t", fsync=False) as log:
      return await run_search(cfg, TieScorer(),
                              make_proposer_factory("edit", cfg), log,
                              corpus=corpus)
  result = asyncio.run(go())
  ties = [r for r in result.records if "tie" in r.template]
  earliest = min(ties, key=lambda r: (r.step, r.chain, r.seq))
  assert result.best_record is earliest
  assert result.best_record.step == 0 and result.best_record.chain == 0


class LogprobRewriter(WordScorer):
  """WordScorer with the log-probabilities replaced (None: withheld, as a black box)."""

  def __init__(self, rewrite):
    super().__init__()
    self.rewrite = rewrite

  async def score_async(self, templates):
    import dataclasses
    return [dataclasses.replace(s, logprob=self.rewrite(s.logprob)) if s.ok else s
            for s in await super().score_async(templates)]


def test_tie_break_none_is_blind_to_logits(tmp_path):
  withheld = lambda lp: {}
  reversed_ = lambda lp: {k: -v for k, v in lp.items()}
  runs = {(tie, name): edit_search(tmp_path, f"{tie}-{name}", LogprobRewriter(fn),
                                   tie_break=tie)
          for tie in ("none", "logprob")
          for name, fn in (("given", lambda lp: lp), ("withheld", withheld),
                           ("reversed", reversed_))}
  strict = [runs["none", n] for n in ("given", "withheld", "reversed")]
  for other in strict[1:]:  # Logits withheld or rewritten: nothing changes.
    assert evaluated_set(other) == evaluated_set(strict[0])
    assert other.best_record.order() == strict[0].best_record.order()
  # The same searches with the log-probability tie-break do read them.
  assert evaluated_set(runs["logprob", "given"]) != evaluated_set(runs["logprob", "reversed"])
  with pytest.raises(SearchError, match="tie_break"):
    SearchConfig(tie_break="logits").validate()


def test_select_by_train_val(tmp_path):
  class ValScorer:
    async def score_async(self, templates):
      return [Score(template=t, accuracy={
          "train": 0.5, "val": 0.9 if "photo" in t else 0.1, "test": 0.0})
              for t in templates]
  cfg = SearchConfig(n_restart=1, n_iter=1, init_pool_size=3,
                     select_by="train_val")

  async def go():
    with RunLog(tmp_path / "v", fsync=False) as log:
      return await run_search(cfg, ValScorer(),
                              make_proposer_factory("edit", cfg), log,
                              corpus=["a {} x", "a photo of {}", "the {} y"])
  assert asyncio.run(go()).best.template == "a photo of {}"


def test_max_calls_is_a_clean_stop(server, tmp_path):
  ledger = Ledger("gpt-4o-mini", max_calls=3)
  result = asyncio.run(llm_search(small_config(), server, tmp_path / "w",
                                  tmp_path / "c", ledger=ledger))
  assert result.stop_reason == "max_calls"
  assert len(server.requests) == 3
  assert len([r for r in result.records if r.step > 0]) == 3
  assert len(logged_rows(tmp_path / "w")) == len(result.records)


def test_rerun_with_cache_spends_nothing(server, tmp_path):
  cfg = small_config()
  first = asyncio.run(llm_search(cfg, server, tmp_path / "a", tmp_path / "c"))
  n = len(server.requests)
  again = asyncio.run(llm_search(cfg, server, tmp_path / "b", tmp_path / "c"))
  assert len(server.requests) == n
  assert evaluated_set(first) == evaluated_set(again)
  assert again.llm["calls"] == 0 and again.llm["cached_calls"] == n


def test_resume_from_a_partial_log_replays_scores_and_calls(server, tmp_path):
  cfg = small_config()
  full = asyncio.run(llm_search(cfg, server, tmp_path / "full",
                                tmp_path / "c"))
  n_requests = len(server.requests)
  # A run killed after 27 evaluations, mid-write of the 28th.
  os.makedirs(tmp_path / "part")
  shutil.copy(tmp_path / "full" / "search_config.json", tmp_path / "part")
  with open(tmp_path / "full" / "prompts.jsonl", "rb") as f:
    lines = f.read().splitlines(keepends=True)
  with open(tmp_path / "part" / "prompts.jsonl", "wb") as f:
    f.writelines(lines[:27])
    f.write(lines[27][:15])
  scorer = WordScorer()
  resumed = asyncio.run(llm_search(cfg, server, tmp_path / "part",
                                   tmp_path / "c", scorer=scorer, resume=True))
  assert len(server.requests) == n_requests  # every reply from the cache
  assert evaluated_set(resumed) == evaluated_set(full)
  assert resumed.counts["replayed"] == 27
  assert len(scorer.received) == len(full.records) - 27
  rows = logged_rows(tmp_path / "part")
  assert len(rows) == len(full.records)
  assert len({(r["chain"], r["seq"]) for r in rows}) == len(rows)
  assert resumed.best.template == full.best.template


def test_workdir_guards(server, tmp_path):
  cfg = small_config(n_iter=1)
  asyncio.run(llm_search(cfg, server, tmp_path / "w", tmp_path / "c"))
  with pytest.raises(RunLogError, match="--resume"):
    RunLog(tmp_path / "w")
  with pytest.raises(RunLogError, match="n_iter"):
    asyncio.run(llm_search(small_config(n_iter=2), server, tmp_path / "w",
                           tmp_path / "c", resume=True))
  with pytest.raises(SearchError, match="feedback"):
    SearchConfig(feedback="sideways").validate()


def test_stop_event_stops_cleanly_and_resume_completes(server, tmp_path):
  server.delay_s = 0.05
  cfg = small_config(n_iter=4)
  full = asyncio.run(llm_search(cfg, server, tmp_path / "full",
                                tmp_path / "c1"))

  async def interrupted():
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.25, stop.set)
    return await llm_search(cfg, server, tmp_path / "w", tmp_path / "c2",
                            stop_event=stop)
  part = asyncio.run(interrupted())
  assert part.stop_reason == "signal"
  assert 0 < len(part.records) < len(full.records)
  done = asyncio.run(llm_search(cfg, server, tmp_path / "w", tmp_path / "c2",
                                resume=True))
  assert done.stop_reason == "completed"
  assert evaluated_set(done) == evaluated_set(full)


def test_eight_chains_run_concurrently(server, tmp_path):
  """16 calls over 8 chains at 1 s each: all eight first calls in flight at once."""
  server.delay_s = 1.0
  cfg = SearchConfig(n_restart=8, n_reset=1, n_iter=2, init_pool_size=5,
                     conversation="multi_turn")
  start = time.monotonic()
  result = asyncio.run(llm_search(cfg, server, tmp_path / "w", tmp_path / "c",
                                  max_concurrency=8))
  calls = result.llm["calls"]
  assert calls == 16 and server.max_concurrency == 8
  spans = sorted((r.t_start - start, r.t_end - start) for r in server.requests)
  timeline = f"wall {time.monotonic() - start:.2f} s; calls " + ", ".join(
      f"{a:.2f}-{b:.2f}" for a, b in spans)
  # Concurrency is checked on the server's own clock, not by the test's wall time
  # (speed is the bench's to measure; a loaded machine adds time that says nothing
  # of the client): the eight chains' first calls overlap, as do most calls overall.
  assert max(a for a, _ in spans[:8]) < min(b for _, b in spans[:8]), timeline
  assert result.llm["mean_concurrency"] > 6, timeline


def test_replay_proposer_reproduces_a_recorded_run(server, tmp_path):
  cfg = small_config()
  original = asyncio.run(llm_search(cfg, server, tmp_path / "llm",
                                    tmp_path / "c"))

  async def replay():
    with RunLog(tmp_path / "replay", fsync=False) as log:
      factory = make_proposer_factory(
          "replay", cfg, transcript=str(tmp_path / "llm"))
      return await run_search(cfg, WordScorer(), factory, log)
  replayed = asyncio.run(replay())
  assert evaluated_set(replayed) == evaluated_set(original)
  assert {r.proposer for r in replayed.records} == {"init", "replay"}


def test_bad_base_url_is_a_clear_error():
  from lmbbo_jax.llm import LLMError
  with pytest.raises(LLMError, match="http://"):
    LLMClient("localhost:8000/v1", "m")


def test_dry_run_estimate():
  cfg = SearchConfig(n_restart=4, n_reset=2, n_iter=10)
  est = estimate(cfg, Ledger("gpt-4o-mini"))
  assert est["calls"] == 80
  assert est["prompt_tokens"] > 80 * 100 and est["cost_usd"] > 0


def test_dry_run_counts_the_growth_of_multi_turn_prompts(tmp_path):
  """The estimate matches what a multi-turn search really sends, turn by turn."""
  from lmbbo_jax.search.optimizer import estimate_tokens
  cfg = small_config(n_restart=2, n_reset=1, n_iter=6, m_new=2, k_pos=3, k_neg=3,
                     show_scores=True)
  with fake.FakeLLMServer(n_templates=2) as srv:
    asyncio.run(llm_search(cfg, srv, tmp_path / "w", tmp_path / "c"))
    sent = sum(estimate_tokens(m["content"]) for r in srv.requests
               for m in r.body["messages"])
    calls = len(srv.requests)
  est = estimate(cfg, Ledger("gpt-4o-mini"), max_tokens=200)
  assert est["calls"] == calls == 12
  assert 0.75 <= est["prompt_tokens"] / sent <= 1.33
  single = estimate(small_config(n_restart=2, n_reset=1, n_iter=6, m_new=2,
                                 conversation="single_turn"), Ledger("gpt-4o-mini"))
  assert est["prompt_tokens"] > 1.5 * single["prompt_tokens"]  # growth counted
  assert est["prompt_tokens_worst"] > est["prompt_tokens"]
  assert est["completion_tokens_worst"] == 12 * 200


def test_a_chain_that_gives_up_says_why_and_per_chain_counts_add_up(server, tmp_path):
  server.script([fake.reply("no templates here")] * 40)
  cfg = small_config(n_restart=1, n_reset=1, n_iter=6, max_failed_attempts=2,
                     max_skipped_iterations=2)
  result = asyncio.run(llm_search(cfg, server, tmp_path / "w", tmp_path / "c"))
  assert result.stop_reason == "format_failures"
  assert result.chain_stop_reasons == {0: "format_failures"}
  chain = result.counts["per_chain"]["0"]
  assert chain["llm_calls"] == 4 and chain["skipped_iterations"] == 2
  assert chain["valid_new"] == 0 and chain["valid_new_fraction"] == 0.0
  assert chain["templates_requested"] == 4 * cfg.m_new


@pytest.mark.parametrize("kind", ["llm", "ape", "iterative_ape"])
def test_black_box_baselines_spend_the_same_call_budget(server, tmp_path, kind):
  config = small_config(n_reset=2, n_iter=2)
  ledger = Ledger("gpt-4o-mini")
  client = LLMClient(server.base_url, "gpt-4o-mini", ledger=ledger,
                     api_key_env="LMBBO_TEST_KEY", initial_backoff_s=0.01,
                     max_backoff_s=0.05)

  async def go():
    try:
      with RunLog(tmp_path / kind, fsync=False) as log:
        return await run_search(config, WordScorer(),
                                make_proposer_factory(kind, config, client=client), log,
                                ledger=ledger)
    finally:
      await client.aclose()
  result = asyncio.run(go())
  assert ledger.calls == config.n_restart * config.n_reset * config.n_iter
  assert {r.proposer for r in result.records if r.step > 0} == {kind}
  assert result.best.accuracy["train"] >= result.initial_best.accuracy["train"]
