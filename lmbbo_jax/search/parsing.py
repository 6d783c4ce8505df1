"""Reading candidate templates out of LLM replies, and validating them.

LLM replies are untrusted text. `extract_candidates` finds the lines that are
meant as templates (bullets `-`/`*`/`•`, numbering `1.`/`1)`/`(1)`, quotes,
code fences, "Template 2:" labels) and strips the decoration. `validate`
decides which candidates may be scored: at least one `{}`, no other `{...}`
field (`templates.invalid_reason`, so `{0.__class__}` or `{name}` never reach
`str.format` anywhere), a length bound, the scorer's context check, and no
duplicate (by `templates.normalize`: whitespace and case) of anything the
chain has already evaluated or of an earlier candidate in the same reply.

Templates with several `{}` are accepted (the paper's own EuroSAT example has
two); every slot is filled with the class name.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

from lmbbo_jax import templates as tpl

_FENCE_RE = re.compile(r"^\s*(```|~~~)")
_MARKER_RE = re.compile(
    r"^\s*(?:[-*•·+>]+\s+|\(?\d{1,3}[.):]\s*|\(?[a-zA-Z][.)]\s+"
    r"|(?:template|prompt)\s*\d*\s*[:.-]\s*)", re.IGNORECASE)
# A quoted span (straight, curly or backtick quotes) holding a brace.
_QUOTED_RE = re.compile(r"\"([^\"]*[{}][^\"]*)\"|“([^”]*[{}][^”]*)”"
                        r"|`([^`]*[{}][^`]*)`|‘([^’]*[{}][^’]*)’")
_QUOTES = "\"'“”‘’`"
DEFAULT_MAX_CHARS = 300


def _strip_quotes(text: str) -> str:
  text = text.strip()
  while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
    text = text[1:-1].strip()
  # A lone leading/trailing quote left by e.g. `"a photo of a {}".`
  if text[:1] in _QUOTES and not any(q in text[1:] for q in _QUOTES):
    text = text[1:].strip()
  if text[-1:] in _QUOTES and not any(q in text[:-1] for q in _QUOTES):
    text = text[:-1].strip()
  return text


def extract_candidates(reply: str) -> list[str]:
  """Candidate templates in an LLM reply, in order, decoration removed.

  A line is a candidate when it holds a brace, or when it is a list item
  (bullet/number) or fully quoted (so a bulleted template that forgot its `{}`
  is reported as a rejection, not silently ignored). Prose lines without braces
  or list markers ("Here are some templates:") are ignored.
  """
  out: list[str] = []
  for raw in reply.splitlines():
    if _FENCE_RE.match(raw):
      continue  # fence lines themselves; their content is read like any line
    line = raw.strip()
    if not line:
      continue
    marker = _MARKER_RE.match(line)
    body = line[marker.end():].strip() if marker else line
    quoted = _QUOTED_RE.search(body)
    if quoted:
      # `1. "a photo of a {}." - emphasises the object`: keep the quoted part.
      cand = next(g for g in quoted.groups() if g is not None)
    else:
      fully_quoted = len(body) >= 2 and body[0] in _QUOTES and (
          body[-1] in _QUOTES or body[-2:-1] in _QUOTES)
      if "{" not in body and "}" not in body and not marker and not fully_quoted:
        continue
      if body.endswith(":") and "{" not in body:
        continue  # a heading such as "- Templates:"
      cand = body
    cand = _strip_quotes(cand)
    if cand:
      out.append(cand)
  return out


@dataclasses.dataclass
class Validation:
  """Outcome of validating one reply's candidates."""

  valid: list[str] = dataclasses.field(default_factory=list)
  rejections: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def validate(candidates: Iterable[str], *, seen: set[str],
             context_check: Callable[[str], str | None] | None = None,
             max_new: int | None = None,
             max_chars: int = DEFAULT_MAX_CHARS) -> Validation:
  """Splits candidates into scorable templates and (template, reason) pairs.

  Args:
    candidates: templates as extracted from a reply.
    seen: normalised templates the chain has already evaluated (not changed).
    context_check: the scorer's `max_context_ok(template) -> reason | None`.
    max_new: keep at most this many valid templates (the rest are rejected
      with reason "more than m_new templates").
    max_chars: longest accepted template.

  Returns:
    A `Validation`.
  """
  result = Validation()
  local: set[str] = set()
  for cand in candidates:
    reason = tpl.invalid_reason(cand)
    if reason is None and len(cand) > max_chars:
      reason = f"longer than {max_chars} characters"
    key = tpl.normalize(cand) if reason is None else None
    if reason is None and (key in seen or key in local):
      reason = "duplicate of an evaluated template"
    if reason is None and context_check is not None:
      reason = context_check(cand)
    if reason is None and max_new is not None and len(result.valid) >= max_new:
      reason = "more than m_new templates in the reply"
    if reason is None:
      result.valid.append(cand)
      local.add(key)
    else:
      result.rejections.append((cand, reason))
  return result


def reason_kind(reason: str) -> str:
  """A short, countable category for a rejection reason."""
  if reason.startswith("format field"):
    return "format_field"
  if reason.startswith("duplicate"):
    return "duplicate"
  if reason.startswith("no {}"):
    return "no_slot"
  if reason.startswith("unbalanced"):
    return "unbalanced_brace"
  if reason.startswith("longer than") or "context" in reason or "token" in reason:
    return "too_long"
  if reason.startswith("more than m_new"):
    return "extra"
  return "other"
