"""Append-only, crash-safe logs of a search, and resume from them.

Files in the workdir:
* `prompts.jsonl`: one line per evaluated template, written (flush + fsync)
  the moment its score exists: template, accuracy, logprob, rejected, chain,
  reset, iteration, step, seq, proposer, call_id, eval_index, time, acc5,
  mean_per_class_recall (logs of older versions also have `restart`, the chain
  again: they still resume).
* `transcript.jsonl`: one line per proposer attempt (LLM request messages,
  reply, accepted templates, rejections with reasons, call id, usage).
* `search_config.json`: the search configuration, checked on resume.

Resume (`RunLog(workdir, resume=True)`) re-runs the search deterministically:
each chain asks the log for its `seq`-th evaluation and gets the logged score
back instead of scoring again; LLM replies come from the response cache by the
same deterministic keys. A torn last line (kill -9 during a write) is dropped.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable, Iterable, Mapping

from absl import logging
import orjson

from lmbbo_jax import io as io_lib
from lmbbo_jax.search.state import record_chain

PROMPTS = "prompts.jsonl"
TRANSCRIPT = "transcript.jsonl"
CONFIG = "search_config.json"


class RunLogError(ValueError):
  """A workdir that cannot be used as asked."""


class _Appender:
  """Appends JSON lines durably (flush + fsync per line)."""

  def __init__(self, path: str, fsync: bool):
    self.path = path
    self.fsync = fsync
    self._f = open(path, "ab")

  def write(self, row: Mapping[str, Any]) -> None:
    try:
      line = orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as e:  # orjson.JSONEncodeError: e.g. a lone surrogate from a reply
      # One record the log cannot write as is costs its odd characters, never the run.
      logging.warning("%s: a record holds what JSON cannot write (%s); written with it "
                      "replaced.", os.path.basename(self.path), e)
      line = orjson.dumps(_writable(row), option=orjson.OPT_SERIALIZE_NUMPY)
    self._f.write(line + b"\n")
    self._f.flush()
    if self.fsync:
      os.fsync(self._f.fileno())

  def close(self) -> None:
    if not self._f.closed:
      self._f.flush()
      self._f.close()


def _writable(value: Any) -> Any:
  """`value` with lone surrogates replaced and unknown types as their repr (JSON-writable)."""
  if isinstance(value, str):
    return value.encode("utf-8", "replace").decode("utf-8")
  if isinstance(value, Mapping):
    return {_writable(k if isinstance(k, str) else str(k)): _writable(v)
            for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_writable(v) for v in value]
  try:
    orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
  except TypeError:
    return _writable(repr(value))
  return value


class RunLog:
  """Durable record of one search run in `workdir`.

  Args:
    workdir: the run's folder (created).
    resume: continue an existing run; without it a workdir that already holds
      evaluations is refused (so nothing is overwritten or mixed).
    fsync: fsync after every line (on by default; tests may turn it off).
  """

  def __init__(self, workdir: str | os.PathLike, *, resume: bool = False,
               fsync: bool = True):
    self.workdir = os.fspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.prompts_path = os.path.join(self.workdir, PROMPTS)
    self.transcript_path = os.path.join(self.workdir, TRANSCRIPT)
    self.config_path = os.path.join(self.workdir, CONFIG)
    self.resume = resume
    existing = io_lib.read_jsonl(self.prompts_path, repair=True)
    if existing and not resume:
      raise RunLogError(
          f"workdir {self.workdir!r} already holds {len(existing)} evaluated "
          "templates; pass --resume to continue that run or choose a new "
          "--workdir.")
    transcript = io_lib.read_jsonl(self.transcript_path, repair=True) if resume else []
    if not resume:
      for path in (self.prompts_path, self.transcript_path):
        if os.path.exists(path):
          os.unlink(path)  # empty leftovers of a run that evaluated nothing
    self._logged: dict[tuple[int, int], dict] = {}
    for row in existing:
      self._logged[(record_chain(row), int(row["seq"]))] = row
    self._transcript_keys = {self._tkey(r) for r in transcript}
    self.next_eval_index = 1 + max(
        (int(r.get("eval_index", -1)) for r in existing), default=-1)
    self.replayed = 0
    self._prompts = _Appender(self.prompts_path, fsync)
    self._transcript = _Appender(self.transcript_path, fsync)

  @staticmethod
  def _tkey(row: Mapping) -> tuple:
    return (row.get("chain", row.get("restart")), row.get("reset"), row.get("iteration"),
            row.get("attempt"), row.get("kind", "attempt"))

  # --- configuration ----------------------------------------------------------
  def check_config(self, config: Mapping[str, Any],
                   may_change: Iterable[str] = (),
                   defaults: Mapping[str, Any] | None = None) -> None:
    """Stores `config`, or on resume checks that it matches the stored one.

    `defaults` fill keys a run stored before they existed (a run made by an
    older version resumes as long as the new settings keep their defaults).
    """
    config = json.loads(json.dumps(config))  # plain JSON types
    if self.resume and os.path.exists(self.config_path):
      with open(self.config_path, encoding="utf-8") as f:
        stored = {**json.loads(json.dumps(dict(defaults or {}))),
                  **json.load(f)}
      allowed = set(may_change)
      diff = sorted(k for k in set(stored) | set(config)
                    if k not in allowed and stored.get(k) != config.get(k))
      if diff:
        raise RunLogError(
            "--resume with a different search configuration "
            f"({', '.join(f'{k}: {stored.get(k)!r} -> {config.get(k)!r}' for k in diff)}); "
            "resume with the original settings or start a new --workdir.")
      return
    io_lib.atomic_write(self.config_path, json.dumps(config, indent=2, sort_keys=True),
                        fsync=True)

  # --- evaluations ------------------------------------------------------------
  def lookup(self, chain: int, seq: int) -> dict | None:
    """The logged evaluation number `seq` of `chain`, if the log has it."""
    return self._logged.get((chain, seq))

  def append_eval(self, row: Mapping[str, Any]) -> dict:
    """Logs one evaluation durably; assigns `eval_index` and `time`."""
    row = dict(row)
    row["eval_index"] = self.next_eval_index
    row.setdefault("time", time.time())
    self.next_eval_index += 1
    self._prompts.write(row)
    self._logged[(record_chain(row), int(row["seq"]))] = row
    return row

  def logged_rows(self) -> list[dict]:
    """Every logged evaluation, by (chain, seq)."""
    return [self._logged[k] for k in sorted(self._logged)]

  # --- transcript -------------------------------------------------------------
  def append_transcript(self, row: Mapping[str, Any]) -> bool:
    """Logs a transcript entry unless a resumed log already has it."""
    key = self._tkey(row)
    if key in self._transcript_keys:
      return False
    self._transcript_keys.add(key)
    row = dict(row)
    row.setdefault("time", time.time())
    self._transcript.write(row)
    return True

  def close(self) -> None:
    self._prompts.close()
    self._transcript.close()

  def __enter__(self) -> "RunLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_transcript(path: str | os.PathLike) -> list[dict]:
  """Entries of a transcript.jsonl (or of the one in a workdir)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, TRANSCRIPT)
  if not os.path.exists(path):
    raise RunLogError(f"no transcript at {path!r}; pass the workdir or "
                      "transcript.jsonl of a finished run.")
  return io_lib.read_jsonl(path)


def install_signal_handlers(stop: Callable[[], None], loop=None
                            ) -> Callable[[], None]:
  """SIGINT/SIGTERM call `stop()` once (a clean stop); returns an uninstaller.

  Logs are already durable line by line, so stopping only has to end the
  chains. After the first signal the default handlers are restored, so a
  second Ctrl-C interrupts at once. Call from the main thread, inside the
  running event loop (`loop` defaults to it).
  """
  import asyncio  # local: keeps this module importable without a loop

  loop = loop or asyncio.get_running_loop()
  sigs = (signal.SIGINT, signal.SIGTERM)

  def uninstall() -> None:
    for s in sigs:
      try:
        loop.remove_signal_handler(s)
      except (ValueError, RuntimeError):
        pass

  def handler(signame: str) -> None:
    logging.warning("%s received: stopping the search cleanly (logs are "
                    "kept; rerun with --resume to continue).", signame)
    uninstall()
    stop()

  for s in sigs:
    loop.add_signal_handler(s, handler, s.name)
  return uninstall
