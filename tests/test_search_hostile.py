"""A search whose LLM sends one reply of each hostile kind: it completes, and
each bad reply is recorded (a rejection with its reason, or a failed call
with its error) in the transcript; the canary key reaches no file."""

import asyncio
import glob
import os

import orjson

import fake_llm_server as fake
import hostile_servers as hs
from search_helpers import WordScorer
from lmbbo_jax.llm import Ledger, LLMClient, ResponseCache
from lmbbo_jax.search import (RunLog, SearchConfig, make_proposer_factory,
                              run_search)

CANARY = "sk-canary-search-5be1d07c9a3f"
ENV = "LMBBO_HOSTILE_SEARCH_KEY"
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def good(req):
  return hs.json_answer(hs.completion(fake.default_reply(req.json),
                                      usage=USAGE))


def echo_key(req):
  return hs.json_answer(hs.completion(
      f'- "a {{}} {req.headers["authorization"]}"', usage=USAGE))


def utf8(data: bytes) -> hs.Behaviour:
  body = orjson.dumps(hs.completion('- "a XX photo of a {}."', usage=USAGE))
  return hs.raw(200, body.replace(b"XX", data))


# (behaviour, what its transcript row must hold): ("rejection", words) for
# a billed reply that cannot be used, ("error", words) for a failed call,
# ("reply", None) for an answer read correctly despite its form (its
# templates then go to the parser like any other reply's).
HOSTILE = [
    (hs.json_answer(hs.completion(None, refusal="I won't do that.",
                                  usage=USAGE)), ("rejection", "refused")),
    (hs.json_answer(hs.completion(None, tool_calls=[{"id": "t"}],
                                  usage=USAGE)), ("rejection", "tool calls")),
    (hs.json_answer(hs.completion("", usage=USAGE)), ("rejection", "empty")),
    (hs.json_answer(hs.completion("- \"a", finish_reason="content_filter",
                                  usage=USAGE)),
     ("rejection", "content filter")),
    (hs.compressed("gzip", hs.bomb("gzip")), ("error", "larger than")),
    (hs.compressed("br", b"\x0b" * 64), ("error", "gzip or deflate")),
    (hs.trickle(0.05), ("error", "deadline")),
    (hs.trickle_headers(0.05), ("error", "deadline")),
    (hs.silent(), ("error", "timeout")),
    (hs.sse(["a"], endless_every_s=0.05), ("error", "deadline")),
    (hs.raw(200, b"\xff\xfe<html>"), ("error", "not a JSON object")),
    (hs.json_answer({"error": {"message": "wait"}}, 429,
                    {"Retry-After": "1e12"}), ("error", "http_429")),
    (hs.sse(['- "a streamed', ' photo of a {}."']), ("reply", None)),
    (utf8(b"\xff\xc3"), ("reply", None)),
    (utf8(rb"\ud800"), ("reply", None)),
    (hs.dynamic(echo_key), ("reply", None)),
]


def test_a_search_survives_one_reply_of_each_hostile_kind(tmp_path,
                                                          monkeypatch):
  monkeypatch.setenv(ENV, CANARY)
  script = [b for b, _ in HOSTILE] + [hs.dynamic(good)]
  # One chain, so replies arrive in script order, one transcript row each;
  # max_failed_attempts leaves room for every bad reply in one iteration.
  config = SearchConfig(n_restart=1, n_reset=1, n_iter=6, init_pool_size=10,
                        conversation="multi_turn", seed=0,
                        max_failed_attempts=len(HOSTILE) + 1)
  ledger = Ledger("gpt-4o-mini")
  with hs.HostileServer(script, max_requests=40) as srv:
    client = LLMClient(srv.base_url, "gpt-4o-mini", api_key_env=ENV,
                       ledger=ledger, max_retries=0, timeout_s=0.5,
                       deadline_s=0.8, max_tokens=50,
                       cache=ResponseCache(tmp_path / "cache"))

    async def search():
      try:
        with RunLog(tmp_path / "w", fsync=False) as log:
          return await run_search(config, WordScorer(), make_proposer_factory(
              "llm", config, client=client), log, ledger=ledger)
      finally:
        await client.aclose()

    result = asyncio.run(search())
  assert result.stop_reason == "completed"
  with open(tmp_path / "w" / "transcript.jsonl", "rb") as f:
    rows = [orjson.loads(l) for l in f.read().splitlines()]
  attempts = [r for r in rows if r.get("kind") == "attempt"]
  for (_, (kind, words)), row in zip(HOSTILE, attempts):
    if kind == "error":
      assert words in row["error"], row["error"]
    elif kind == "rejection":
      assert not row["accepted"]
      assert words in row["rejections"][0]["reason"], row["rejections"]
      assert row["outcome"] != "text"
    else:
      assert row["outcome"] == "text" and row["reply"]
      assert row["accepted"] or row["rejections"]
  refusal = attempts[0]  # the refusal's own words: reply and reason
  assert refusal["reply"] == "I won't do that."
  assert "I won't do that." in refusal["rejections"][0]["reason"]
  assert len(attempts) == len(srv.requests) > len(HOSTILE)
  assert result.counts["proposals"] == config.n_iter
  assert result.counts["skipped_iterations"] == 0
  assert ledger.unusable == {"refusal": 1, "tool_calls": 1, "empty": 1,
                             "content_filter": 1, "body_too_large": 1,
                             "bad_encoding": 1, "cut_short": 2,
                             "malformed_json": 1}
  for f in glob.glob(str(tmp_path / "**" / "*"), recursive=True):
    if os.path.isfile(f):
      assert CANARY.encode() not in open(f, "rb").read()
