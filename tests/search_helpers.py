"""Fakes with known answers for the search tests, and a subprocess entry point.

`WordScorer` scores a template by the words it contains: "clear", "bright",
"photo", ... raise train accuracy, "blurry", "dark", ... lower it, so better
templates exist and a working search must find them. Test accuracy is
deliberately anti-correlated with train (1 - train), so any use of it in
selection shows up. Every template the scorer receives is recorded.

`python tests/search_helpers.py --workdir W --base_url U ...` runs an LLM
search (used by the kill -9 / resume test) and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from lmbbo_jax import templates as tpl
from lmbbo_jax.evaluator.types import Score

GOOD = {"clear": 3, "bright": 2, "photo": 2, "natural": 1, "detailed": 1,
        "close-up": 1}
BAD = {"blurry": -2, "dark": -2, "sketch": -1, "cartoon": -1, "tiny": -1}
MAX_WORDS = 25


def word_points(template: str) -> int:
  words = {w.strip(".,!?\"'").lower() for w in template.split()}
  return sum(GOOD.get(w, 0) + BAD.get(w, 0) for w in words)


class WordScorer:
  """Deterministic scorer with a known optimum (see module docstring).

  Args:
    delay_s: sleep per `score_async` call (to exercise concurrency).
    test_fn: test accuracy from train accuracy (default 1 - train).
    context: offer `rejection_reason` (rejects templates over MAX_WORDS words).
  """

  def __init__(self, delay_s: float = 0.0, test_fn=None, context: bool = True):
    self.delay_s = delay_s
    self.test_fn = test_fn or (lambda train: 1.0 - train)
    self.received: list[str] = []
    self.calls = 0
    if not context:
      self.rejection_reason = None  # type: ignore[assignment]

  def train_accuracy(self, template: str) -> float:
    return min(1.0, max(0.0, 0.40 + 0.05 * word_points(template)))

  def rejection_reason(self, template: str) -> str | None:  # noqa: D401
    if len(template.split()) > MAX_WORDS:
      return "longer than the 77-token text context"
    return None

  async def score_async(self, templates: list[str]) -> list[Score]:
    self.calls += 1
    if self.delay_s:
      await asyncio.sleep(self.delay_s)
    out = []
    for t in templates:
      self.received.append(t)
      if tpl.invalid_reason(t):
        out.append(Score(template=t, rejected=tpl.invalid_reason(t)))
        continue
      train = self.train_accuracy(t)
      val = min(1.0, train + 0.01 * (len(t.split()) % 3))
      out.append(Score(
          template=t,
          accuracy={"train": train, "val": val, "test": self.test_fn(train)},
          logprob={"train": -1.0 + 0.1 * word_points(t) - 0.001 * len(t),
                   "val": -1.0, "test": -1.0}))
    return out


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--cache_dir", required=True)
  parser.add_argument("--base_url", required=True)
  parser.add_argument("--resume", action="store_true")
  parser.add_argument("--n_restart", type=int, default=2)
  parser.add_argument("--n_reset", type=int, default=2)
  parser.add_argument("--n_iter", type=int, default=3)
  parser.add_argument("--init_pool_size", type=int, default=10)
  parser.add_argument("--conversation", default="multi_turn")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  from lmbbo_jax.llm import Ledger, LLMClient, ResponseCache
  from lmbbo_jax.search import (RunLog, SearchConfig, install_signal_handlers,
                                make_proposer_factory, run_search)

  async def run() -> None:
    config = SearchConfig(n_restart=args.n_restart, n_reset=args.n_reset,
                          n_iter=args.n_iter, init_pool_size=args.init_pool_size,
                          conversation=args.conversation, seed=args.seed)
    ledger = Ledger("fake-model")
    client = LLMClient(args.base_url, "fake-model", timeout_s=30,
                       deadline_s=60, ledger=ledger,
                       cache=ResponseCache(args.cache_dir, "readwrite"))
    stop = asyncio.Event()
    uninstall = install_signal_handlers(stop.set)
    with RunLog(args.workdir, resume=args.resume) as log:
      try:
        result = await run_search(
            config, WordScorer(), make_proposer_factory("llm", config,
                                                        client=client),
            log, stop_event=stop, ledger=ledger)
      finally:
        uninstall()
        await client.aclose()
    import json
    print(json.dumps(result.summary()))

  asyncio.run(run())
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
