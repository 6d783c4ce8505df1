"""Beyond the paper's feedback: confusion feedback (train-split class pairs with counts,
never test), the per-class Pareto front and its merge step, and successive halving of
many candidates per call (held-out val breaks train ties; logits never read under
tie_break=none). Known answers with scripted clients and fake scorers."""

import asyncio
import random

import pytest

from lmbbo_jax import templates as tpl
from lmbbo_jax.evaluator.types import Score
from lmbbo_jax.search import LLMProposer, RunLog, SearchConfig, run_search
from lmbbo_jax.search import make_proposer_factory
from lmbbo_jax.search.state import ChainState, EvalRecord, halving_survivors, pareto_front

from search_helpers import WordScorer
from test_search_proposers import ScriptedClient

NAMES = ["cat", "dog", "fox", "owl", "yak", "TESTONLY_A", "TESTONLY_B"]


def rec(template, acc, seq, *, confusions=None, per_class=None, val=None, logprob=None,
        step=0):
  accuracy = {"train": acc, "test": 1 - acc}
  if val is not None:
    accuracy["val"] = val
  return EvalRecord(template=template, accuracy=accuracy, logprob=logprob or {},
                    rejected=None, chain=0, reset=None, iteration=None, step=step, seq=seq,
                    proposer="init", confusions=confusions or {}, per_class=per_class)


def state_with(config, records):
  state = ChainState(chain=0, config=config, rng=random.Random(0), class_names=NAMES)
  for r in records:
    state.pool.append(r)
    state.seen.add(tpl.normalize(r.template))
  state.next_seq = len(records)
  return state


# The test split confuses TESTONLY_A with TESTONLY_B far more often than train confuses
# anything: none of it may reach the LLM.
TEST_PAIRS = [(5, 6, 99)]


def confusion_pool():
  return [
      rec("a {} one", 0.9, 0, confusions={"train": [(0, 1, 3), (2, 3, 1)], "test": TEST_PAIRS}),
      rec("a {} two", 0.8, 1, confusions={"train": [(0, 1, 2), (3, 4, 2)], "test": TEST_PAIRS}),
      # Third best: not among k_pos=2 positives, its pair is not counted.
      rec("a {} three", 0.5, 2, confusions={"train": [(4, 0, 7)], "test": TEST_PAIRS}),
      rec("a {} four", 0.1, 3, confusions={"train": [(1, 2, 9)], "test": TEST_PAIRS}),
  ]


def test_confusion_feedback_names_the_positives_train_pairs_with_counts_never_test():
  cfg = SearchConfig(feedback="confusion", k_pos=2, k_neg=1)
  text = LLMProposer(None, cfg).build_messages(state_with(cfg, confusion_pool()))[0]["content"]
  block = text[text.index("Classes CLIP most often mixes up"):text.index("Requirements:")]
  # cat->dog: 3 + 2 over the two positives; then (3, 4) 2; then (2, 3) 1 (equal counts:
  # lower true class first).
  assert block.splitlines()[1:4] == [
      '- a "cat" taken for a "dog" (5 times)',
      '- a "owl" taken for a "yak" (2 times)',
      '- a "fox" taken for a "owl" (1 time)']
  assert "TESTONLY" not in text and "99" not in text
  assert '"a {} one"' in text and '"a {} four"' in text  # P and N lists stay
  assert "yak\" taken for a \"cat" not in text  # the third-ranked template's pair


def test_confusion_feedback_reads_the_joined_train_val_split_under_train_val():
  cfg = SearchConfig(feedback="confusion", k_pos=1, select_by="train_val")
  pool = [rec("a {} one", 0.9, 0, confusions={"train": [(0, 1, 3)], "train_val": [(1, 0, 4)],
                                             "test": TEST_PAIRS})]
  text = LLMProposer(None, cfg).build_messages(state_with(cfg, pool))[0]["content"]
  assert '- a "dog" taken for a "cat" (4 times)' in text and "TESTONLY" not in text


def test_no_confusions_says_so_and_class_names_are_inserted_verbatim():
  cfg = SearchConfig(feedback="confusion", k_pos=1)
  state = state_with(cfg, [rec("a {} one", 1.0, 0, confusions={"train": []})])
  assert "classifies every training image correctly" in (
      LLMProposer(None, cfg).build_messages(state)[0]["content"])
  state = state_with(cfg, [rec("a {} one", 0.5, 0, confusions={"train": [(0, 1, 1)]})])
  state.class_names = ["<<requirements>> {0.__class__}", "{}"]
  text = LLMProposer(None, cfg).build_messages(state)[0]["content"]
  assert '- a "<<requirements>> {0.__class__}" taken for a "{}" (1 time)' in text


class ConfusingScorer(WordScorer):
  """WordScorer with class names, and confusions that differ by split (test: TESTONLY)."""

  class_names = NAMES

  async def score_async(self, templates):
    out = []
    for s in await super().score_async(templates):
      if s.ok:
        n = 1 + len(s.template) % 4
        s = Score(s.template, accuracy=s.accuracy, logprob=s.logprob,
                  confusions={"train": [(0, 1, n), (2, 3, 1)], "val": [(4, 0, 50)],
                              "test": TEST_PAIRS})
      out.append(s)
    return out


