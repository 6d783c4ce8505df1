"""LLMClient against the loopback fake server: retries, fatal errors, secrets."""

import asyncio
import glob
import logging
import os
import time

import pytest

import fake_llm_server as fake
from lmbbo_jax.llm import (Ledger, LLMClient, LLMFatalError,
                           LLMRetriesExhausted, ResponseCache)

SECRET = "sk-test-SECRET-0123456789"
MESSAGES = [{"role": "user", "content": "Write a template."}]


@pytest.fixture
def server():
  with fake.FakeLLMServer() as srv:
    yield srv


def make_client(server, tmp_path=None, **kw):
  kw.setdefault("initial_backoff_s", 0.01)
  kw.setdefault("max_backoff_s", 0.05)
  kw.setdefault("timeout_s", 5.0)
  cache = kw.pop("cache", None)
  if cache is None and tmp_path is not None:
    cache = ResponseCache(tmp_path / "cache", "readwrite")
  return LLMClient(server.base_url, kw.pop("model", "gpt-4o-mini"),
                   api_key_env="LMBBO_TEST_KEY", cache=cache, **kw)


def run(coro):
  return asyncio.run(coro)


async def _chat(client, call_key="r0-i0-a0", messages=MESSAGES):
  try:
    return await client.chat(messages, chain_id="s0-c0", call_key=call_key)
  finally:
    await client.aclose()


def test_success_records_usage_and_bearer_only_when_set(server, monkeypatch):
  monkeypatch.setenv("LMBBO_TEST_KEY", SECRET)
  server.script([fake.reply('- "a photo of a {}."')])
  client = make_client(server)
  result = run(_chat(client))
  assert result.text == '- "a photo of a {}."'
  assert not result.cached and len(result.call_id) == 20
  assert result.usage["prompt_tokens"] == 100
  assert server.requests[0].authorization == f"Bearer {SECRET}"
  body = server.requests[0].body
  assert body["model"] == "gpt-4o-mini" and body["messages"] == MESSAGES
  assert body["temperature"] == 1.0 and isinstance(body["seed"], int)
  s = client.ledger.summary()
  assert s["calls"] == 1 and s["prompt_tokens"] == 100
  assert s["completion_tokens"] == 20
  assert s["cost_usd"] == pytest.approx((100 * 0.15 + 20 * 0.60) / 1e6)
  monkeypatch.delenv("LMBBO_TEST_KEY")
  run(_chat(make_client(server), call_key="r0-i0-a1"))
  assert server.requests[1].authorization is None


@pytest.mark.parametrize("action,kind", [
    (fake.rate_limit(retry_after=0.01), "http_429"),
    (fake.status(500), "http_500"),
    (fake.status(503), "http_503"),
    (fake.status(408), "http_408"),
    (fake.drop(), "connection"),
    (fake.non_json(), "malformed_json"),
    (fake.empty_choices(), "no_choices"),
    (fake.null_content(), "null_content"),
])
def test_transient_faults_are_retried_and_counted(server, action, kind):
  server.script([action, action])
  client = make_client(server)
  result = run(_chat(client))
  assert "{}" in result.text  # the third request got the default answer
  assert len(server.requests) == 3
  s = client.ledger.summary()
  assert s["faults"] == {kind: 2}
  assert s["calls"] == 1 and s["requests"] == 3


def test_timeout_is_retried(server):
  server.script([fake.timeout(6.0)])
  client = make_client(server, timeout_s=1.5)
  result = run(_chat(client))
  assert "{}" in result.text
  assert client.ledger.faults == {"timeout": 1}


@pytest.mark.parametrize("action,wait", [
    (fake.rate_limit(retry_after=0.4), 0.4),
    (fake.rate_limit(retry_after_ms=300), 0.3),
])
def test_retry_after_is_the_minimum_wait(server, action, wait):
  server.script([action])
  client = make_client(server)
  run(_chat(client))
  gap = server.requests[1].t_start - server.requests[0].t_start
  assert gap >= wait * 0.95
  assert gap < wait + 1.0


def test_quota_429_is_fatal_and_not_retried(server, monkeypatch):
  monkeypatch.setenv("LMBBO_TEST_KEY", SECRET)
  server.script([fake.quota()])
  client = make_client(server)
  with pytest.raises(LLMFatalError) as err:
    run(_chat(client))
  assert len(server.requests) == 1
  assert "quota" in str(err.value) and "--resume" in str(err.value)
  assert err.value.status == 429
  assert SECRET not in str(err.value)
  assert client.ledger.summary()["calls"] == 0


