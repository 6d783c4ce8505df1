"""LLMProposer message building and retries; EditProposer; ReplayProposer."""

import asyncio
import random

import pytest

from lmbbo_jax import templates as tpl
from lmbbo_jax.llm import ChatResult, LLMRetriesExhausted
from lmbbo_jax.search import (EditProposer, LLMProposer, ReplayProposer,
                              SearchConfig)
from lmbbo_jax.search.proposers import EDIT_OPS
from lmbbo_jax.search.state import ChainState, EvalRecord, Turn


def record(template, acc, seq, lp=None, step=0):
  return EvalRecord(template=template, accuracy={"train": acc, "test": 1 - acc},
                    logprob={"train": lp} if lp is not None else {},
                    rejected=None, chain=0, reset=None, iteration=None,
                    step=step, seq=seq, proposer="init")


POOL = [("a {} alpha", 0.50), ("a {} beta", 0.70), ("a {} gamma", 0.30),
        ("a {} delta", 0.90), ("a {} epsilon", 0.10), ("a {} zeta", 0.60),
        ("a {} eta", 0.20), ("a {} theta", 0.40)]


def make_state(config, pool=POOL, seed=0):
  state = ChainState(chain=0, config=config, rng=random.Random(seed))
  for i, (t, a) in enumerate(pool):
    state.pool.append(record(t, a, i))
    state.seen.add(tpl.normalize(t))
  state.next_seq = len(pool)
  return state


class ScriptedClient:
  """Answers chat calls from a list (str reply or exception)."""

  def __init__(self, replies):
    self.replies = list(replies)
    self.calls = []

  async def chat(self, messages, *, chain_id, call_key, response_schema=None):
    self.calls.append((messages, chain_id, call_key))
    self.schemas = getattr(self, "schemas", []) + [response_schema]
    r = self.replies.pop(0)
    if isinstance(r, Exception):
      raise r
    finish = "length" if r.endswith("...") else "stop"
    return ChatResult(text=r, usage={}, latency_s=0.5, cached=False,
                      call_id=f"id-{call_key}", finish_reason=finish,
                      queue_s=0.1)


def test_single_turn_message_lists_top_and_bottom_k():
  cfg = SearchConfig(k_pos=3, k_neg=2)
  prop = LLMProposer(None, cfg)
  msgs = prop.build_messages(make_state(cfg))
  assert len(msgs) == 1 and msgs[0]["role"] == "user"
  text = msgs[0]["content"]
  good = text.index("Templates that work well:")
  bad = text.index("Templates that don't work well:")
  order = [text.index(f'"a {{}} {w}"') for w in ("delta", "beta", "zeta")]
  assert good < order[0] < order[1] < order[2] < bad  # best first
  worst = [text.index(f'"a {{}} {w}"') for w in ("epsilon", "eta")]
  assert bad < worst[0] < worst[1]  # worst first
  assert "alpha" not in text and "accuracy" not in text
  assert "write one new template" in text


def test_scores_shown_and_feedback_modes():
  cfg = SearchConfig(show_scores=True)
  text = LLMProposer(None, cfg).build_messages(make_state(cfg))[0]["content"]
  assert '"a {} delta" (accuracy 90.00%)' in text
  for mode, has_good, has_bad in (("pos", True, False), ("neg", False, True),
                                  ("none", False, False)):
    cfg = SearchConfig(feedback=mode)
    text = LLMProposer(None, cfg).build_messages(make_state(cfg))[0]["content"]
    assert ("Templates that work well:" in text) == has_good
    assert ("don't work well:" in text) == has_bad
    assert ("delta" in text) == has_good and ("epsilon" in text) == has_bad


def test_small_pool_positives_and_negatives_are_disjoint():
  cfg = SearchConfig(k_pos=3, k_neg=3)
  pos, neg = LLMProposer(None, cfg).positives_negatives(
      make_state(cfg, pool=POOL[:4]))
  assert [r.template for r in pos] == ["a {} delta", "a {} beta", "a {} alpha"]
  assert [r.template for r in neg] == ["a {} gamma"]


def test_template_text_is_never_expanded_in_messages():
  cfg = SearchConfig(k_pos=1, k_neg=1)
  state = make_state(cfg, pool=[("a <<negatives>> {} <<requirements>>", 0.9),
                                ("{}", 0.1)])
  text = LLMProposer(None, cfg).build_messages(state)[0]["content"]
  assert '"a <<negatives>> {} <<requirements>>"' in text


