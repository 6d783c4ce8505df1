"""Requests-per-minute and tokens-per-minute limits, and the server's own.

`RateLimiter.acquire(tokens)` waits until a request may start: at most `rpm`
request starts and at most `tpm` tokens in any sliding window of `window_s`
seconds. A request counts its prompt's token bound (its UTF-8 bytes, an upper
bound, so the limit errs on the safe side) plus its completion cap, which
OpenAI also counts against a token limit. A single request larger than `tpm`
starts once the window is empty (it could never start otherwise).

`observe(headers)` reads OpenAI-style `x-ratelimit-remaining-requests` /
`-tokens` and `x-ratelimit-reset-requests` / `-tokens` ("1s", "6m0s", "20ms"):
when the server says nothing is left, no request starts before its reset.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from typing import Callable, Mapping

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: str | None) -> float | None:
  """Seconds in an `x-ratelimit-reset-*` value ("1s", "6m0s", "20ms", "0.5")."""
  if not value:
    return None
  value = value.strip()
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  parts = _DURATION_RE.findall(value)
  if not parts or "".join(n + u for n, u in parts) != value.replace(" ", ""):
    return None
  return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
  value = headers.get(name)
  if value is None:
    return None
  try:
    return int(float(value))
  except ValueError:
    return None


class RateLimiter:
  """Client-side limits plus the server's rate-limit headers (see module doc).

  Args:
    rpm: request starts per window (None: no limit).
    tpm: tokens per window (None: no limit).
    window_s: the window (60 s: per minute; tests use shorter ones).
    clock: monotonic clock (tests).
  """

  def __init__(self, rpm: int | None = None, tpm: int | None = None, *,
               window_s: float = 60.0,
               clock: Callable[[], float] = time.monotonic):
    if rpm is not None and rpm < 1:
      raise ValueError("--llm_rpm must be at least 1")
    if tpm is not None and tpm < 1:
      raise ValueError("--llm_tpm must be at least 1")
    self.rpm = rpm
    self.tpm = tpm
    self.window_s = window_s
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

  async def acquire(self, tokens: int = 0) -> float:
    """Waits until a request of `tokens` may start; returns the seconds waited."""
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
      await asyncio.sleep(wait + 1e-3)
      waited += wait + 1e-3

  def observe(self, headers: Mapping[str, str]) -> None:
    """Honours a server's `x-ratelimit-*` headers (a hold until its reset)."""
    now = self.clock()
    hold = None
    if _int_header(headers, "x-ratelimit-remaining-requests") == 0:
      hold = parse_reset(headers.get("x-ratelimit-reset-requests"))
    left_tokens = _int_header(headers, "x-ratelimit-remaining-tokens")
    if left_tokens is not None and left_tokens < max(1, self._last_tokens):
      reset = parse_reset(headers.get("x-ratelimit-reset-tokens"))
      if reset is not None:
        hold = max(hold or 0.0, reset)
    if hold:
      self._hold_until = max(self._hold_until, now + hold)
      self.server_holds += 1

  def summary(self) -> dict:
    return {"rpm": self.rpm, "tpm": self.tpm, "waited_s": round(self.waited_s, 3),
            "server_holds": self.server_holds}
