"""`FunctionProposer`: a user's own async function as the search's proposer.

The function gets the chain's scored templates, best first, and returns new candidate
templates; they are validated like an LLM's (format, the scorer's text-context check,
duplicates of anything the chain has seen) and at most `m_new` are scored.
"""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable, Sequence

from lmbbo_jax.search import parsing
from lmbbo_jax.search.state import ChainState, EvalRecord, Proposal

# (ranked records, best first; the chain's state) -> candidate templates.
ProposeFn = Callable[[Sequence[EvalRecord], ChainState], Awaitable[Sequence[str]] | Sequence[str]]


class FunctionProposer:
  """Wraps `fn(ranked) -> candidates` or `fn(ranked, state) -> candidates` (a coroutine
  function or a plain one)."""

  name = "function"

  def __init__(self, fn: ProposeFn):
    if not callable(fn):
      raise TypeError("FunctionProposer needs a function (ranked, state) -> list of templates")
    self.fn = fn
    params = inspect.signature(fn).parameters.values()
    self.wants_state = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                           for p in params) >= 2 or any(p.kind == p.VAR_POSITIONAL
                                                        for p in params)

  async def propose(self, state: ChainState) -> Proposal:
    out: Any = self.fn(state.ranked(), state) if self.wants_state else self.fn(state.ranked())
    if inspect.isawaitable(out):
      out = await out
    candidates = [c for c in (out or []) if isinstance(c, str)]
    check = parsing.validate(candidates, seen=state.seen, context_check=state.context_check,
                             max_new=state.config.m_new,
                             max_chars=state.config.max_template_chars)
    rejections = list(check.rejections)
    rejections += [(repr(c)[:80], "not a string") for c in (out or []) if not isinstance(c, str)]
    return Proposal(templates=check.valid, rejections=rejections,
                    failed_attempts=0 if check.valid else 1, requested=len(candidates),
                    valid_candidates=len(check.valid))