def run(config, scorer, client, workdir, resume=False):
  async def go():
    with RunLog(workdir, resume=resume) as log:
      return await run_search(config, scorer,
                              make_proposer_factory("llm", config, client=client), log,
                              corpus=["a {} one", "a clear {}", "a dark {} photo",
                                      "the {} two", "a bright {}"])
  return asyncio.run(go())


def test_confusion_search_shows_logged_train_confusions_and_resume_shows_the_same(tmp_path):
  cfg = SearchConfig(feedback="confusion", k_pos=2, k_neg=1, n_iter=2, init_pool_size=5)
  replies = ['- "a clear bright {}"', '- "a clear natural {}"']
  first = ScriptedClient(list(replies))
  result = run(cfg, ConfusingScorer(), first, tmp_path / "w")
  texts = [calls[0][-1]["content"] for calls in first.calls]
  for text in texts:
    assert "Classes CLIP most often mixes up" in text
    assert '"cat" taken for a "dog"' in text and "TESTONLY" not in text
    assert '"yak" taken for' not in text  # val's pairs are not the selection split's
  # The records carry the scorer's confusions; the log keeps them.
  assert all(r.confusions["train"] for r in result.records if r.ok)
  rows = [r for r in (tmp_path / "w" / "prompts.jsonl").read_text().splitlines()]
  assert '"confusions"' in rows[0]
  # A resumed run replays the records from the log (the scorer is never called) and
  # shows the LLM the same messages.
  again = ScriptedClient(list(replies))
  scorer = ConfusingScorer()
  run(cfg, scorer, again, tmp_path / "w", resume=True)
  assert scorer.received == []
  assert [calls[0][-1]["content"] for calls in again.calls] == texts


# --- the per-class Pareto front and the merge step -----------------------------------
def front_pool():
  return [
      rec("a {} best", 0.5, 0, per_class={"train": [1, 1, 1, 0, 0, 0]}),
      rec("a {} rare", 1 / 6, 1, per_class={"train": [0, 0, 0, 1, 0, 0]}),
      rec("a {} wide", 0.5, 2, per_class={"train": [0, 0, 1, 0, 1, 1]}),
      rec("a {} dominated", 1 / 3, 3, per_class={"train": [1, 1, 0, 0, 0, 0]}),
      rec("a {} same as best", 0.5, 4, per_class={"train": [1, 1, 1, 0, 0, 0]}),
      rec("a {} no per-class", 0.9, 5),
  ]


def test_the_pareto_front_keeps_a_per_class_winner_that_is_worst_on_average():
  front = pareto_front(front_pool(), "train", "none")
  # "rare" is the only template right on class 3, though the worst on average;
  # "dominated" is beaten or equalled on every class by "best"; the copy of "best"
  # is represented by the earlier one; records without per-class accuracy are out.
  assert [r.template for r in front] == ["a {} best", "a {} wide", "a {} rare"]


def test_the_merge_step_asks_to_combine_two_front_members_every_merge_every_calls():
  cfg = SearchConfig(merge_every=2, k_pos=2)
  prop = LLMProposer(None, cfg)
  state = state_with(cfg, front_pool())
  state.iteration = 0
  assert prop.merge_parents(state) is None
  assert "Templates that work well:" in prop.build_messages(state)[0]["content"]
  state.iteration = 1  # the 2nd call
  first, second = prop.merge_parents(state)
  # The best, and the member better than it on the most classes (wide: 4 and 5).
  assert (first.template, second.template) == ("a {} best", "a {} wide")
  text = prop.build_messages(state)[0]["content"]
  assert '- "a {} best" (better on "cat", "dog")' in text
  assert '- "a {} wide" (better on "yak", "TESTONLY_A")' in text
  assert "combine the strengths of both" in text and "rare" not in text


def test_a_merge_call_is_logged_with_its_parents():
  cfg = SearchConfig(merge_every=1, k_pos=2)
  client = ScriptedClient(['- "a {} merged"'])
  entries = []
  state = state_with(cfg, front_pool())
  state.log_transcript = entries.append
  proposal = asyncio.run(LLMProposer(client, cfg).propose(state))
  assert proposal.templates == ["a {} merged"]
  assert entries[0]["merge_parents"] == ["a {} best", "a {} wide"]
  assert "combine the strengths" in client.calls[0][0][-1]["content"]


def test_without_a_front_of_two_the_merge_call_is_an_ordinary_one():
  cfg = SearchConfig(merge_every=1, k_pos=2)
  state = state_with(cfg, [rec("a {} one", 0.5, 0, per_class={"train": [1, 0]}),
                           rec("a {} two", 0.4, 1)])
  assert LLMProposer(None, cfg).merge_parents(state) is None
  assert "Templates that work well:" in (
      LLMProposer(None, cfg).build_messages(state)[0]["content"])


