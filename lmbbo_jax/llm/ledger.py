"""Usage ledger: tokens, cost, latency, concurrency, faults and budget stops.

One `Ledger` is shared by every chain of a run. It lives in one asyncio event
loop, so it needs no locks. Every HTTP 200 answer is charged, usable or not
(`record_call` / `record_unusable`): its reported usage, else the worst case
reserved for it.

Prices are USD per 1M tokens (input, output). `DEFAULT_PRICES` holds OpenAI
list prices as published on platform.openai.com/docs/pricing in 2025-2026
(copied from third-party mirrors of that page; verify before trusting a cost
figure, and override with `prices=`). A model name matches the longest key that
is a prefix of it, so "gpt-4o-mini-2024-07-18" uses "gpt-4o-mini". A model with
no price (local vLLM/Ollama/llama.cpp servers) costs 0 and logs one warning.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Mapping

from absl import logging
import orjson

from lmbbo_jax.llm.errors import LLMBudgetExceeded

# USD per 1M tokens: (input, output).
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4": (30.00, 60.00),  # gpt-4-0314 / gpt-4-0613 (8k context)
    "gpt-3.5-turbo": (0.50, 1.50),
    "gpt-3.5-turbo-0301": (2.00, 2.00),  # the official code's default model
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
}

# Rough size of the pieces of a meta-prompt, used only by `estimate` when the
# caller does not measure them (about 4 characters per token).
_DEFAULT_FIRST_PROMPT_TOKENS = 220
_TOKENS_PER_TEMPLATE = 14
_FEEDBACK_TOKENS = 30


def price_for(model: str, prices: Mapping[str, tuple[float, float]]
              ) -> tuple[float, float] | None:
  """(input, output) USD per 1M tokens for `model`: exact, else longest prefix."""
  if model in prices:
    return tuple(prices[model])
  best = None
  for name in prices:
    if model.startswith(name) and (best is None or len(name) > len(best)):
      best = name
  return tuple(prices[best]) if best is not None else None


def _tokens(value: Any) -> int | None:
  """A reported token count, or None when it is not a non-negative integer."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  if not math.isfinite(value) or value < 0 or value != int(value):
    return None
  return int(value)


def _percentile(values: list[float], q: float) -> float | None:
  """Nearest-rank percentile (q in [0, 100]) of `values`, None when empty."""
  if not values:
    return None
  ordered = sorted(values)
  rank = max(1, math.ceil(q / 100.0 * len(ordered)))
  return ordered[rank - 1]


