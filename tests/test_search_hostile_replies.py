"""A search whose LLM sends hostile replies completes; each bad reply costs a rejection or a retry, never the run."""

import asyncio

import orjson

import fake_llm_server as fake
from search_helpers import WordScorer
from lmbbo_jax import templates as tpl
from lmbbo_jax.llm import Ledger, LLMClient
from lmbbo_jax.search import RunLog, SearchConfig, make_proposer_factory, run_search

# Replies that stalled the old parser for seconds each (found by
# `python -m lmbbo_jax.tools.fuzz_parser`), or crashed or misled the search.
HOSTILE = [
    "1. " + "</think>" * 5 + "\ufeff\ufeff: " + "}" * 54 + " " * 250 + "\u0301" * 40,
    "A. " * 1600,
    "(" * 1700,
    '{"templates": ["a photo of a {} \\ud800", "a {} written as \\udfff"]}',
    "Here are templates with {} where the class name goes:\n"
    "Note: each keeps {} once.\n- a rendering of a {}\n- a drawing of a {}",
    "<think>" + "hmm, {} " * 120_000 + "</think>\n- a cartoon of a {}",
    "[" * 50_000 + "]" * 50_000,
    "Avoid [] and [\"photo\", \"image\"].\n- a clay model of a {}",
]


def test_a_search_survives_one_reply_of_each_hostile_kind(tmp_path):
  with fake.FakeLLMServer() as server:
    server.script([fake.reply(text) for text in HOSTILE])
    config = SearchConfig(n_restart=1, n_reset=1, n_iter=6, init_pool_size=5, seed=0)
    scorer = WordScorer()

    async def search():
      ledger = Ledger("gpt-4o-mini")
      client = LLMClient(server.base_url, "gpt-4o-mini", ledger=ledger,
                         api_key_env="LMBBO_TEST_KEY", initial_backoff_s=0.01)
      try:
        with RunLog(tmp_path, fsync=False) as log:
          return await run_search(config, scorer,
                                  make_proposer_factory("llm", config, client=client),
                                  log, ledger=ledger)
      finally:
        await client.aclose()

    result = asyncio.run(search())
  assert result.stop_reason == "completed"
  for t in scorer.received:
    assert tpl.invalid_reason(t) is None
  with open(tmp_path / "transcript.jsonl", "rb") as f:
    rows = [orjson.loads(line) for line in f.read().splitlines()]
  replies = [r for r in rows if r.get("kind") == "attempt" and "reply" in r]
  assert len(replies) >= len(HOSTILE)
  by_reply = {row["reply"][:40]: row for row in replies}
  surrogates = by_reply[HOSTILE[3][:40]]
  assert surrogates["accepted"] == []
  assert [r["reason"][:28] for r in surrogates["rejections"]] == [
      "not writable as UTF-8 (lone "] * 2
  # the prose that mentions the slot never takes the single new place (m_new = 1)
  assert by_reply[HOSTILE[4][:40]]["accepted"] == ["a rendering of a {}"]
  assert by_reply[HOSTILE[5][:40]]["accepted"] == ["a cartoon of a {}"]
  assert by_reply[HOSTILE[7][:40]]["accepted"] == ["a clay model of a {}"]
  for reply in (HOSTILE[0], HOSTILE[1], HOSTILE[2], HOSTILE[6]):
    assert by_reply[reply[:40]]["accepted"] == []
  # every scored template was logged and reads back
  with open(tmp_path / "prompts.jsonl", "rb") as f:
    logged = [orjson.loads(line)["template"] for line in f.read().splitlines()]
  assert len(logged) == config.init_pool_size + config.n_iter