def test_multi_turn_feedback_like_figure_1():
  cfg = SearchConfig(conversation="multi_turn", k_pos=3, k_neg=3)
  prop = LLMProposer(None, cfg)
  state = make_state(cfg)
  first = prop.build_messages(state)
  assert state.first_reference == pytest.approx(0.90)
  state.turns.append(Turn(messages=first, reply='- "a {} new one"',
                          records=[record("a {} new one", 0.95, 8, step=1)]))
  msgs = prop.build_messages(state)
  assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
  assert msgs[1]["content"] == '- "a {} new one"'
  assert msgs[2]["content"].startswith(
      "Great! The performance now improves to 95.00%.")
  state.turns.append(Turn(messages=msgs, reply='- "a {} worse"',
                          records=[record("a {} worse", 0.85, 9, step=2)]))
  msgs = prop.build_messages(state)
  assert [m["role"] for m in msgs] == ["user", "assistant", "user"] * 1 + [
      "assistant", "user"]
  assert msgs[-1]["content"].startswith(
      "Unfortunately, the performance of this prompt drops to 85.00%.")
  # "none" mode gives no numbers.
  cfg_none = SearchConfig(conversation="multi_turn", feedback="none")
  state.config = cfg_none
  text = LLMProposer(None, cfg_none).build_messages(state)[-1]["content"]
  assert "%" not in text


def test_llm_proposer_retries_until_a_valid_template():
  cfg = SearchConfig(max_failed_attempts=4, m_new=2)
  client = ScriptedClient([
      "I think these are good.",                       # no template
      '- "a {} with {0.__class__}"\n- "{name} of {}"',  # injections only
      LLMRetriesExhausted("down", last_fault="http_503"),
      '- "a {} alpha"\n- "a {} brand new"\n- "a {} second"\n- "a {} third"',
  ])
  state = make_state(cfg)
  logged = []
  state.log_transcript = logged.append
  out = asyncio.run(LLMProposer(client, cfg).propose(state))
  assert out.templates == ["a {} brand new", "a {} second"]
  assert out.failed_attempts == 3 and out.llm_calls == 3
  assert out.call_id == "id-r0-i0-a3"
  assert [c[2] for c in client.calls] == ["r0-i0-a0", "r0-i0-a1", "r0-i0-a2",
                                          "r0-i0-a3"]
  # Rejection feedback: each failed reply is answered with what was wrong.
  first = client.calls[0][0]
  a1, a2, a3 = (c[0] for c in client.calls[1:])
  assert a1[:len(first)] == first and len(a1) == len(first) + 2
  assert a1[-2] == {"role": "assistant", "content": "I think these are good."}
  assert "could not find any template" in a1[-1]["content"]
  assert a2[:len(a1)] == a1 and len(a2) == len(a1) + 2
  retry = a2[-1]["content"]
  assert '"a {} with {0.__class__}": has braces with something inside' in retry
  assert '"{name} of {}": has braces with something inside' in retry
  assert a3 == a2  # the failed call had no reply to answer
  assert out.messages == first  # the conversation history keeps the request
  assert out.requested == 3 * 2 and out.valid_candidates == 3
  assert out.llm_errors == 1 and out.latency_s == pytest.approx(1.5)
  kinds = sorted(r for _, r in out.rejections)
  assert any(r.startswith("format field") for r in kinds)
  assert any(r.startswith("duplicate") for r in kinds)
  assert any(r.startswith("more than m_new") for r in kinds)
  assert len(logged) == 4 and "error" in logged[2]


def test_without_rejection_feedback_the_same_request_is_resent():
  cfg = SearchConfig(max_failed_attempts=3, rejection_feedback=False)
  client = ScriptedClient(["nothing", "- no slot here", '- "a {} new one"'])
  out = asyncio.run(LLMProposer(client, cfg).propose(make_state(cfg)))
  assert out.templates == ["a {} new one"]
  assert all(c[0] == client.calls[0][0] for c in client.calls)


def test_m_ask_asks_for_more_and_json_replies_send_a_schema():
  cfg = SearchConfig(m_new=2, m_ask=3, reply_format="json")
  client = ScriptedClient(['{"templates": ["a {} one", "a {} two", '
                           '"a {} three"]}'])
  prop = LLMProposer(client, cfg)
  out = asyncio.run(prop.propose(make_state(cfg)))
  assert out.templates == ["a {} one", "a {} two"]  # never more than m_new
  assert out.valid_candidates == 3 and out.requested == 3
  text = client.calls[0][0][-1]["content"]
  assert "holding 3 new templates" in text and '{"templates"' in text
  schema = client.schemas[0]["properties"]["templates"]
  assert schema["minItems"] == schema["maxItems"] == 3
  import re
  pattern = re.compile(schema["items"]["pattern"])
  assert pattern.match("a photo of a {}.") and not pattern.match("a photo")
  assert not pattern.match('a "quoted" {}') and not pattern.match("a {} {x}")


def test_multi_turn_feedback_names_the_rejected_templates():
  cfg = SearchConfig(conversation="multi_turn", m_new=1, k_pos=2, k_neg=2)
  client = ScriptedClient(['- "a {} alpha"\n- "a {} fresh"', '- "a {} next"'])
  prop = LLMProposer(client, cfg)
  state = make_state(cfg)
  out = asyncio.run(prop.propose(state))
  assert out.templates == ["a {} fresh"]
  assert out.reply_rejections == [("a {} alpha",
                                   "duplicate of an evaluated template")]
  from lmbbo_jax.search.state import Turn
  rec = make_state(cfg).pool[0]
  state.turns.append(Turn(messages=out.messages, reply=out.raw_text,
                          records=[rec], rejections=out.reply_rejections))
  follow = prop.build_messages(state)[-1]["content"]
  assert ('could not be used:\n- "a {} alpha": already tried, write a new one'
          in follow)
  assert "%" in follow  # the score feedback follows


