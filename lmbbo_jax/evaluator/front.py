"""Async front of the scorer: concurrent `score_async` calls coalesced into device batches.

Many search chains await scores at once, each with a few templates. A single
dispatcher task collects requests for a short window (or until a full batch is
there), runs one `scorer.score` over all their templates in a worker thread (so
the event loop keeps serving the LLM client while the device computes), and
hands each caller its own slice. The request queue is bounded, so producers
that outrun the device wait in `score_async` (back-pressure) instead of piling
up memory. Results equal `scorer.score` on the same templates: scoring is per
template and deterministic, batching only changes which call computes it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass
class _Request:
  templates: list[str]
  future: asyncio.Future


class ScoringFront:
  """Micro-batching front for one `PromptScorer` (or anything with `score(list)`).

  Bound to the event loop of its first call; using it from another loop starts
  a fresh dispatcher there.
  """

  def __init__(self, scorer: Any, *, batch_templates: int | None = None,
               wait_s: float = 0.01, max_pending: int = 256):
    """Args:
      scorer: has `score(templates) -> list[Score]` (and optionally
        `preferred_batch` and `rejection_reason`).
      batch_templates: templates per device batch (default: the scorer's
        `preferred_batch`); a bigger single request is still run whole.
      wait_s: how long the first request of a batch waits for company.
      max_pending: most queued requests before `score_async` callers wait.
    """
    self.scorer = scorer
    self.batch_templates = batch_templates or getattr(scorer, "preferred_batch", 8)
    self.wait_s = wait_s
    self.max_pending = max_pending
    self._loop: asyncio.AbstractEventLoop | None = None
    self._queue: asyncio.Queue | None = None
    self._task: asyncio.Task | None = None
    # One worker: the device is one resource, and the scorer is not reentrant.
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="scorer")
    # (start, end) perf_counter times of each device batch, so a caller running several
    # fronts at once can measure the union of busy time.
    self.intervals: list[tuple[float, float]] = []
    self.counts = {"requests": 0, "batches": 0, "templates": 0, "seconds_busy": 0.0,
                   "max_requests_per_batch": 0}

  def _ensure_started(self) -> asyncio.Queue:
    loop = asyncio.get_running_loop()
    if self._loop is not loop or self._task is None or self._task.done():
      self._loop = loop
      self._queue = asyncio.Queue(self.max_pending)
      self._task = loop.create_task(self._dispatch(self._queue), name="scoring-front")
    return self._queue  # type: ignore[return-value]

  async def score_async(self, templates: Sequence[str]) -> list:
    """Scores `templates`, sharing a device batch with concurrent callers."""
    templates = list(templates)
    if not templates:
      return []
    queue = self._ensure_started()
    future = asyncio.get_running_loop().create_future()
    await queue.put(_Request(templates, future))  # Blocks when the queue is full.
    return await future

  def rejection_reason(self, template: str) -> str | None:
    """None when `template` can be scored, else why not (format or too long)."""
    return self.scorer.rejection_reason(template)

  async def _collect(self, queue: asyncio.Queue) -> list[_Request]:
    batch = [await queue.get()]
    count = len(batch[0].templates)
    deadline = time.monotonic() + self.wait_s
    while count < self.batch_templates:
      if queue.empty():
        left = deadline - time.monotonic()
        if left <= 0:
          break
        try:
          request = await asyncio.wait_for(queue.get(), left)
        except asyncio.TimeoutError:
          break
      else:
        request = queue.get_nowait()
      batch.append(request)
      count += len(request.templates)
    return batch

  async def _dispatch(self, queue: asyncio.Queue) -> None:
    loop = asyncio.get_running_loop()
    while True:
      batch = await self._collect(queue)
      live = [r for r in batch if not r.future.done()]  # Skip cancelled callers.
      if not live:
        continue
      templates = [t for r in live for t in r.templates]
      started = time.perf_counter()
      try:
        scores = await loop.run_in_executor(self._pool, self.scorer.score, templates)
      except Exception as e:  # Every caller of the batch gets the error, the front lives on.
        for r in live:
          if not r.future.done():
            r.future.set_exception(e)
        continue
      finally:
        ended = time.perf_counter()
        self.counts["seconds_busy"] += ended - started
        self.intervals.append((started, ended))
      self.counts["batches"] += 1
      self.counts["requests"] += len(live)
      self.counts["templates"] += len(templates)
      self.counts["max_requests_per_batch"] = max(self.counts["max_requests_per_batch"],
                                                  len(live))
      at = 0
      for r in live:
        part = scores[at:at + len(r.templates)]
        at += len(r.templates)
        if not r.future.done():
          r.future.set_result(part)

  def stats(self) -> dict:
    """Front counters plus the scorer's (`scorer.stats()`), for throughput reports."""
    out = {f"front_{k}": v for k, v in self.counts.items()}
    if hasattr(self.scorer, "stats"):
      out.update(self.scorer.stats())
    return out

  async def aclose(self) -> None:
    """Stops the dispatcher (pending callers get CancelledError) and the worker."""
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
      self._task = None
    if self._queue is not None:
      while not self._queue.empty():
        request = self._queue.get_nowait()
        request.future.cancel()
    self._pool.shutdown(wait=False)

