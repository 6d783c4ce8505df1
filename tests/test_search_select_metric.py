"""`SearchConfig.select_metric`: which metric the one selection rule reads."""

import asyncio

import orjson
import pytest

from lmbbo_jax.evaluator.types import Score
from lmbbo_jax.search import RunLog, SearchConfig, SearchError, make_proposer_factory, run_search
from lmbbo_jax.search.state import EvalRecord, best_of, rank_key

CORPUS = ["a {} x", "a photo of {}", "the {} y"]


class MetricScorer:
  """Each template leads on a different metric: accuracy, acc5, per-class recall."""

  async def score_async(self, templates):
    lead = {"a {} x": "accuracy", "a photo of {}": "acc5", "the {} y": "mean_per_class_recall"}
    out = []
    for t in templates:
      values = {m: {"train": 0.9 if lead.get(t) == m else 0.2, "test": 0.0}
                for m in ("accuracy", "acc5", "mean_per_class_recall")}
      out.append(Score(template=t, logprob={"train": -1.0}, **values))
    return out


def search(tmp_path, **kw):
  cfg = SearchConfig(n_restart=1, n_iter=1, init_pool_size=3, **kw)

  async def go():
    with RunLog(tmp_path / "_".join(f"{k}={v}" for k, v in kw.items()), fsync=False) as log:
      return await run_search(cfg, MetricScorer(), make_proposer_factory("edit", cfg), log,
                              corpus=CORPUS)
  return asyncio.run(go())


@pytest.mark.parametrize("metric,best", [("accuracy", "a {} x"), ("acc5", "a photo of {}"),
                                         ("mean_per_class_recall", "the {} y")])
def test_the_selecting_metric_picks_the_best(tmp_path, metric, best):
  kw = {} if metric == "accuracy" else {"select_metric": metric}  # accuracy: the default
  result = search(tmp_path, **kw)
  assert result.best.template == best
  # Every metric reaches the log and replays from it.
  rows = [orjson.loads(l) for l in
          (tmp_path / "_".join(f"{k}={v}" for k, v in kw.items()) / "prompts.jsonl")
          .read_bytes().splitlines()]
  replayed = [EvalRecord.from_row(r) for r in rows if r.get("template") in CORPUS]
  assert best_of(replayed, "train", "logprob", metric).template == best
  assert all(r.acc5 and r.mean_per_class_recall for r in replayed)


def test_rank_key_reads_the_metric_and_bad_names_are_refused():
  rec = EvalRecord(template="t", accuracy={"train": 0.1}, logprob={}, rejected=None, chain=0,
                   reset=None, iteration=None, step=0, seq=0, proposer="init",
                   acc5={"train": 0.7}, mean_per_class_recall={"train": 0.3})
  assert rank_key(rec, "train")[0] == -0.1
  assert rank_key(rec, "train", "none", "acc5")[0] == -0.7
  assert rank_key(rec, "train", "none", "mean_per_class_recall")[0] == -0.3
  assert rec.score.metric("acc5") == {"train": 0.7}
  with pytest.raises(SearchError, match="select_metric"):
    SearchConfig(select_metric="acc1").validate()
  with pytest.raises(SearchError, match="select_metric"):
    rank_key(rec, "train", "none", "f1")


def test_acc5_of_a_small_task_is_a_clear_error(tmp_path):
  class FewClasses:  # fewer than 5 classes: the scorer gives no acc5
    async def score_async(self, templates):
      return [Score(template=t, accuracy={"train": 0.5}, mean_per_class_recall={"train": 0.5})
              for t in templates]
  cfg = SearchConfig(n_restart=1, n_iter=1, init_pool_size=2, select_metric="acc5")

  async def go():
    with RunLog(tmp_path / "few", fsync=False) as log:
      return await run_search(cfg, FewClasses(), make_proposer_factory("edit", cfg), log,
                              corpus=CORPUS)
  with pytest.raises(SearchError, match="5 or more classes"):
    asyncio.run(go())