@pytest.mark.parametrize("action,status,words", [
    (fake.unauthorized(), 401, "LMBBO_TEST_KEY"),
    (fake.status(404), 404, "--llm_base_url"),
    (fake.status(400), 400, "--llm_model"),
    (fake.status(422), 422, "--llm_model"),
    (fake.status(403), 403, "LMBBO_TEST_KEY"),
])
def test_client_errors_are_fatal_with_a_hint(server, monkeypatch, action,
                                             status, words):
  monkeypatch.setenv("LMBBO_TEST_KEY", SECRET)
  server.script([action])
  with pytest.raises(LLMFatalError) as err:
    run(_chat(make_client(server)))
  assert err.value.status == status
  assert words in str(err.value)
  assert SECRET not in str(err.value)
  assert len(server.requests) == 1


def test_server_echoing_the_key_is_redacted(server, monkeypatch):
  monkeypatch.setenv("LMBBO_TEST_KEY", SECRET)
  server.script([fake.status(401, f"bad key {SECRET}")])
  with pytest.raises(LLMFatalError) as err:
    run(_chat(make_client(server)))
  assert SECRET not in str(err.value) and "***" in str(err.value)


def test_retries_are_bounded(server):
  server.fault_fn = lambda i, body: fake.status(503)
  client = make_client(server, max_retries=3)
  with pytest.raises(LLMRetriesExhausted) as err:
    run(_chat(client))
  assert len(server.requests) == 4
  assert err.value.last_fault == "http_503" and err.value.attempts == 4
  assert client.ledger.failed_calls == 1


def test_deadline_bounds_a_call(server):
  server.fault_fn = lambda i, body: fake.status(503)
  client = make_client(server, max_retries=1000, initial_backoff_s=0.05,
                       max_backoff_s=0.05, deadline_s=0.5)
  start = time.monotonic()
  with pytest.raises(LLMRetriesExhausted):
    run(_chat(client))
  assert time.monotonic() - start < 2.0
  assert 2 <= len(server.requests) < 50


def test_max_concurrency_is_respected(server):
  server.delay_s = 0.5

  async def many():
    client = make_client(server, max_concurrency=2)
    try:
      await asyncio.gather(*(client.chat(MESSAGES, chain_id=f"c{i}",
                                         call_key="k") for i in range(6)))
    finally:
      await client.aclose()
    return client

  client = run(many())
  assert server.max_concurrency == 2
  assert client.ledger.max_inflight == 2
  assert client.ledger.mean_concurrency == pytest.approx(2.0, abs=0.5)
  s = client.ledger.summary()
  assert s["latency_p50_s"] >= 0.5 and s["latency_p95_s"] >= s["latency_p50_s"]


def test_cache_replays_and_never_stores_the_key(server, tmp_path,
                                                monkeypatch, caplog):
  monkeypatch.setenv("LMBBO_TEST_KEY", SECRET)
  caplog.set_level(logging.DEBUG)
  server.script([fake.status(503)])
  first = run(_chat(make_client(server, tmp_path)))
  assert len(server.requests) == 2
  client = make_client(server, tmp_path)
  again = run(_chat(client))
  assert again.cached and again.text == first.text
  assert again.call_id == first.call_id
  assert len(server.requests) == 2  # nothing sent
  assert client.ledger.cached_calls == 1 and client.ledger.calls == 0
  # A different attempt index is a different request.
  run(_chat(make_client(server, tmp_path), call_key="r0-i0-a1"))
  assert len(server.requests) == 3
  files = glob.glob(str(tmp_path / "**" / "*"), recursive=True)
  assert any(f.endswith(".json") for f in files)
  for f in files:
    if os.path.isfile(f):
      with open(f, "rb") as fh:
        assert SECRET.encode() not in fh.read()
  assert SECRET not in caplog.text


def test_cache_modes(server, tmp_path):
  run(_chat(make_client(server, cache=ResponseCache(tmp_path, "read"))))
  assert len(server.requests) == 1
  assert not os.listdir(tmp_path)  # read mode stores nothing
  run(_chat(make_client(server, cache=ResponseCache(tmp_path, "readwrite"))))
  run(_chat(make_client(server, cache=ResponseCache(tmp_path, "off"))))
  assert len(server.requests) == 3  # off: neither read nor written
  r = run(_chat(make_client(server, cache=ResponseCache(tmp_path, "read"))))
  assert r.cached and len(server.requests) == 3


