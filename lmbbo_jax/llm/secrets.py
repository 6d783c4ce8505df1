"""The API key: read and checked once, and redacted from every string and log.

`read_key(env)` strips surrounding whitespace (a stray "\\r\\n" from a file)
and refuses a key holding control or non-ASCII characters with one line that
does not print it (httpx would otherwise raise an encoding error whose repr
holds the key). Every key read is remembered for the process, so `redact`
and the log filter know it without being handed it.

`redact(text)` removes each known key and its common transformations (URL-
and JSON-escaped forms; "Bearer <key>" contains the key itself), and a prefix
of at least `MIN_PREFIX` characters at the end of the text, which is what a
truncation leaves of a key. `clip(text, n)` redacts, cuts, and redacts the cut
end again: redaction always comes first.

`install_log_filter()` puts a redacting filter on the HTTP libraries' own
loggers (httpx, httpcore, h11, h2, hpack; their DEBUG records hold headers),
on the absl logger and on the root logger's handlers present at that moment,
so no log record at any verbosity carries a key.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.parse

from lmbbo_jax.llm.errors import LLMFatalError

# The shortest tail of a cut key still redacted (shorter tails say too little
# about a key to matter, and would redact innocent text).
MIN_PREFIX = 8
# Keys shorter than this are not redacted (they would erase common text).
_MIN_KEY = 4
# Loggers of the HTTP stack; their records are created on these names (a
# filter on a parent logger does not see a child's records).
HTTP_LOGGERS = (
    "httpx", "httpcore", "httpcore.connection", "httpcore.http11",
    "httpcore.http2", "httpcore.proxy", "httpcore.socks", "h11", "h2",
    "h2.connection", "h2.stream", "hpack", "hpack.hpack", "hpack.table",
    "absl")

_lock = threading.Lock()
_keys: set[str] = set()
_forms: tuple[str, ...] = ()  # every redacted form, longest first


def _register(key: str) -> None:
  global _forms
  with _lock:
    if key in _keys:
      return
    _keys.add(key)
    forms = set(_forms)
    forms.update({key, urllib.parse.quote(key, safe=""),
                  urllib.parse.quote_plus(key), json.dumps(key)[1:-1]})
    _forms = tuple(sorted(forms, key=len, reverse=True))
  install_log_filter()


def read_key(env_name: str) -> str | None:
  """The key in environment variable `env_name` (None when unset or blank).

  Raises:
    LLMFatalError: the key holds control or non-ASCII characters (the message
      names the variable, never the value).
  """
  key = os.environ.get(env_name, "").strip()
  if not key:
    return None
  if not all(0x21 <= ord(c) <= 0x7E for c in key):
    raise LLMFatalError(
        f"the environment variable {env_name} holds a key with control, space "
        "or non-ASCII characters; set it to the key alone (its value is never "
        "printed).")
  if len(key) >= _MIN_KEY:
    _register(key)
  return key


def redact(text: str) -> str:
  """`text` without any known key, its escaped forms or a cut-off key prefix."""
  forms = _forms
  if not forms or not text:
    return text
  for form in forms:
    if form in text:
      text = text.replace(form, "***")
  for key in _keys:
    for n in range(len(key) - 1, MIN_PREFIX - 1, -1):
      if text.endswith(key[:n]):
        return text[:-n] + "***"
  return text


def clip(text: str, limit: int) -> str:
  """`text` redacted, then cut to `limit` characters (redacted again)."""
  return redact(redact(text)[:limit])


class RedactingFilter(logging.Filter):
  """Rewrites a record's message, exception and stack text without keys."""

  def filter(self, record: logging.LogRecord) -> bool:
    if not _forms:
      return True
    try:
      message = record.getMessage()
    except Exception:  # a broken record is the handler's to report
      return True
    clean = redact(message)
    if clean != message:
      record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
      record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
      record.exc_text = redact(record.exc_text)
    if record.stack_info:
      record.stack_info = redact(record.stack_info)
    return True


_FILTER = RedactingFilter()


def install_log_filter() -> None:
  """Adds the redacting filter to the HTTP loggers and the root handlers."""
  for name in HTTP_LOGGERS:
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)
  for handler in logging.getLogger().handlers:
    if _FILTER not in handler.filters:
      handler.addFilter(_FILTER)
