"""The LLM client against hostile loopback servers: bounded, typed, key-free.

Every case runs with a canary key at DEBUG level (the HTTP libraries' own
loggers included, as `-v 2`), and checks that the call ends within its
deadline with the expected answer or one clear `LLMError`, that the ledger
charged exactly the 200 answers, and that the canary appears in no log
record, exception text, result, cache file or usage log.
"""

import asyncio
import datetime
import email.utils
import glob
import gzip
import json
import logging
import os
import threading
import time
import urllib.parse

import pytest

import hostile_servers as hs
from lmbbo_jax.llm import (Ledger, LLMClient, LLMError, LLMFatalError,
                           LLMRetriesExhausted, ResponseCache)
from lmbbo_jax.llm import secrets
from lmbbo_jax.llm.client import prompt_token_bound
from lmbbo_jax.llm.ratelimit import RateLimiter, parse_wait

CANARY = "sk-canary-7f3a9c2e41d8b6f0aa55"
ENV = "LMBBO_HOSTILE_KEY"
MESSAGES = [{"role": "user", "content": "Write a template."}]
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
DEADLINE_S = 1.5
GOOD = hs.json_answer(hs.completion(usage=USAGE))


def echo_key_in(where: str) -> hs.Behaviour:
  """Answers with the request's Authorization header (the key) in `where`."""
  def build(req):
    auth = req.headers.get("authorization", "")
    key = auth.removeprefix("Bearer ")
    if where == "header":
      return hs.json_answer(hs.completion(usage=USAGE),
                            headers={"X-Echo": auth, "X-Key": key})
    if where == "reply":
      return hs.json_answer(hs.completion(
          f'- "a photo of a {{}}." {auth} {urllib.parse.quote(key)}',
          usage=USAGE), headers={"X-Request-Id": key})
    if where == "error_401":
      return hs.json_answer({"error": {"message": f"Incorrect API key {key}",
                                       "code": "invalid_api_key"}}, 401)
    if where == "error_cut":  # the key straddles the 200-character cut
      return hs.json_answer({"error": {"message": "x" * 190 + key}}, 503)
    if where == "error_text":
      return hs.raw(500, f"<html>upstream said: {auth}</html>".encode())
    raise ValueError(where)
  return hs.dynamic(build)


def sse_good():
  return hs.sse(['- "a photo', ' of a {}."'], usage=USAGE)