def test_llm_proposer_gives_up_after_max_failed_attempts():
  cfg = SearchConfig(max_failed_attempts=2)
  client = ScriptedClient(["nothing", "- no slot here"])
  out = asyncio.run(LLMProposer(client, cfg).propose(make_state(cfg)))
  assert out.templates == [] and out.failed_attempts == 2


@pytest.mark.parametrize("op", EDIT_OPS)
def test_each_edit_op_gives_valid_new_templates(op):
  cfg = SearchConfig(m_new=3, k_pos=4)
  prop = EditProposer(cfg, ops=[op])
  pool = [("a clear photo of a {} in the park", 0.5),
          ("an old picture of the {} on a table", 0.6),
          ("the {} seen from above at night", 0.4),
          ("a {} made of wood and glass", 0.3)]
  state = make_state(cfg, pool=pool)
  out = asyncio.run(prop.propose(state))
  assert len(out.templates) == 3
  for t in out.templates:
    assert tpl.invalid_reason(t) is None
    assert tpl.normalize(t) not in state.seen


def test_edit_proposer_is_deterministic_per_seed():
  cfg = SearchConfig(m_new=4)

  def run(seed):
    return asyncio.run(EditProposer(cfg).propose(make_state(cfg, seed=seed)))

  assert run(1).templates == run(1).templates
  assert run(1).templates != run(2).templates


def test_replay_proposer_replays_accepted_templates():
  cfg = SearchConfig()
  entries = [
      {"kind": "attempt", "chain": 0, "reset": 0, "iteration": 0,
       "attempt": 0, "accepted": [], "reply": "junk"},
      {"kind": "attempt", "chain": 0, "reset": 0, "iteration": 0,
       "attempt": 1, "accepted": ["a {} replayed"], "call_id": "abc"},
  ]
  prop = ReplayProposer(entries)
  state = make_state(cfg)
  out = asyncio.run(prop.propose(state))
  assert out.templates == ["a {} replayed"] and out.call_id == "abc"
  state.iteration = 5
  assert asyncio.run(prop.propose(state)).templates == []


def test_ape_asks_fresh_with_unranked_examples_and_no_scores():
  from lmbbo_jax.search.proposers import APEProposer
  cfg = SearchConfig(k_pos=3, k_neg=3, show_scores=True, conversation="multi_turn",
                     n_reset=1, n_iter=4)
  prop = APEProposer(None, cfg)
  state = make_state(cfg)
  state.pool.append(record("a {} new", 0.99, 8, step=1))  # Proposed later: never an example.
  msgs = prop.build_messages(state)
  assert len(msgs) == 1 and msgs[0]["role"] == "user"
  text = msgs[0]["content"]
  shown = [t for t, _ in POOL if f'"{t}"' in text]
  assert len(shown) == 3 and "a {} new" not in text
  assert "%" not in text and "don't work well" not in text  # No score, no negatives.
  # Seeded per iteration: the same state gives the same examples, another iteration others.
  assert prop.build_messages(state) == msgs
  state.turns = [Turn(messages=msgs, reply="- a {} x", records=[])]
  state.iteration = 1
  assert prop.build_messages(state)[0]["content"] != text
  assert len(prop.build_messages(state)) == 1  # Never a conversation.


def test_iterative_ape_resamples_the_top_templates_in_the_second_half():
  from lmbbo_jax.search.proposers import IterativeAPEProposer
  cfg = SearchConfig(k_pos=2, k_neg=2, n_reset=2, n_iter=3)
  prop = IterativeAPEProposer(None, cfg)
  state = make_state(cfg)
  halves = []
  for reset in range(2):
    for it in range(3):
      state.reset, state.iteration = reset, it
      halves.append(prop.resampling(state))
  assert halves == [False, False, False, True, True, True]
  state.reset, state.iteration = 1, 0
  text = prop.build_messages(state)[0]["content"]
  assert "Generate one variation" in text and "semantic meaning" in text
  assert '"a {} delta"' in text and '"a {} beta"' in text  # The top 2 by train accuracy.
  assert "epsilon" not in text and "%" not in text  # No negatives, no scores.


def test_ape_proposers_parse_and_validate_like_the_llm_proposer():
  from lmbbo_jax.search.proposers import APEProposer
  cfg = SearchConfig(m_new=2)
  client = ScriptedClient(["- a {} alpha\n- a clear {}\n- the {} here"])
  out = asyncio.run(APEProposer(client, cfg).propose(make_state(cfg)))
  assert out.templates == ["a clear {}", "the {} here"]  # The duplicate is rejected.
  assert out.llm_calls == 1 and client.calls[0][2] == "r0-i0-a0"