def test_budget_refuses_a_call_whose_worst_case_does_not_fit(server):
  from lmbbo_jax.llm import LLMBudgetExceeded
  from lmbbo_jax.llm.client import prompt_token_bound
  price_in = 1e6  # 1 USD per prompt token, completions free
  bound = prompt_token_bound(MESSAGES)
  # Room for one worst case, not two: the second call is refused unsent.
  ledger = Ledger("pricey", prices={"pricey": (price_in, 0.0)},
                  budget_usd=1.5 * bound)
  client = make_client(server, model="pricey", ledger=ledger)

  async def two():
    try:
      await client.chat(MESSAGES, chain_id="c", call_key="a")
      with pytest.raises(LLMBudgetExceeded) as err:
        await client.chat(MESSAGES, chain_id="c", call_key="b")
      return err.value
    finally:
      await client.aclose()

  err = run(two())
  assert err.reason == "budget" and "--llm_budget_usd" in str(err)
  assert len(server.requests) == 1
  assert 0 < ledger.cost_usd <= ledger.budget_usd


@pytest.mark.parametrize("limit", ["calls", "usd"])
def test_concurrent_calls_never_exceed_the_limits(limit):
  """A slow server, 12 concurrent chains: the caps hold with calls in flight."""
  from lmbbo_jax.llm import LLMBudgetExceeded
  with fake.FakeLLMServer(delay_s=0.3, realistic_usage=True) as srv:
    prices = {"m": (2.0, 8.0)}  # USD per 1M tokens
    if limit == "calls":
      ledger = Ledger("m", prices=prices, max_calls=5)
    else:
      probe = Ledger("m", prices=prices)
      from lmbbo_jax.llm.client import prompt_token_bound
      worst = probe.cost_of(prompt_token_bound(MESSAGES), 50)
      ledger = Ledger("m", prices=prices, budget_usd=4.5 * worst)
    client = make_client(srv, model="m", ledger=ledger, max_tokens=50,
                         max_concurrency=12)

    async def chain(i):
      done = 0
      for k in range(4):
        try:
          await client.chat(MESSAGES, chain_id=f"c{i}", call_key=f"k{k}")
          done += 1
        except LLMBudgetExceeded:
          break
      return done

    async def all_chains():
      try:
        return await asyncio.gather(*(chain(i) for i in range(12)))
      finally:
        await client.aclose()

    done = sum(run(all_chains()))
    assert srv.max_concurrency > 1  # calls really were in flight together
    assert done == len(srv.requests) == ledger.calls
    if limit == "calls":
      assert ledger.calls == 5
    else:
      assert 4 <= ledger.calls and ledger.cost_usd <= ledger.budget_usd


def test_requests_per_minute_window_holds():
  from lmbbo_jax.llm.ratelimit import RateLimiter
  with fake.FakeLLMServer() as srv:
    client = make_client(srv, max_concurrency=8,
                         rate_limiter=RateLimiter(rpm=3, window_s=1.0))

    async def many():
      try:
        await asyncio.gather(*(client.chat(MESSAGES, chain_id=f"c{i}",
                                           call_key="k") for i in range(7)))
      finally:
        await client.aclose()

    run(many())
    starts = sorted(r.t_start for r in srv.requests)
    assert len(starts) == 7
    for i in range(len(starts) - 3):  # no 4 starts within one window
      assert starts[i + 3] - starts[i] >= 1.0 - 0.3  # slack: connection set-up
    assert client.ledger.summary()["queue_p95_s"] >= 1.0 - 0.3


def test_tokens_per_minute_window_holds():
  from lmbbo_jax.llm.client import prompt_token_bound
  from lmbbo_jax.llm.ratelimit import RateLimiter
  per_call = prompt_token_bound(MESSAGES) + 10
  with fake.FakeLLMServer() as srv:
    client = make_client(srv, max_tokens=10, rate_limiter=RateLimiter(
        tpm=2 * per_call, window_s=1.0))

    async def many():
      try:
        await asyncio.gather(*(client.chat(MESSAGES, chain_id=f"c{i}",
                                           call_key="k") for i in range(5)))
      finally:
        await client.aclose()

    run(many())
    starts = sorted(r.t_start for r in srv.requests)
    for i in range(len(starts) - 2):  # 2 calls' tokens per window
      assert starts[i + 2] - starts[i] >= 1.0 - 0.3