# name -> (script, client overrides, expectation)
# expectation: ("ok", outcome, text-or-None) or ("error", class, words)
CASES = {
    "sse_unasked": ([sse_good()], {}, ("ok", "text", '- "a photo of a {}."')),
    "sse_without_done": ([hs.sse(["- \"x {}\""], done=False)], {},
                         ("ok", "text", '- "x {}"')),
    "sse_endless": ([hs.sse(["a"], endless_every_s=0.05)], {},
                    ("error", LLMRetriesExhausted, "deadline")),
    "gzip_bomb": ([hs.compressed("gzip", hs.bomb("gzip"))], {},
                  ("error", LLMRetriesExhausted, "larger than")),
    "deflate_bomb": ([hs.compressed("deflate", hs.bomb("deflate"))], {},
                     ("error", LLMRetriesExhausted, "larger than")),
    "brotli_unasked": ([hs.compressed("br", b"\x8b\x02\x80" * 100)], {},
                       ("error", LLMRetriesExhausted, "gzip or deflate")),
    "gzip_small_ok": ([hs.compressed("gzip", gzip.compress(
        json.dumps(hs.completion(usage=USAGE)).encode()))], {},
                      ("ok", "text", '- "a photo of a {}."')),
    "trickled_body": ([hs.trickle(0.05)], {},
                      ("error", LLMRetriesExhausted, "deadline")),
    "trickled_headers": ([hs.trickle_headers(0.05)], {},
                         ("error", LLMRetriesExhausted, "deadline")),
    "silent": ([hs.silent()], {"timeout_s": 0.6},
               ("error", LLMRetriesExhausted, "timeout")),
    "refusal": ([hs.json_answer(hs.completion(
        None, refusal="I can't help with that.", usage=USAGE))], {},
                ("ok", "refusal", "I can't help with that.")),
    "content_filter": ([hs.json_answer(hs.completion(
        "- \"a", finish_reason="content_filter", usage=USAGE))], {},
                       ("ok", "content_filter", None)),
    "tool_calls": ([hs.json_answer(hs.completion(None, tool_calls=[{
        "id": "t", "type": "function",
        "function": {"name": "f", "arguments": "{}"}}], usage=USAGE))], {},
                   ("ok", "tool_calls", "")),
    "empty": ([hs.json_answer(hs.completion("  ", usage=USAGE))], {},
              ("ok", "empty", None)),
    "junk_200": ([hs.raw(200, b"\x00\xffnot json")], {},
                 ("error", LLMRetriesExhausted, "not a JSON object")),
    "invalid_utf8": ([hs.raw(200, json.dumps(hs.completion(
        "- \"a photo of a {}. XX\"", usage=USAGE)).encode().replace(
            b"XX", b"\xff\xfe\xc3"))], {},
                     ("ok", "text", None)),
    "lone_surrogates": ([hs.raw(200, json.dumps(hs.completion(
        "- \"a photo of a {}. XX\"", usage=USAGE)).encode().replace(
            b"XX", rb"\ud800 \udfff"))], {},
                        ("ok", "text", None)),
    "huge_retry_after": ([hs.json_answer({"error": {"message": "slow down"}},
                                         429, {"Retry-After": "1e12"}), GOOD],
                         {"max_server_wait_s": 0.2},
                         ("ok", "text", '- "a photo of a {}."')),
    "retry_after_past_deadline": (
        [hs.json_answer({"error": {"message": "slow down"}}, 429,
                        {"Retry-After": "3600"}), GOOD],
        {"max_server_wait_s": 600.0},
        ("error", LLMRetriesExhausted, "past the call's deadline")),
    "redirect_other_host": (None, {}, ("error", LLMFatalError, "redirect")),
    "echo_key_header": ([echo_key_in("header")], {},
                        ("ok", "text", '- "a photo of a {}."')),
    "echo_key_reply": ([echo_key_in("reply")], {}, ("ok", "text", None)),
    "echo_key_401": ([echo_key_in("error_401")], {},
                     ("error", LLMFatalError, "Incorrect API key")),
    "echo_key_cut": ([echo_key_in("error_cut")], {},
                     ("error", LLMRetriesExhausted, "http_503")),
    "echo_key_error_text": ([echo_key_in("error_text")], {},
                            ("error", LLMRetriesExhausted, "upstream said")),
}


@pytest.fixture
def debug_logs(caplog):
  """Every record at DEBUG, the HTTP libraries' loggers included."""
  caplog.set_level(logging.DEBUG)
  for name in ("httpx", "httpcore", "h11"):
    caplog.set_level(logging.DEBUG, logger=name)
  return caplog


def assert_no_canary(*texts):
  for text in texts:
    assert CANARY not in text
    assert CANARY[:12] not in text  # nor a cut-off prefix of it


def all_log_text(caplog) -> str:
  parts = []
  for r in caplog.records:
    parts.append(r.getMessage())
    parts.append(r.exc_text or "")
  return "\n".join(parts) + caplog.text


def files_text(root) -> str:
  out = []
  for f in glob.glob(str(root / "**" / "*"), recursive=True):
    if os.path.isfile(f):
      out.append(open(f, "rb").read().decode("utf-8", "replace"))
  return "\n".join(out)