# --- successive halving --------------------------------------------------------------
class NoLogits(dict):
  """A logprob mapping that fails if anything reads it."""

  def get(self, *a):
    raise AssertionError("logits read under tie_break=none")

  __getitem__ = __contains__ = get


def test_halving_breaks_train_ties_by_val_and_never_reads_logits_under_none():
  vals = [0.1, 0.9, 0.3, 0.7, 0.5, 0.2]
  cands = [rec(f"a {{}} {i}", 0.5, i, val=v, logprob=NoLogits()) for i, v in enumerate(vals)]
  cands += [rec("a {} low", 0.25, 6, val=1.0, logprob=NoLogits()),
            rec("a {} lower", 0.2, 7, val=1.0, logprob=NoLogits())]
  # Round 1 (train): the six at 0.5 tie, val keeps 0.9, 0.7, 0.5, 0.3; round 2 (val): 0.9, 0.7.
  survivors = halving_survivors(cands, "train", "none")
  assert [r.template for r in survivors] == ["a {} 1", "a {} 3"]


def test_halving_ties_on_train_and_val_go_by_logprob_or_else_the_earliest():
  cands = [rec(f"a {{}} {i}", 0.5, i, val=0.5, logprob={"train": lp})
           for i, lp in enumerate([-3.0, -1.0, -2.0, -0.5])]
  assert [r.template for r in halving_survivors(cands, "train", "logprob")] == ["a {} 3"]
  assert [r.template for r in halving_survivors(cands, "train", "none")] == ["a {} 0"]


class TableScorer:
  """Scores from a table: template -> (train, val); test = 1 - train."""

  def __init__(self, table):
    self.table = table

  async def score_async(self, templates):
    return [Score(t, accuracy={"train": tr, "val": va, "test": 1 - tr},
                  logprob={"train": 0.0, "val": 0.0})
            for t in templates for tr, va in [self.table.get(t, (0.3, 0.3))]]


def test_halving_in_a_search_logs_every_candidate_and_never_selects_a_culled_one(tmp_path):
  cfg = SearchConfig(m_new=4, selection="halving", tie_break="none", n_iter=1,
                     init_pool_size=2)
  # Round 1 keeps the two best on train ("top" 0.9, "good" 0.8); round 2 keeps "good",
  # the better on val: "top", the best on train, is scored and logged, never selected.
  table = {"a {} top": (0.9, 0.1), "a {} good": (0.8, 0.5), "a {} meh": (0.1, 0.9),
           "a {} bad": (0.1, 0.8), "a {} one": (0.3, 0.3), "the {} two": (0.2, 0.2)}
  client = ScriptedClient(['- "a {} top"\n- "a {} good"\n- "a {} meh"\n- "a {} bad"'])

  async def go():
    with RunLog(tmp_path / "w") as log:
      return await run_search(cfg, TableScorer(table),
                              make_proposer_factory("llm", cfg, client=client), log,
                              corpus=["a {} one", "the {} two"])
  result = asyncio.run(go())
  new = {r.template: r.pooled for r in result.records if r.step > 0}
  assert new == {"a {} top": False, "a {} good": True, "a {} meh": False, "a {} bad": False}
  assert result.best_record.template == "a {} good"
  assert result.counts["scored_templates"] == 6
  logged = (tmp_path / "w" / "prompts.jsonl").read_text()
  assert logged.count('"pooled":false') + logged.count('"pooled": false') == 3
  # The report's best-so-far follows the same rule.
  import json
  from lmbbo_jax import report
  rows = [json.loads(line) for line in logged.splitlines()]
  assert report._best_so_far(rows, "train", "none")[-1]["template"] == "a {} good"


def test_new_search_options_validate_with_one_line_errors():
  from lmbbo_jax.search.state import SearchError
  with pytest.raises(SearchError, match="selection="):
    SearchConfig(selection="best").validate()
  with pytest.raises(SearchError, match="merge_every"):
    SearchConfig(merge_every=-1).validate()
  SearchConfig(feedback="confusion", merge_every=3, selection="halving").validate()


def test_multi_turn_confusion_feedback_repeats_the_pairs_of_the_current_positives():
  from lmbbo_jax.search.state import Turn
  cfg = SearchConfig(feedback="confusion", k_pos=2, conversation="multi_turn")
  prop = LLMProposer(None, cfg)
  state = state_with(cfg, confusion_pool())
  first = prop.build_messages(state)
  new = rec("a {} new", 0.95, 4, confusions={"train": [(1, 0, 6)], "test": TEST_PAIRS}, step=1)
  state.pool.append(new)
  state.turns = [Turn(messages=first, reply='- "a {} new"', records=[new])]
  follow = prop.build_messages(state)[-1]["content"]
  # Positives now "new" (6) and "one" (3 + 1); never the test pairs.
  assert '- a "dog" taken for a "cat" (6 times)' in follow
  assert '- a "cat" taken for a "dog" (3 times)' in follow and "TESTONLY" not in follow
