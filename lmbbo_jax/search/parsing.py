"""Reading candidate templates out of LLM replies, and validating them.

LLM replies are untrusted text, in whatever style the model likes.
`extract_candidates` reads, in order:

1. `<think>` / `<thinking>` / `<reasoning>` blocks are dropped (an unclosed
   one hides the rest of the reply; a lone `</think>` hides what precedes it).
2. JSON: a reply that is (or holds, in a code fence or between its first and
   last bracket) a JSON object or array gives the strings under a
   `templates`/`prompts`-like key, or the strings of the array (objects in it
   give their `template`/`prompt`/`text` field).
3. Otherwise line by line: list markers (any bullet or dash, `1.`, `1)`,
   `(1)`, `#1`, `a)`, "Template 2:"), headings and markdown emphasis are
   stripped; a quoted span (straight, curly, guillemet or backtick quotes,
   single or double) that holds a slot is the template, several on one line
   give several; an unquoted line keeps only the part with the slot, cut at
   an explanation (" - ", ": ", " | ", a new sentence, a trailing remark in
   parentheses) and a score annotation ("(accuracy 57.80%)").

Unambiguous placeholder variants (`{class}`, `{classname}`, `{class_name}`,
`{object}`, `{label}`, `{category}`, `[CLASS]`, `<class>`, `{{}}`, `{ }`, any
case) become `{}`. Lines of prose without a slot are ignored, but a list item
without one is kept, so that `validate` reports it ("no {} slot") instead of
dropping it silently.

`validate` decides which candidates may be scored: at least one `{}`, no other
`{...}` field (`templates.invalid_reason`, so `{0.__class__}` or `{name}` never
reach `str.format` anywhere), a length bound, the scorer's context check, and
no duplicate (by `templates.normalize`: whitespace and case) of anything the
chain has already evaluated or of an earlier candidate in the same reply.

Templates with several `{}` are accepted (the paper's own EuroSAT example has
two); every slot is filled with the class name.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, Iterable

from lmbbo_jax import templates as tpl

DEFAULT_MAX_CHARS = 300

_THINK_BLOCK_RE = re.compile(r"<(think|thinking|reasoning)>.*?</\1\s*>",
                             re.S | re.I)
_THINK_OPEN_RE = re.compile(r"<(think|thinking|reasoning)>.*\Z", re.S | re.I)
_THINK_CLOSE_RE = re.compile(r"\A.*?</(think|thinking|reasoning)\s*>", re.S | re.I)
_FENCE_LINE_RE = re.compile(r"^\s*(```|~~~)")
_FENCED_RE = re.compile(r"(?:```|~~~)[A-Za-z0-9_-]*\s*\n(.*?)(?:```|~~~)", re.S)

_PLACEHOLDER_NAMES = r"(?:class[ _-]?name|class|object[ _-]?name|object|label|category)"
_PLACEHOLDER_RE = re.compile(
    r"\{\{\s*\}\}|\{\s+\}|\{\{\s*" + _PLACEHOLDER_NAMES + r"\s*\}\}"
    r"|\{\s*" + _PLACEHOLDER_NAMES + r"\s*\}|\[\s*" + _PLACEHOLDER_NAMES + r"\s*\]"
    r"|<\s*" + _PLACEHOLDER_NAMES + r"\s*>", re.I)

_BULLETS = "-*•·+–—●▪◦‣→►✓✔>"
_MARKER_RE = re.compile(
    r"^\s*(?:"
    r"[" + re.escape(_BULLETS) + r"]+\s*"                       # bullets, dashes
    r"|\(?\d{1,3}[.):]\s*(?=\S)"                                # 1. 1) (1) 1:
    r"|#\d{1,3}[.):]?\s+"                                       # #1
    r"|\(?[a-zA-Z][.)]\s+"                                      # a) b.
    r"|(?:new\s+)?(?:template|prompt|option|suggestion)\s*#?\d*\s*[:.)-]\s*"
    r")", re.I)
_HEADING_RE = re.compile(r"^\s*#{1,6}\s+")
_EMPHASIS_RE = re.compile(r"\*\*|__|(?<![A-Za-z0-9])[*_](?=\S)|(?<=\S)[*_](?![A-Za-z0-9])")
# Quoted spans that hold a slot, by quote style. Straight single quotes must
# not be apostrophes: a letter may not touch them from outside.
_QUOTED_RES = (
    re.compile(r"\"([^\"\n]*\{\}[^\"\n]*)\""),
    re.compile(r"“([^”\n]*\{\}[^”\n]*)”"),
    re.compile(r"‘([^’\n]*\{\}[^’\n]*)’"),
    re.compile(r"«\s*([^»\n]*\{\}[^»\n]*?)\s*»"),
    re.compile(r"`([^`\n]*\{\}[^`\n]*)`"),
    re.compile(r"(?<![A-Za-z0-9])'((?:[^'\n]|'(?=[a-z]))*\{\}(?:[^'\n]|'(?=[a-z]))*)'(?![A-Za-z0-9])"),
)
_QUOTES = "\"'“”‘’`«»"
# Explanation separators after (or labels before) a template.
_SEPARATORS = (" - ", " – ", " — ", " -- ", ": ", " | ", "\t", " → ", " => ")
_SCORE_RE = re.compile(
    r"\s*[\(\[]\s*(?:(?:accuracy|acc|score|train|test)\b[^()\[\]]*|~?\d+(?:\.\d+)?\s*%[^()\[\]]*)[\)\]]\s*$"
    r"|\s*[-–—:,]?\s*(?:accuracy|acc|score)?\s*[:=]?\s*\d+(?:\.\d+)?\s*%"
    r"(?:\s*(?:accuracy|acc))?\s*$", re.I)
_INNER_SCORE_RE = re.compile(r"\s*\((?:accuracy|acc|score)\b[^()]*\)|\s*\(~?\d+(?:\.\d+)?\s*%\)",
                             re.I)
_TRAILING_PAREN_RE = re.compile(r"\s*\(([^(){}]*)\)\s*$")
# A new sentence after the slot's sentence ("a {}. This one ..." ).
_NEW_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")
_JSON_KEYS = ("templates", "prompts", "new_templates", "new_prompts",
              "suggestions", "candidates", "template", "prompt")
_JSON_ITEM_KEYS = ("template", "prompt", "text", "value")


def normalize_placeholders(text: str) -> str:
  """`{class}`, `[CLASS]`, `<class>`, `{{}}`, `{ }`, ... -> `{}`."""
  return _PLACEHOLDER_RE.sub(tpl.SLOT, text)


_BRACED_RE = re.compile(r"\{[^{}]*\}")


def _strip_emphasis(text: str) -> str:
  """Markdown `**bold**`, `__bold__`, `*it*` removed; brace groups kept intact."""
  kept: list[str] = []

  def protect(m: re.Match) -> str:
    kept.append(m.group(0))
    return f"\x00{len(kept) - 1}\x00"

  text = _EMPHASIS_RE.sub("", _BRACED_RE.sub(protect, text))
  return re.sub(r"\x00(\d+)\x00", lambda m: kept[int(m.group(1))], text)


def _drop_thinking(reply: str) -> str:
  reply = _THINK_BLOCK_RE.sub("\n", reply)
  reply = _THINK_OPEN_RE.sub("\n", reply)
  return _THINK_CLOSE_RE.sub("\n", reply)


def _json_strings(obj: Any) -> list[str] | None:
  """Template strings of a parsed JSON reply, None when it holds none."""
  if isinstance(obj, str):
    return [obj]
  if isinstance(obj, list):
    out = []
    for item in obj:
      if isinstance(item, str):
        out.append(item)
      elif isinstance(item, dict):
        for k in _JSON_ITEM_KEYS:
          if isinstance(item.get(k), str):
            out.append(item[k])
            break
    return out if out or not obj else None
  if isinstance(obj, dict):
    lowered = {str(k).lower(): v for k, v in obj.items()}
    for k in _JSON_KEYS:
      if k in lowered:
        got = _json_strings(lowered[k])
        if got is not None:
          return got
    lists = [v for v in obj.values() if isinstance(v, list)]
    if len(lists) == 1:
      return _json_strings(lists[0])
  return None


def _json_candidates(reply: str) -> list[str] | None:
  texts = [m.group(1) for m in _FENCED_RE.finditer(reply)] + [reply]
  for text in texts:
    text = text.strip()
    pieces = [text]
    for open_, close in (("{", "}"), ("[", "]")):
      a, b = text.find(open_), text.rfind(close)
      if 0 <= a < b:
        pieces.append(text[a:b + 1])
    for piece in pieces:
      if not piece or piece[0] not in "{[\"":
        continue
      try:
        obj = json.loads(piece)
      except ValueError:
        continue
      got = _json_strings(obj)
      if got is not None:
        return [c for c in (_clean(s) for s in got) if c]
  return None


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


def _clean(text: str) -> str:
  """Final tidying of one candidate: placeholders, quotes, list commas."""
  text = normalize_placeholders(text.strip())
  text = _strip_quotes(text.rstrip(",;").strip())
  return _strip_quotes(text).strip()


def _cut_explanation(body: str) -> str:
  """The part of an unquoted line that is the template."""
  changed = True
  while changed:
    changed = False
    for sep in _SEPARATORS:
      i = body.find(sep)
      if i < 0:
        continue
      left, right = body[:i], body[i + len(sep):]
      if tpl.SLOT in left and tpl.SLOT not in right:
        body, changed = left, True
      elif tpl.SLOT in right and tpl.SLOT not in left:
        body, changed = right, True
      if changed:
        break
  body = _SCORE_RE.sub("", _INNER_SCORE_RE.sub("", body))
  paren = _TRAILING_PAREN_RE.search(body)
  if paren and tpl.SLOT in body[:paren.start()]:
    inner = paren.group(1).strip()
    if inner[:1].isupper() or len(inner.split()) >= 4 or inner.lower().startswith(
        ("e.g", "i.e", "this", "focus", "emphas")):
      body = body[:paren.start()]
  parts = _NEW_SENTENCE_RE.split(body)
  if len(parts) > 1:
    with_slot = [p for p in parts if tpl.SLOT in p]
    if len(with_slot) == 1:
      body = with_slot[0]
  return body.strip()


def _line_candidates(line: str) -> list[str]:
  heading = _HEADING_RE.match(line)
  body = line[heading.end():] if heading else line
  marker = _MARKER_RE.match(body)
  if marker:
    body = body[marker.end():]
  body = normalize_placeholders(_strip_emphasis(body)).strip()
  if not body:
    return []
  quoted = sorted((m.start(), m.group(1)) for rx in _QUOTED_RES
                  for m in rx.finditer(body))
  if quoted:
    out, end = [], -1
    for start, text in quoted:  # nested quote styles: keep the outermost
      if start > end:
        out.append(text)
        end = start + len(text) + 1
    return [c for c in (_clean(t) for t in out) if c]
  has_brace = "{" in body or "}" in body
  plain = re.match(r"^[\"“‘`']([^\"”’`']+)[\"”’`']\s*(?:$|[:(|,–—-])", body)
  if marker and plain:
    # A list item whose quoted template forgot its slot: the quoted part (for
    # the rejection), never the remark after it.
    return [_clean(plain.group(1))]
  fully_quoted = len(body) >= 2 and body[0] in _QUOTES and body[-1] in _QUOTES
  if not has_brace and not (marker or fully_quoted):
    return []  # prose
  if body.rstrip().endswith(":") and (heading or not has_brace or
                                      not _cut_explanation(body[:-1])):
    return []  # a heading such as "- Templates:" or "### For {}:"
  if heading:
    return []  # a markdown heading is never a template
  if tpl.SLOT in body:
    body = _cut_explanation(body)
  else:  # reported as a rejection: at least without its score annotation
    body = _SCORE_RE.sub("", _INNER_SCORE_RE.sub("", body))
  cand = _clean(body)
  return [cand] if cand else []


def extract_candidates(reply: str) -> list[str]:
  """Candidate templates in an LLM reply, in order, decoration removed."""
  reply = _drop_thinking(reply.replace("\x00", ""))
  from_json = _json_candidates(reply)
  if from_json is not None:
    return from_json
  out: list[str] = []
  for raw in reply.splitlines():
    if _FENCE_LINE_RE.match(raw) or not raw.strip():
      continue  # fence lines themselves; their content is read like any line
    if raw.strip() in ("[", "]", "{", "}"):
      continue
    out.extend(_line_candidates(raw.strip()))
  return out


@dataclasses.dataclass
class Validation:
  """Outcome of validating one reply's candidates."""

  valid: list[str] = dataclasses.field(default_factory=list)
  rejections: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def validate(candidates: Iterable[str], *, seen: set[str],
             context_check: Callable[[str], str | None] | None = None,
             max_new: int | None = None,
             max_chars: int = DEFAULT_MAX_CHARS,
             instructions: str | None = None) -> Validation:
  """Splits candidates into scorable templates and (template, reason) pairs.

  Args:
    candidates: templates as extracted from a reply.
    seen: normalised templates the chain has already evaluated (not changed).
    context_check: the scorer's `rejection_reason(template) -> reason | None`.
    max_new: keep at most this many valid templates (the rest are rejected
      with reason "more than m_new templates").
    max_chars: longest accepted template.
    instructions: the request's own wording (its listed templates removed,
      see `instruction_text`); a candidate found in it is the model echoing
      the instructions ("Each template must contain {} where ..."), not a
      template.

  Returns:
    A `Validation`.
  """
  result = Validation()
  local: set[str] = set()
  echo_text = tpl.normalize(instructions) if instructions else ""
  for cand in candidates:
    reason = tpl.invalid_reason(cand)
    if reason is None and len(cand) > max_chars:
      reason = f"longer than {max_chars} characters"
    key = tpl.normalize(cand) if reason is None else None
    if reason is None and (key in seen or key in local):
      reason = "duplicate of an evaluated template"
    if reason is None and echo_text and len(key) > 8 and key in echo_text:
      reason = "copies the instructions"
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


def instruction_text(messages: Iterable[dict], listed: Iterable[str]) -> str:
  """The system prompt and first user turn of a request, `listed` templates cut out.

  Later turns are left out: they quote the model's own templates (scores,
  rejections), and a corrected template may well be part of a rejected one.
  """
  text, users = [], 0
  for m in messages:
    if m.get("role") == "user":
      users += 1
      if users > 1:
        break
    if m.get("role") in ("system", "user"):
      text.append(m["content"])
  text = "\n".join(text)
  for t in sorted(set(listed), key=len, reverse=True):
    text = text.replace(t, " ")
  return text


def reason_kind(reason: str) -> str:
  """A short, countable category for a rejection reason."""
  if reason.startswith("copies the instructions"):
    return "echo"
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