def run_case(script, overrides, tmp_path, monkeypatch, other=None):
  monkeypatch.setenv(ENV, CANARY)
  with hs.HostileServer(script, max_requests=6) as srv:
    kw = dict(timeout_s=5.0, deadline_s=DEADLINE_S, max_retries=1,
              initial_backoff_s=0.01, max_backoff_s=0.02)
    kw.update(overrides)
    ledger = Ledger("gpt-4o-mini", log_path=tmp_path / "usage.jsonl")
    client = LLMClient(srv.base_url, "gpt-4o-mini", api_key_env=ENV,
                       ledger=ledger, max_tokens=50,
                       cache=ResponseCache(tmp_path / "cache"), **kw)

    async def go():
      try:
        return await client.chat(MESSAGES, chain_id="c", call_key="k")
      finally:
        await client.aclose()

    start = time.monotonic()
    try:
      outcome = asyncio.run(go())
    except LLMError as e:
      outcome = e
    elapsed = time.monotonic() - start
    return outcome, elapsed, srv, ledger


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_server(name, tmp_path, monkeypatch, debug_logs):
  script, overrides, expect = CASES[name]
  with hs.HostileServer([GOOD]) as other:
    if script is None:  # a redirect to another host (another port)
      script = [hs.raw(307, b"", {"Location": other.base_url
                                  + "/chat/completions"})]
    outcome, elapsed, srv, ledger = run_case(script, overrides, tmp_path,
                                             monkeypatch)
    assert not other.requests  # nothing, least of all the key, went there
  assert elapsed < DEADLINE_S + 1.0, f"{name} held the call {elapsed:.1f} s"
  if expect[0] == "ok":
    _, kind, text = expect
    assert not isinstance(outcome, Exception), outcome
    assert outcome.outcome == kind
    if text is not None:
      assert outcome.text == text
    if kind != "text":
      assert outcome.reason
    outcome.text.encode("utf-8")  # writable whatever the server sent
    shown = repr(outcome)
  else:
    _, cls, words = expect
    assert isinstance(outcome, cls), outcome
    assert words in str(outcome) and "\n" not in str(outcome)
    shown = str(outcome) + repr(outcome)
  assert ledger.requests == len(srv.requests)
  assert_no_canary(shown, all_log_text(debug_logs), files_text(tmp_path))
  assert all(r.headers.get("authorization") == f"Bearer {CANARY}"
             for r in srv.requests)


@pytest.mark.parametrize("name,billed,kind,reported", [
    ("refusal", 1, "refusal", True), ("tool_calls", 1, "tool_calls", True),
    ("empty", 1, "empty", True), ("content_filter", 1, "content_filter", True),
    ("junk_200", 2, "malformed_json", False),
    ("gzip_bomb", 2, "body_too_large", False),
    ("brotli_unasked", 2, "bad_encoding", False),
    ("trickled_body", 1, "cut_short", False),
    ("huge_retry_after", 0, None, True), ("echo_key_401", 0, None, True),
])
def test_every_200_is_charged(name, billed, kind, reported, tmp_path,
                              monkeypatch):
  """Usable or not, a 200 costs its usage, else the worst case reserved."""
  script, overrides, _ = CASES[name]
  _, _, _, ledger = run_case(script, overrides, tmp_path, monkeypatch)
  assert ledger.billed == billed + ledger.calls
  assert ledger.unusable == ({kind: billed} if kind else {})
  worst = ledger.cost_of(prompt_token_bound(MESSAGES), 50)
  with_usage = ledger.cost_of(USAGE["prompt_tokens"],
                              USAGE["completion_tokens"])
  expected = (billed * (with_usage if reported else worst)
              + ledger.calls * with_usage)
  assert ledger.cost_usd == pytest.approx(expected, rel=1e-12, abs=0)
  assert ledger.reserved_usd == 0 and ledger._reserved == 0


def test_huge_ratelimit_reset_is_capped_and_logged_once(tmp_path, monkeypatch,
                                                        caplog):
  headers = {"x-ratelimit-remaining-requests": "0",
             "x-ratelimit-reset-requests": "99999h"}
  answer = hs.json_answer(hs.completion(usage=USAGE), headers=headers)
  monkeypatch.setenv(ENV, CANARY)
  with hs.HostileServer([answer]) as srv:
    client = LLMClient(srv.base_url, "m", api_key_env=ENV, deadline_s=5.0,
                       rate_limiter=RateLimiter(max_server_wait_s=0.3))

    async def three():
      try:
        for k in "abc":
          await client.chat(MESSAGES, chain_id="c", call_key=k)
      finally:
        await client.aclose()

    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
      asyncio.run(three())
    assert 0.6 - 0.1 <= time.monotonic() - start < 3.0  # two capped holds
  holds = [r for r in caplog.records if "pause in new requests" in
           r.getMessage()]
  assert len(holds) == 3 and "capped" in holds[0].getMessage()


