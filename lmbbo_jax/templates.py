"""Prompt templates as untrusted text: validation and plain `{}` substitution.

Templates come from LLM replies, caption files and users. They are data: never
`str.format`/`eval` them. A slot is the two characters `{}`; every slot is
filled with the class name by plain string replacement. Any other brace pair
such as `{0}`, `{name}` or `{0.__class__}` is a format field and makes the
template invalid (it would mean something else to every other tool). A template
must be writable as UTF-8 (no lone surrogates), and its canonical form (NFC, no
invisible characters: `canonical`) is what duplicates are judged by.
"""

from __future__ import annotations

import re
import unicodedata

SLOT = "{}"

# A format field: a brace pair with something inside (`{0}`, `{name}`, `{ }`).
_FIELD_RE = re.compile(r"\{[^{}]+\}")
_WS_RE = re.compile(r"\s+")
# Control characters (Unicode category Cc) other than the tab.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
# Characters that change a string but not what a reader sees: zero-width
# spaces and joiners, bidi controls, word joiners, BOM, soft hyphen, Mongolian
# vowel separator, invisible operators. Removed before any comparison.
_INVISIBLE_RE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064"
                           "\u2066-\u206f\ufeff]")


# CLIP's plain prompt: the baseline every method is compared with.
PHOTO = "a photo of a {}."


def fill(template: str, class_name: str) -> str:
  """Replaces every `{}` in `template` with `class_name` (no format parsing)."""
  return template.replace(SLOT, class_name)


def split_slots(template: str) -> list[str]:
  """The literal pieces between slots: `a {} of {}.` -> ['a ', ' of ', '.']."""
  return template.split(SLOT)


def canonical(text: str) -> str:
  """`text` NFC-normalised with its invisible characters removed (linear time)."""
  text = _INVISIBLE_RE.sub("", text)
  if not unicodedata.is_normalized("NFC", text):
    text = unicodedata.normalize("NFC", text)
  return text


def invalid_reason(template: str) -> str | None:
  """Why `template` cannot be scored, or None when it is a valid template.

  Length against the text context is checked by the scorer, which knows the
  tokenizer; this checks only the text itself.
  """
  if not isinstance(template, str):
    return f"not a string ({type(template).__name__})"
  try:
    template.encode("utf-8")
  except UnicodeEncodeError as e:
    return f"not writable as UTF-8 (lone surrogate at character {e.start})"
  if not template.strip():
    return "empty template"
  if SLOT not in template:
    return "no {} slot for the class name"
  field = _FIELD_RE.search(template)
  if field:
    return f"format field {field.group(0)!r} (only {{}} slots are allowed)"
  rest = template.replace(SLOT, "")
  if "{" in rest or "}" in rest:
    return "unbalanced brace (only {} slots are allowed)"
  if _CONTROL_RE.search(template):
    return "control character in template"
  return None


def normalize(template: str) -> str:
  """Key for duplicate detection: canonical, collapsed whitespace, case-folded."""
  return _WS_RE.sub(" ", canonical(template)).strip().casefold()