class Ledger:
  """Counts every LLM call of a run and enforces its budget.

  Args:
    model: the model name used to look up prices.
    prices: overrides/additions to `DEFAULT_PRICES` (USD per 1M tokens).
    budget_usd: stop starting new calls once this much is spent (None: no
      limit). Each call reserves its worst-case cost before it is sent, so
      the spend never exceeds the budget (given the server honours max_tokens).
    max_calls: stop after this many paid requests: every HTTP 200 answer,
      usable or not, plus each call that failed without one; requests in
      flight are reserved, so this bound is exact.
    log_path: if given, one JSON line per call is appended there (no secrets).
  """

  def __init__(self, model: str, *,
               prices: Mapping[str, tuple[float, float]] | None = None,
               budget_usd: float | None = None, max_calls: int | None = None,
               log_path: str | os.PathLike | None = None):
    self.model = model
    self.prices = dict(DEFAULT_PRICES)
    if prices:
      self.prices.update({k: tuple(v) for k, v in prices.items()})
    self.budget_usd = budget_usd
    self.max_calls = max_calls
    self.log_path = os.fspath(log_path) if log_path else None
    self.price = price_for(model, self.prices)
    if self.price is None:
      logging.warning(
          "No price known for LLM model %r: its cost is counted as 0 USD "
          "(pass prices= / --llm_prices to set one).", model)
    self.calls = 0  # paid calls that returned a usable body
    self.billed = 0  # HTTP 200 answers charged, usable or not
    self.unusable: dict[str, int] = {}  # billed answers that could not be used
    self._unbilled_failures = 0  # failed calls that got no 200 answer
    self.cached_calls = 0
    self.failed_calls = 0  # calls that ended in an error after retries
    self.requests = 0  # HTTP attempts, retries included
    self.prompt_tokens = 0
    self.completion_tokens = 0
    self.cost_usd = 0.0
    self.missing_usage = 0
    self.faults: dict[str, int] = {}
    self.latencies_s: list[float] = []
    self._reserved = 0
    self._reserved_usd = 0.0
    self.queue_s: list[float] = []  # waiting for a slot or a rate limit
    self.server_s: list[float] = []  # HTTP attempts (the server's work + transfer)
    self.truncated = 0  # replies cut at the completion cap (finish_reason "length")
    # Concurrency gauge: the area under in-flight(t) over the active span.
    self._inflight = 0
    self.max_inflight = 0
    self._area = 0.0
    self._last_t: float | None = None
    self._first_t: float | None = None
    self._end_t: float | None = None

  # --- budget -----------------------------------------------------------------
  def cost_of(self, prompt_tokens: int, completion_tokens: int) -> float:
    if self.price is None:
      return 0.0
    return (prompt_tokens * self.price[0]
            + completion_tokens * self.price[1]) / 1e6

  def reserve(self, cost_bound_usd: float = 0.0) -> float:
    """Claims one paid request whose cost is at most `cost_bound_usd`.

    The client reserves before every HTTP attempt, retries included. The
    bound (the request's prompt-token bound plus its completion cap at the
    model's price) is held until the attempt settles, so requests in flight
    can never together push the spend past `budget_usd`. Returns the amount
    reserved (pass it back to `record_call` / `record_unusable` / `release`).

    Raises:
      LLMBudgetExceeded: the call limit is reached, or the budget cannot cover
        this call's worst case on top of what is spent and reserved.
    """
    if self.max_calls is not None and (
        self.billed + self._unbilled_failures + self._reserved
        >= self.max_calls):
      raise LLMBudgetExceeded(
          f"LLM call limit reached ({self.max_calls} calls); raise "
          "--llm_max_calls and rerun with --resume to continue.",
          reason="max_calls")
    if self.budget_usd is not None and (
        self.cost_usd + self._reserved_usd + cost_bound_usd > self.budget_usd):
      raise LLMBudgetExceeded(
          f"LLM budget reached ({self.cost_usd:.4f} USD spent, "
          f"{self._reserved_usd:.4f} reserved by calls in flight, the next call may "
          f"cost up to {cost_bound_usd:.4f}, budget {self.budget_usd:.4f} USD); raise "
          "--llm_budget_usd and rerun with --resume to continue.",
          reason="budget")
    self._reserved += 1
    self._reserved_usd += cost_bound_usd
    return cost_bound_usd

  @property
  def reserved_usd(self) -> float:
    """Worst-case cost held by calls in flight."""
    return self._reserved_usd

  def fits_when_settled(self, cost_bound_usd: float) -> bool:
    """Whether a call of this bound fits once the calls in flight settle."""
    return (self.budget_usd is None
            or self.cost_usd + cost_bound_usd <= self.budget_usd)

  def release(self, reserved_usd: float = 0.0) -> None:
    """Returns a reservation (the attempt ended without a 200 answer)."""
    self._reserved = max(0, self._reserved - 1)
    self._reserved_usd = max(0.0, self._reserved_usd - reserved_usd)

  # --- recording --------------------------------------------------------------
  def count_fault(self, kind: str) -> None:
    self.faults[kind] = self.faults.get(kind, 0) + 1

  def begin_request(self) -> None:
    now = time.monotonic()
    self._advance(now)
    if self._first_t is None:
      self._first_t = now
    self._inflight += 1
    self.requests += 1
    self.max_inflight = max(self.max_inflight, self._inflight)

  def end_request(self) -> None:
    now = time.monotonic()
    self._advance(now)
    self._inflight -= 1
    self._end_t = now

  def _advance(self, now: float) -> None:
    if self._last_t is not None:
      self._area += self._inflight * (now - self._last_t)
    self._last_t = now

  def record_call(self, *, call_id: str, chain_id: str, usage: Mapping | None,
                  latency_s: float, reserved_usd: float = 0.0,
                  queue_s: float = 0.0, server_s: float | None = None,
                  finish_reason: str | None = None,
                  fallback_tokens: tuple[int, int] | None = None) -> float:
    """Records a paid call that returned a usable answer; returns its cost.

    `fallback_tokens` (prompt, completion upper bounds: the client passes the
    reserved worst case) is charged when the server sent no usage, so a
    missing usage can never hide spending.
    """
    pt, ct, cost = self._charge(usage, reserved_usd, fallback_tokens)
    self.calls += 1
    self.latencies_s.append(latency_s)
    self.queue_s.append(queue_s)
    self.server_s.append(latency_s - queue_s if server_s is None else server_s)
    if finish_reason == "length":
      self.truncated += 1
    self._log({"call_id": call_id, "chain": chain_id, "cached": False,
               "prompt_tokens": pt, "completion_tokens": ct, "cost_usd": cost,
               "latency_s": round(latency_s, 4), "queue_s": round(queue_s, 4),
               "finish_reason": finish_reason, "time": time.time()})
    return cost

  def record_unusable(self, *, call_id: str, chain_id: str, kind: str,
                      usage: Mapping | None, reserved_usd: float = 0.0,
                      fallback_tokens: tuple[int, int] | None = None) -> float:
    """Charges an HTTP 200 answer that cannot be used; returns its cost.

    A refusal, tool calls, junk, a body too large or cut at the deadline were
    still billed: its reported usage is charged, else `fallback_tokens`.
    """
    pt, ct, cost = self._charge(usage, reserved_usd, fallback_tokens)
    self.unusable[kind] = self.unusable.get(kind, 0) + 1
    self._log({"call_id": call_id, "chain": chain_id, "cached": False,
               "unusable": kind, "prompt_tokens": pt, "completion_tokens": ct,
               "cost_usd": cost, "time": time.time()})
    return cost

  def _charge(self, usage: Mapping | None, reserved_usd: float,
              fallback_tokens: tuple[int, int] | None
              ) -> tuple[int, int, float]:
    """Settles a reservation as one billed answer: (prompt, completion, cost)."""
    self.release(reserved_usd)
    usage = usage or {}
    pt = _tokens(usage.get("prompt_tokens"))
    ct = _tokens(usage.get("completion_tokens"))
    if pt is None or ct is None:
      self.missing_usage += 1
      pt, ct = fallback_tokens or (pt or 0, ct or 0)
    cost = self.cost_of(pt, ct)
    self.billed += 1
    self.prompt_tokens += pt
    self.completion_tokens += ct
    self.cost_usd += cost
    return pt, ct, cost

  def record_cached(self, *, call_id: str, chain_id: str) -> None:
    self.cached_calls += 1
    self._log({"call_id": call_id, "chain": chain_id, "cached": True,
               "time": time.time()})

  def record_failure(self, *, call_id: str, chain_id: str, kind: str,
                     billed: bool = False) -> None:
    """Records a call that ended in an error (its attempts are settled).

    One that got no billed answer (`billed`) still counts against
    `max_calls`, so a failing server cannot be asked without end.
    """
    self.failed_calls += 1
    self._unbilled_failures += int(not billed)
    self._log({"call_id": call_id, "chain": chain_id, "error": kind,
               "time": time.time()})

  def _log(self, row: dict) -> None:
    if not self.log_path:
      return
    with open(self.log_path, "ab") as f:
      f.write(orjson.dumps(row) + b"\n")

  # --- reports ----------------------------------------------------------------
  @property
  def mean_concurrency(self) -> float | None:
    """Mean number of requests in flight between the first start and last end."""
    if self._first_t is None or self._end_t is None:
      return None
    span = self._end_t - self._first_t
    return self._area / span if span > 0 else float(self.max_inflight)

  def summary(self) -> dict[str, Any]:
    return {
        "model": self.model,
        "calls": self.calls,
        "billed_answers": self.billed,
        "unusable_answers": dict(sorted(self.unusable.items())),
        "cached_calls": self.cached_calls,
        "failed_calls": self.failed_calls,
        "requests": self.requests,
        "prompt_tokens": self.prompt_tokens,
        "completion_tokens": self.completion_tokens,
        "cost_usd": round(self.cost_usd, 6),
        "price_known": self.price is not None,
        "missing_usage": self.missing_usage,
        "faults": dict(sorted(self.faults.items())),
        "latency_p50_s": _percentile(self.latencies_s, 50),
        "latency_p95_s": _percentile(self.latencies_s, 95),
        "queue_p50_s": _percentile(self.queue_s, 50),
        "queue_p95_s": _percentile(self.queue_s, 95),
        "server_p50_s": _percentile(self.server_s, 50),
        "server_p95_s": _percentile(self.server_s, 95),
        "queue_s_total": round(sum(self.queue_s), 3),
        "server_s_total": round(sum(self.server_s), 3),
        "truncated_replies": self.truncated,
        "mean_concurrency": self.mean_concurrency,
        "max_concurrency": self.max_inflight,
        "budget_usd": self.budget_usd,
        "max_calls": self.max_calls,
    }

  # --- dry run ----------------------------------------------------------------
  def estimate(self, config: Any, *, first_prompt_tokens: int | None = None,
               reply_tokens: int | None = None,
               feedback_tokens: int = _FEEDBACK_TOKENS,
               max_tokens: int | None = None) -> dict[str, Any]:
    """Expected calls, tokens and cost of a search with `config`, before it runs.

    Args:
      config: anything with `n_restart`, `n_reset`, `n_iter`, `m_new`, `k_pos`,
        `k_neg` and `conversation` (a `search.optimizer.SearchConfig`).
      first_prompt_tokens: tokens of one first-turn request; measured by
        `search.optimizer.estimate` from a rendered prompt, else a rough guess.
      reply_tokens: tokens of one reply that holds just the templates asked
        for (default: 20 per template).
      feedback_tokens: tokens of one multi-turn feedback message.
      max_tokens: the reply cap; gives the `*_worst` figures, where every
        reply runs to the cap (and multi-turn prompts grow by as much).

    Returns:
      dict(calls, prompt_tokens, completion_tokens, cost_usd,
      max_calls_with_retries, and with max_tokens prompt_tokens_worst,
      completion_tokens_worst, cost_usd_worst): `calls` assumes every reply
      is valid; `max_calls_with_retries` multiplies by `max_failed_attempts`.
      Multi-turn prompts resend the whole conversation, so turn i costs the
      first prompt plus i (reply, feedback) pairs.
    """
    n_conv = config.n_restart * config.n_reset
    calls = n_conv * config.n_iter
    if first_prompt_tokens is None:
      first_prompt_tokens = _DEFAULT_FIRST_PROMPT_TOKENS + _TOKENS_PER_TEMPLATE * (
          config.k_pos + config.k_neg)
    if reply_tokens is None:
      reply_tokens = 20 * config.m_new + 5

    def prompt_total(reply: int) -> int:
      if config.conversation == "multi_turn":
        per_conv = sum(first_prompt_tokens + i * (reply + feedback_tokens)
                       for i in range(config.n_iter))
        return n_conv * per_conv
      return calls * first_prompt_tokens

    prompt_tokens = prompt_total(reply_tokens)
    completion_tokens = calls * reply_tokens
    out = {
        "calls": calls,
        "max_calls_with_retries": calls * getattr(config, "max_failed_attempts",
                                                  1),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost_usd": round(self.cost_of(prompt_tokens, completion_tokens), 6),
        "model": self.model,
        "price_known": self.price is not None,
        "tokens_per_turn": {"first_prompt": first_prompt_tokens,
                            "reply": reply_tokens, "feedback": feedback_tokens},
    }
    if max_tokens:
      worst_prompt, worst_completion = prompt_total(max_tokens), calls * max_tokens
      out.update(prompt_tokens_worst=worst_prompt,
                 completion_tokens_worst=worst_completion,
                 cost_usd_worst=round(self.cost_of(worst_prompt, worst_completion), 6))
    return out