def test_a_ratelimit_hold_past_the_deadline_fails_at_once(monkeypatch):
  headers = {"x-ratelimit-remaining-requests": "0",
             "x-ratelimit-reset-requests": "10m"}
  with hs.HostileServer([hs.json_answer(hs.completion(usage=USAGE),
                                        headers=headers)]) as srv:
    client = LLMClient(srv.base_url, "m", api_key_env=ENV, deadline_s=1.0,
                       rate_limiter=RateLimiter(max_server_wait_s=600))

    async def two():
      try:
        await client.chat(MESSAGES, chain_id="c", call_key="a")
        start = time.monotonic()
        with pytest.raises(LLMRetriesExhausted, match="deadline"):
          await client.chat(MESSAGES, chain_id="c", call_key="b")
        return time.monotonic() - start
      finally:
        await client.aclose()

    assert asyncio.run(two()) < 0.5
    assert len(srv.requests) == 1


@pytest.mark.parametrize("value,seconds", [
    ("6m0s", 360.0), ("1.5s", 1.5), ("20ms", 0.02), ("1h2m3s", 3723.0),
    ("0.5", 0.5), ("-3", 0.0), ("inf", float("inf")), ("1e400", float("inf")),
    ("nan", None), ("soon", None), ("9" * 100, None), ("", None),
])
def test_server_waits_in_any_format(value, seconds):
  assert parse_wait(value) == seconds


