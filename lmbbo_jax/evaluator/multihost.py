"""Several processes, one mesh: JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same program over one global mesh (SPMD): the same device
calls, in the same order. What only process 0 knows reaches the others through
`broadcast` (a JSON value) or `broadcast_array`: whether the image-feature cache
holds a split, the templates the search wants scored, the run's results. The
search, the LLM calls and the outputs stay on process 0 ("the leader"); during the
search the other processes `serve` its scoring calls, which the leader announces
with `Lockstep`, until it says stop. On one process every helper is the identity.

A peer that dies is noticed by JAX's coordination service, which ends the others
within the heartbeat timeout (`--distributed_heartbeat_s`) with its own message
("... another task died ..."); a leader that fails with a Python error tells the
followers first, and they exit with one line naming it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
import orjson

# Serialises the announced device calls of all of the leader's scorers: each
# announcement and its call form one step of the followers' loop.
_ORDER = threading.RLock()


# Bytes of the fixed first buffer of `broadcast` (a scoring call's templates fit).
_HEAD = 4096


class LeaderStopped(RuntimeError):
  """Process 0 stopped the run with an error; this process stops too."""


def process_count() -> int:
  return jax.process_count()


def process_index() -> int:
  return jax.process_index()


def is_leader() -> bool:
  return jax.process_index() == 0


def broadcast(value: Any = None) -> Any:
  """Process 0's JSON-serialisable `value`, on every process (others pass anything)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  data = orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY) if is_leader() else b""
  # One collective for a short message (its length and first bytes in a fixed-size
  # buffer), a second one for the rest of a long one; each buffer shape compiles once,
  # so the rest's size is rounded up to a power of two.
  head = np.zeros((_HEAD,), np.uint8)
  if is_leader():
    head[:4] = np.frombuffer(np.array([len(data)], "<u4").tobytes(), np.uint8)
    first = data[:_HEAD - 4]
    head[4:4 + len(first)] = np.frombuffer(first, np.uint8)
  head = np.asarray(multihost_utils.broadcast_one_to_all(head), np.uint8)
  size = int(np.frombuffer(head[:4].tobytes(), "<u4")[0])
  body = head[4:4 + size].tobytes()
  rest = size - len(body)
  if rest > 0:
    buf = np.zeros((1 << (rest - 1).bit_length(),), np.uint8)
    if is_leader():
      buf[:rest] = np.frombuffer(data[_HEAD - 4:], np.uint8)
    body += np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)[:rest].tobytes()
  return orjson.loads(body)


def broadcast_array(array: np.ndarray | None) -> np.ndarray:
  """Process 0's host array, on every process (its shape and dtype travel first)."""
  if jax.process_count() == 1:
    return np.asarray(array)
  from jax.experimental import multihost_utils
  meta = broadcast({"shape": list(array.shape), "dtype": str(array.dtype)} if is_leader()
                   else None)
  buf = (np.ascontiguousarray(array) if is_leader()
         else np.zeros(meta["shape"], np.dtype(meta["dtype"])))
  return np.asarray(multihost_utils.broadcast_one_to_all(buf), np.dtype(meta["dtype"]))


class Lockstep:
  """The leader's side of a search: announces each scoring call to the followers.

  `scorer.lockstep = Lockstep(index).call` makes the scorer's device calls
  announce (op, arguments, which scorer) before running them, all of them in one
  order (`_ORDER`), so that `serve` on the other processes runs the same calls.
  """

  def __init__(self, index: int):
    self.index = index

  @contextlib.contextmanager
  def call(self, op: str, args: Mapping[str, Any]) -> Iterator[None]:
    with _ORDER:
      broadcast({"op": op, "scorer": self.index, "args": dict(args)})
      yield


def stop(error: str | None = None) -> None:
  """Ends the followers' `serve` loop (with the leader's error, if it failed)."""
  with _ORDER:
    broadcast({"op": "stop", "error": error})


def serve(scorers: Mapping[int, Any]) -> None:
  """A follower's search: runs the leader's announced scoring calls until it stops.

  Raises:
    LeaderStopped: the leader stopped with an error.
  """
  ops: dict[str, Callable[[Any, dict], Any]] = {
      "score": lambda s, a: s.score(a["templates"]),
      "score_ensemble": lambda s, a: s.score_ensemble(a["groups"]),
      "text_features": lambda s, a: s.text_features(a["templates"]),
      "score_descriptions": lambda s, a: s.score_descriptions(a["sets"], a["mode"], a["names"]),
      "sentence_features": lambda s, a: s.sentence_features(a["groups"]),
  }
  while True:
    message = broadcast(None)
    if message["op"] == "stop":
      if message.get("error"):
        raise LeaderStopped(f"process 0 stopped: {message['error']}")
      return
    ops[message["op"]](scorers[message["scorer"]], message["args"])