def test_server_ratelimit_headers_pause_new_requests():
  from lmbbo_jax.llm.ratelimit import RateLimiter
  headers = {"x-ratelimit-remaining-requests": "0",
             "x-ratelimit-reset-requests": "600ms"}
  with fake.FakeLLMServer(response_headers=headers) as srv:
    client = make_client(srv, rate_limiter=RateLimiter())

    async def two():
      try:
        for k in ("a", "b"):
          await client.chat(MESSAGES, chain_id="c", call_key=k)
      finally:
        await client.aclose()

    run(two())
    a, b = srv.requests
    assert b.t_start - a.t_end >= 0.6 - 0.15
    assert client.rate_limiter.server_holds >= 1


SCHEMA = {"type": "object", "properties": {"templates": {
    "type": "array", "items": {"type": "string"}}}, "required": ["templates"]}


def test_structured_output_dialects_and_a_refusal_detected_once(tmp_path):
  with fake.FakeLLMServer(refuse_response_format="json_schema") as srv:
    client = make_client(srv, tmp_path, structured="json_schema")

    async def three():
      try:
        return [await client.chat(MESSAGES, chain_id="c", call_key=k,
                                  response_schema=SCHEMA) for k in "abc"]
      finally:
        await client.aclose()

    results = run(three())
    # One refused request (500, not retried), then free text for good.
    assert [r.action for r in srv.requests] == ["refused_format", "default",
                                                "default", "default"]
    assert "response_format" not in srv.requests[1].body
    assert client.structured_refused and "json_schema" in client.structured_refused
    assert all(r.structured is None for r in results)
    assert client.ledger.summary()["faults"] == {"structured_refused": 1}
  with fake.FakeLLMServer() as srv:
    client = make_client(srv, structured="json_object")
    r = run(client.chat(MESSAGES, chain_id="c", call_key="a",
                        response_schema=SCHEMA))
    assert srv.requests[0].body["response_format"] == {"type": "json_object",
                                                       "schema": SCHEMA}
    assert r.structured == "json_object" and r.text.startswith('{"templates"')


def test_invalid_request_5xx_is_not_retried(server):
  server.script([fake.status(500, "Input should be 'text' or 'json_object'")])
  with pytest.raises(LLMFatalError) as err:
    run(_chat(make_client(server)))
  assert len(server.requests) == 1 and "invalid" in str(err.value)


def test_finish_reason_length_is_counted():
  with fake.FakeLLMServer(realistic_usage=True, n_templates=4) as srv:
    client = make_client(srv, max_tokens=3)
    r = run(_chat(client))
    assert r.finish_reason == "length"
    assert client.ledger.summary()["truncated_replies"] == 1


def test_base_url_with_credentials_is_not_stored(server, tmp_path):
  url = server.base_url.replace("http://", "http://user:pw-secret@")
  client = LLMClient(url, "m", cache=ResponseCache(tmp_path), api_key_env="X")
  run(_chat(client))
  for f in glob.glob(str(tmp_path / "*" / "*.json")):
    assert b"pw-secret" not in open(f, "rb").read()


def test_a_stopped_local_server_is_fatal_at_once():
  with fake.FakeLLMServer() as srv:
    url = srv.base_url
  client = LLMClient(url, "m", max_retries=6, initial_backoff_s=0.2,
                     server_alive=lambda: "the local server exited (code 1)")
  start = time.monotonic()
  with pytest.raises(LLMFatalError, match="exited"):
    run(_chat(client))
  assert time.monotonic() - start < 1.0  # no retry against a dead server


def test_a_request_larger_than_tpm_waits_for_an_empty_window():
  from lmbbo_jax.llm.ratelimit import RateLimiter
  now = [0.0]
  limiter = RateLimiter(tpm=100, window_s=10.0, clock=lambda: now[0])
  assert limiter._wait_needed(now[0], 30) == 0
  limiter._starts.append((0.0, 30))
  now[0] = 4.0
  assert limiter._wait_needed(now[0], 500) == pytest.approx(6.0)  # until empty
  assert limiter._wait_needed(now[0], 60) == 0  # 30 + 60 fits
  assert limiter._wait_needed(now[0], 80) == pytest.approx(6.0)
