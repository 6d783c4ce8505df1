"""Errors of the LLM client, split by what the caller should do about them.

* `LLMFatalError`: the endpoint refuses the request for a reason that retrying
  cannot fix (bad key, unknown model, malformed request, quota or billing
  exhausted). The run must stop with the message; finished work is kept.
* `LLMRetriesExhausted`: a transient fault (timeouts, dropped connections, 429
  rate limits, 5xx, malformed bodies) persisted past the retry bound or the
  per-call deadline. The caller may count it as a failed attempt.
* `LLMBudgetExceeded`: the ledger's `budget_usd` or `max_calls` is reached; a
  clean stop, not a failure.

Messages never contain the API key (the client redacts it).
"""

from __future__ import annotations


class LLMError(Exception):
  """Base class of every error raised by `lmbbo_jax.llm`."""


class LLMFatalError(LLMError):
  """A non-retryable refusal of the endpoint; stop the run.

  Attributes:
    status: HTTP status code, or None when the error is not an HTTP answer.
    code: the `error.code` / `error.type` the server gave, if any.
  """

  def __init__(self, message: str, *, status: int | None = None,
               code: str | None = None):
    super().__init__(message)
    self.status = status
    self.code = code


class LLMRetriesExhausted(LLMError):
  """A transient fault outlasted `max_retries` or the per-call deadline.

  Attributes:
    last_fault: the kind of the last fault ("timeout", "http_503", ...).
    attempts: how many HTTP attempts were made.
  """

  def __init__(self, message: str, *, last_fault: str | None = None,
               attempts: int = 0):
    super().__init__(message)
    self.last_fault = last_fault
    self.attempts = attempts


class LLMBudgetExceeded(LLMError):
  """The configured `budget_usd` or `max_calls` is spent (a clean stop).

  Attributes:
    reason: "budget" or "max_calls".
  """

  def __init__(self, message: str, *, reason: str):
    super().__init__(message)
    self.reason = reason