def test_server_waits_as_times():
  now = 1_800_000_000.0
  assert parse_wait(str(now + 30), now=now) == pytest.approx(30)
  iso = datetime.datetime.fromtimestamp(now + 45, datetime.timezone.utc)
  assert parse_wait(iso.isoformat().replace("+00:00", "Z"),
                    now=now) == pytest.approx(45)
  http_date = email.utils.formatdate(now + 60, usegmt=True)
  assert parse_wait(http_date, now=now) == pytest.approx(60)
  assert parse_wait("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 0.0


@pytest.mark.parametrize("raw_key", [f"{CANARY}\r\n", f"  {CANARY}\t"])
def test_key_whitespace_is_stripped(raw_key, monkeypatch):
  monkeypatch.setenv(ENV, raw_key)
  with hs.HostileServer([GOOD]) as srv:
    client = LLMClient(srv.base_url, "m", api_key_env=ENV)
    asyncio.run(client.chat(MESSAGES, chain_id="c", call_key="k"))
    asyncio.run(client.aclose())
    assert srv.requests[0].headers["authorization"] == f"Bearer {CANARY}"


@pytest.mark.parametrize("bad_key", [
    CANARY + "é", CANARY[:10] + "\x01" + CANARY, CANARY + "\u200b",
    CANARY[:10] + " " + CANARY, CANARY + "\x7f"],
                         ids=["non_ascii", "control", "zero_width", "space",
                              "delete"])
def test_a_malformed_key_is_refused_without_printing_it(bad_key, monkeypatch):
  monkeypatch.setenv(ENV, bad_key)
  with hs.HostileServer([GOOD]) as srv:
    client = LLMClient(srv.base_url, "m", api_key_env=ENV)
    with pytest.raises(LLMFatalError) as err:
      asyncio.run(client.chat(MESSAGES, chain_id="c", call_key="k"))
    assert not srv.requests
  text = str(err.value) + repr(err.value)
  assert ENV in text and "\n" not in str(err.value)
  assert bad_key not in text and CANARY[:10] not in text


def test_redaction_covers_forms_and_cut_prefixes(monkeypatch):
  monkeypatch.setenv(ENV, CANARY)
  secrets.read_key(ENV)
  assert secrets.redact(f"a {CANARY} b") == "a *** b"
  assert secrets.redact(urllib.parse.quote_plus(CANARY + "/")) != CANARY
  assert secrets.redact(f"tail {CANARY[:9]}") == "tail ***"
  assert secrets.redact(f"tail {CANARY[:5]}") == f"tail {CANARY[:5]}"
  for n in range(len(CANARY) + 10):
    assert CANARY[:12] not in secrets.clip("x" * n + CANARY + "y", 20 + n // 2)
  record = logging.LogRecord("httpcore.http11", logging.DEBUG, __file__, 1,
                             "headers %r", ([(b"x-echo", CANARY.encode())],),
                             None)
  secrets.RedactingFilter().filter(record)
  assert CANARY not in record.getMessage()


def test_http_library_records_are_redacted_for_any_handler(monkeypatch):
  """A handler added after the key was read, without the filter itself."""
  monkeypatch.setenv(ENV, CANARY)
  secrets.read_key(ENV)
  seen = []

  class Keep(logging.Handler):
    def emit(self, record):
      seen.append(self.format(record))

  handler = Keep(logging.DEBUG)
  root = logging.getLogger()
  root.handlers.insert(0, handler)  # ahead of handlers that have the filter
  old_level = root.level
  root.setLevel(logging.DEBUG)
  try:
    for name in ("httpcore.http11", "httpcore.connection", "httpx", "h11",
                 "hpack.hpack", "absl"):
      logging.getLogger(name).debug("headers %r", [(b"authorization",
                                                    f"Bearer {CANARY}")])
  finally:
    root.removeHandler(handler)
    root.setLevel(old_level)
  assert len(seen) == 6 and all("***" in s for s in seen)
  assert_no_canary(*seen)


class Billing:
  """A server that bills what it reports: every 200 carries its usage.

  Answers in turn with a refusal, tool calls, unparsable text, no choices,
  null content and a usable reply, each after `delay_s` (so calls overlap);
  prompt tokens are the request's words, completion tokens its max_tokens.
  """

  KINDS = ("refusal", "tool_calls", "junk", "no_choices", "null", "ok")

  def __init__(self, prices, delay_s=0.1):
    self.price_in, self.price_out = prices
    self.delay_s = delay_s
    self.lock = threading.Lock()
    self.answers = 0
    self.cost_usd = 0.0
    self.inflight = self.max_inflight = 0

  def behaviour(self):
    return hs.dynamic(self._answer)

  def _answer(self, req):
    body = req.json
    usage = {"prompt_tokens": sum(len(m["content"].split())
                                  for m in body["messages"]),
             "completion_tokens": body["max_tokens"]}
    with self.lock:
      kind = self.KINDS[self.answers % len(self.KINDS)]
      self.answers += 1
      self.cost_usd += (usage["prompt_tokens"] * self.price_in
                        + usage["completion_tokens"] * self.price_out) / 1e6
    reply = {"refusal": hs.completion(None, refusal="No.", usage=usage),
             "tool_calls": hs.completion(None, tool_calls=[{"id": "t"}],
                                         usage=usage),
             "junk": hs.completion("}}{{ ## <td>", usage=usage),
             "no_choices": {"choices": [], "usage": usage},
             "null": hs.completion(None, usage=usage),
             "ok": hs.completion(usage=usage)}[kind]
    send = hs.json_answer(reply)

    def slow(conn, request, server):
      with self.lock:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
      server.stopped.wait(self.delay_s)
      with self.lock:
        self.inflight -= 1
      send(conn, request, server)
    return slow


@pytest.mark.parametrize("limit", ["usd", "calls"])
def test_limits_hold_against_billed_unusable_replies(limit, monkeypatch):
  """12 chains at once against a server that bills refusals and junk: its
  bill never passes the budget (or call limit) and the ledger matches it."""
  from lmbbo_jax.llm import LLMBudgetExceeded
  prices = {"m": (2.0, 8.0)}
  bill = Billing(prices["m"])
  worst = Ledger("m", prices=prices).cost_of(prompt_token_bound(MESSAGES), 50)
  ledger = (Ledger("m", prices=prices, budget_usd=9.5 * worst)
            if limit == "usd" else Ledger("m", prices=prices, max_calls=9))
  with hs.HostileServer([bill.behaviour()], max_requests=200) as srv:
    client = LLMClient(srv.base_url, "m", api_key_env=ENV, ledger=ledger,
                       max_tokens=50, max_concurrency=12, max_retries=2,
                       initial_backoff_s=0.01, max_backoff_s=0.02)

    async def chain(i):
      for k in range(6):
        try:
          await client.chat(MESSAGES, chain_id=f"c{i}", call_key=f"k{k}")
        except LLMBudgetExceeded:
          return
        except LLMRetriesExhausted:
          continue

    async def all_chains():
      try:
        await asyncio.gather(*(chain(i) for i in range(12)))
      finally:
        await client.aclose()

    asyncio.run(all_chains())
  assert bill.max_inflight > 1  # answers really were billed concurrently
  assert bill.answers == len(srv.requests) == ledger.billed == ledger.requests
  assert ledger.cost_usd == pytest.approx(bill.cost_usd, rel=1e-9)
  assert sum(ledger.unusable.values()) == ledger.billed - ledger.calls > 0
  if limit == "usd":
    assert bill.answers >= 9 and bill.cost_usd <= ledger.budget_usd
  else:
    assert bill.answers == 9
