"""Requests-per-minute and tokens-per-minute limits, and the server's own.

`RateLimiter.acquire(tokens)` waits until a request may start: at most `rpm`
request starts and at most `tpm` tokens in any sliding window of `window_s`
seconds. A request counts its prompt's token bound (its UTF-8 bytes, an upper
bound, so the limit errs on the safe side) plus its completion cap, which
OpenAI also counts against a token limit. A single request larger than `tpm`
starts once the window is empty (it could never start otherwise).

`observe(headers)` reads OpenAI-style `x-ratelimit-remaining-requests` /
`-tokens` and `x-ratelimit-reset-requests` / `-tokens` (any form
`parse_wait` reads): when the server says nothing is left, no request starts
before its reset. A server's wait is untrusted: it is capped at
`max_server_wait_s` and logged (one WARNING per hold), and a wait that would
pass the caller's deadline fails the call instead of holding it.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import email.utils
import math
import re
import time
from typing import Callable, Mapping

from absl import logging

from lmbbo_jax.llm.errors import LLMRetriesExhausted
from lmbbo_jax.llm.secrets import clip

_DURATION_RE = re.compile(r"(\d{1,12}(?:\.\d{1,9})?)(ms|us|h|m|s)")
_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# A plain number above this is a Unix time, not a number of seconds.
_EPOCH_MIN = 1e9
# Longer header values are not waits (and are not worth parsing).
_MAX_WAIT_CHARS = 64


def parse_wait(value: str | None, now: float | None = None) -> float | None:
  """Seconds to wait from a server's `retry-after` / `x-ratelimit-reset-*`.

  Reads seconds ("0.5"), durations ("6m0s", "1.5s", "20ms"), Unix times in
  seconds, HTTP dates and ISO 8601 times; a time in the past is 0 and an
  infinite number is `math.inf` (the caller caps it). None: not a wait.
  """
  if not value or len(value) > _MAX_WAIT_CHARS:
    return None
  value = value.strip()
  now = time.time() if now is None else now
  try:
    number = float(value)
  except ValueError:
    number = None
  if number is not None:
    if math.isnan(number):
      return None
    if number > _EPOCH_MIN and math.isfinite(number):
      number -= now
    return max(0.0, number)
  compact = value.replace(" ", "")
  parts = _DURATION_RE.findall(compact)
  if parts and "".join(n + u for n, u in parts) == compact:
    return sum(float(n) * _UNIT_S[u] for n, u in parts)
  for parse in (email.utils.parsedate_to_datetime,
                lambda v: datetime.datetime.fromisoformat(
                    v.replace("Z", "+00:00"))):
    try:
      when = parse(value)
    except (TypeError, ValueError, IndexError, OverflowError):
      continue
    if when.tzinfo is None:
      when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - now)
  return None


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
  value = headers.get(name)
  if value is None or len(value) > _MAX_WAIT_CHARS:
    return None
  try:
    return int(float(value))
  except (ValueError, OverflowError):
    return None


class RateLimiter:
  """Client-side limits plus the server's rate-limit headers (see module doc).

  Args:
    rpm: request starts per window (None: no limit).
    tpm: tokens per window (None: no limit).
    window_s: the window (60 s: per minute; tests use shorter ones).
    max_server_wait_s: cap on a hold the server's headers ask for.
    clock: monotonic clock (tests).
  """

  def __init__(self, rpm: int | None = None, tpm: int | None = None, *,
               window_s: float = 60.0, max_server_wait_s: float = 60.0,
               clock: Callable[[], float] = time.monotonic):
    if rpm is not None and rpm < 1:
      raise ValueError("--llm_rpm must be at least 1")
    if tpm is not None and tpm < 1:
      raise ValueError("--llm_tpm must be at least 1")
    self.rpm = rpm
    self.tpm = tpm
    self.window_s = window_s
    self.max_server_wait_s = max_server_wait_s
    self.clock = clock
    self._starts: collections.deque[tuple[float, int]] = collections.deque()
    self._hold_until = 0.0
    self._last_tokens = 0
    self.waited_s = 0.0
    self.server_holds = 0

  def _expire(self, now: float) -> None:
    while self._starts and self._starts[0][0] <= now - self.window_s:
      self._starts.popleft()

  def _wait_needed(self, now: float, tokens: int) -> float:
    wait = max(0.0, self._hold_until - now)
    if self.rpm is not None and len(self._starts) >= self.rpm:
      wait = max(wait, self._starts[0][0] + self.window_s - now)
    if self.tpm is not None and self._starts:
      used = sum(t for _, t in self._starts)
      if used + tokens > self.tpm:
        if tokens > self.tpm:  # too large for any window: wait for an empty one
          return max(wait, self._starts[-1][0] + self.window_s - now)
        need, freed = used + tokens - self.tpm, 0
        for start, t in self._starts:  # until enough of the window has expired
          freed += t
          if freed >= need:
            wait = max(wait, start + self.window_s - now)
            break
    return wait

  async def acquire(self, tokens: int = 0,
                    max_wait_s: float = math.inf) -> float:
    """Waits until a request of `tokens` may start; returns the seconds waited.

    Raises:
      LLMRetriesExhausted: the start is more than `max_wait_s` away (the
        caller's deadline); nothing is waited for then.
    """
    waited = 0.0
    while True:
      now = self.clock()
      self._expire(now)
      wait = self._wait_needed(now, tokens)
      if wait <= 0:
        self._starts.append((now, tokens))
        self._last_tokens = tokens
        self.waited_s += waited
        return waited
      if waited + wait > max_wait_s:
        self.waited_s += waited
        raise LLMRetriesExhausted(
            f"the rate limit needs {wait:.1f} s more before the next request, "
            "past this call's deadline (--llm_deadline_s; a server's hold is "
            "capped by --llm_max_server_wait_s)", last_fault="rate_limit_wait")
      await asyncio.sleep(wait + 1e-3)
      waited += wait + 1e-3

  def observe(self, headers: Mapping[str, str]) -> None:
    """Honours a server's `x-ratelimit-*` headers (a hold until its reset)."""
    now = self.clock()
    hold, asked = None, None
    if _int_header(headers, "x-ratelimit-remaining-requests") == 0:
      asked = headers.get("x-ratelimit-reset-requests")
      hold = parse_wait(asked)
    left_tokens = _int_header(headers, "x-ratelimit-remaining-tokens")
    if left_tokens is not None and left_tokens < max(1, self._last_tokens):
      reset = parse_wait(headers.get("x-ratelimit-reset-tokens"))
      if reset is not None and reset > (hold or 0.0):
        hold, asked = reset, headers.get("x-ratelimit-reset-tokens")
    if hold:
      capped = min(hold, self.max_server_wait_s)
      if now >= self._hold_until:  # a new hold, not the same one re-announced
        logging.warning(
            "The LLM server asks for a pause in new requests (rate-limit reset "
            "%r); holding them for %.2f s%s.", clip(str(asked), 40), capped,
            " (capped by --llm_max_server_wait_s)" if capped < hold else "")
      self._hold_until = max(self._hold_until, now + capped)
      self.server_holds += 1

  def summary(self) -> dict:
    return {"rpm": self.rpm, "tpm": self.tpm, "waited_s": round(self.waited_s, 3),
            "server_holds": self.server_holds}
