"""The async front: coalescing, back-pressure, a responsive loop, results equal to score()."""

import asyncio
import threading
import time

import numpy as np
import pytest

from lmbbo_jax.evaluator.front import ScoringFront
from lmbbo_jax.evaluator.scorer import PromptScorer
from lmbbo_jax.evaluator.types import Score

from evaluator_helpers import CLASS_NAMES, make_clip, random_images


class FakeScorer:
  """Known answers (accuracy = len(template) / 100), a slow blocking score(), call log."""

  def __init__(self, delay=0.05, fail_on=None):
    self.delay, self.fail_on = delay, fail_on
    self.calls: list[list[str]] = []
    self.active = 0
    self.max_active = 0
    self._lock = threading.Lock()
    self.preferred_batch = 8

  def score(self, templates):
    with self._lock:
      self.active += 1
      self.max_active = max(self.max_active, self.active)
    try:
      time.sleep(self.delay)  # blocks like a device call
      self.calls.append(list(templates))
      if self.fail_on and self.fail_on in templates:
        raise RuntimeError("device fell over")
      return [Score(t, {"train": len(t) / 100}) for t in templates]
    finally:
      with self._lock:
        self.active -= 1

  def rejection_reason(self, template):
    return None if "{}" in template else "no slot"


def test_concurrent_callers_are_coalesced_with_their_own_results():
  fake = FakeScorer()
  front = ScoringFront(fake, wait_s=0.02)

  async def main():
    requests = [[f"t{i}-{j} {{}}" for j in range(i % 3 + 1)] for i in range(12)]
    results = await asyncio.gather(*(front.score_async(r) for r in requests))
    await front.aclose()
    return requests, results

  requests, results = asyncio.run(main())
  for r, res in zip(requests, results):
    assert [s.template for s in res] == r
    assert [s.accuracy["train"] for s in res] == [len(t) / 100 for t in r]
  assert len(fake.calls) < len(requests)  # coalesced
  assert max(len(c) for c in fake.calls) >= 8
  assert fake.max_active == 1  # one device worker
  assert front.stats()["front_requests"] == len(requests)


def test_event_loop_stays_responsive_and_queue_is_bounded():
  fake = FakeScorer(delay=0.4)
  front = ScoringFront(fake, batch_templates=1, wait_s=0.0, max_pending=2)

  async def main():
    ticks = []

    async def ticker():
      while True:
        ticks.append(time.monotonic())
        await asyncio.sleep(0.01)

    tick_task = asyncio.create_task(ticker())
    calls = [asyncio.create_task(front.score_async([f"x{i} {{}}"])) for i in range(6)]
    await asyncio.sleep(0.1)
    queued = front._queue.qsize()
    await asyncio.gather(*calls)
    tick_task.cancel()
    await front.aclose()
    return ticks, queued

  ticks, queued = asyncio.run(main())
  assert queued <= 2  # producers beyond the bound wait in score_async
  # While the worker thread blocked for 6 x 0.4 s, the loop kept ticking.
  assert len(ticks) > 60 and np.diff(ticks).max() < 0.35  # a blocked loop: >= 0.4


def test_errors_reach_every_caller_of_the_batch_and_the_front_survives():
  fake = FakeScorer(fail_on="bad {}")
  front = ScoringFront(fake, wait_s=0.05)

  async def main():
    out = await asyncio.gather(front.score_async(["bad {}"]), front.score_async(["ok {}"]),
                               return_exceptions=True)
    after = await front.score_async(["fine {}"])
    await front.aclose()
    return out, after

  out, after = asyncio.run(main())
  assert all(isinstance(o, RuntimeError) for o in out)
  assert after[0].template == "fine {}"
  assert front.rejection_reason("no slot") == "no slot" and front.rejection_reason("a {}") is None


def test_score_async_equals_score_on_a_real_scorer():
  clip = make_clip()
  images, labels = random_images(len(CLASS_NAMES), 2, clip.embed_dim, seed=4)
  scorer = PromptScorer(clip, {"train": images}, {"train": labels}, CLASS_NAMES,
                        rows_per_call=8)
  groups = [["a photo of a {}.", "{} in the wild."], ["many {}s."], ["a {0} photo {}"],
            ["itap of my {}!", "a photo of a {}."]]
  direct = scorer.score([t for g in groups for t in g])

  async def main():
    return await asyncio.gather(*(scorer.score_async(g) for g in groups))

  got = [s for res in asyncio.run(main()) for s in res]
  for a, b in zip(direct, got):
    assert a.template == b.template and a.rejected == b.rejected
    assert a.accuracy == b.accuracy
    assert a.logprob == pytest.approx(b.logprob, abs=1e-6)
  assert scorer.stats()["templates"] >= 2 * 4
