"""On-disk response cache: a rerun or a resume replays answers and pays nothing.

The key is the sha256 of the canonical JSON of (endpoint, model, messages,
sampling parameters, chain id, call key). The call key names the position in
the search ("r0-i3-a1": reset 0, iteration 3, attempt 1), so a retry after an
unusable reply is a new key while a resumed run asks exactly the same keys.

One file per key, `<cache_dir>/<key[:2]>/<key>.json`, written to a temporary
file, fsynced and renamed: a kill -9 leaves either the whole entry or none.
Entries hold the request (without credentials) and the answer; never the key.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Mapping, Sequence
import urllib.parse

import orjson

from lmbbo_jax import io as io_lib

MODES = ("off", "read", "readwrite")


class CacheError(ValueError):
  """Bad cache configuration."""


def redact_url(url: str) -> str:
  """`url` without user:password@ (a credential must not reach a file)."""
  parts = urllib.parse.urlsplit(url)
  if parts.username is None and parts.password is None:
    return url
  host = parts.hostname or ""
  if parts.port:
    host = f"{host}:{parts.port}"
  return urllib.parse.urlunsplit(parts._replace(netloc=host))


def cache_key(*, base_url: str, model: str, messages: Sequence[Mapping],
              params: Mapping[str, Any], chain_id: str, call_key: str) -> str:
  """sha256 hex of the canonical request description."""
  blob = orjson.dumps(
      {"base_url": redact_url(base_url).rstrip("/"), "model": model,
       "messages": list(messages), "params": dict(params),
       "chain_id": chain_id, "call_key": call_key},
      option=orjson.OPT_SORT_KEYS)
  return hashlib.sha256(blob).hexdigest()


class ResponseCache:
  """Stores chat answers by request key.

  Args:
    cache_dir: folder of the cache (created in readwrite mode).
    mode: "off" (never read or write), "read" (replay hits, store nothing),
      "readwrite" (replay hits and store new answers).
  """

  def __init__(self, cache_dir: str | os.PathLike, mode: str = "readwrite"):
    if mode not in MODES:
      raise CacheError(f"--llm_cache={mode!r} is not one of {', '.join(MODES)}.")
    self.cache_dir = os.fspath(cache_dir)
    self.mode = mode
    self.hits = 0
    self.misses = 0
    self.writes = 0
    if mode == "readwrite":
      os.makedirs(self.cache_dir, exist_ok=True)

  def _path(self, key: str) -> str:
    return os.path.join(self.cache_dir, key[:2], key + ".json")

  def get(self, key: str) -> dict | None:
    """The stored entry for `key`, or None (also in mode "off")."""
    if self.mode == "off":
      return None
    try:
      with open(self._path(key), "rb") as f:
        entry = orjson.loads(f.read())
    except FileNotFoundError:
      self.misses += 1
      return None
    except (OSError, orjson.JSONDecodeError):
      # A damaged entry is treated as absent (atomic writes make this rare).
      self.misses += 1
      return None
    if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
      self.misses += 1
      return None
    self.hits += 1
    return entry

  def put(self, key: str, entry: Mapping[str, Any]) -> None:
    """Stores `entry` (must hold "text") atomically; no-op unless readwrite."""
    if self.mode != "readwrite":
      return
    data = orjson.dumps({**entry, "key": key, "stored_at": time.time()})
    io_lib.atomic_write(self._path(key), data, fsync=True)
    self.writes += 1

  def stats(self) -> dict[str, int | str]:
    return {"mode": self.mode, "hits": self.hits, "misses": self.misses,
            "writes": self.writes}
