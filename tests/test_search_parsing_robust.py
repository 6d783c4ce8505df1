"""The reply parser against hostile input: it never raises, accepts only valid templates, keeps its caps and its time bound."""

import asyncio
import json
import time

from hypothesis import given, settings, strategies as st
import orjson
import pytest

from lmbbo_jax import io as io_lib
from lmbbo_jax import templates as tpl
from lmbbo_jax.search import parsing
from lmbbo_jax.search import runlog

# Characters that break naive parsers: lone surrogates, controls, zero-width and
# bidi characters, full-width forms, quotes of every style, markup.
_SPECIAL = ["\ud800", "\udfff", "\x00", "\x1b", "\x7f", "\r", "\u2028", "\u200b", "\u200d",
            "\u202e", "\u2066", "\ufeff", "\u00ad", "ｆ", "｛｝", "１．", "\u3000", "“", "”",
            "‘", "’", "«", "»", "「", "」", "„", "`", "'", '"', "{}", "{", "}", "[", "]",
            "(", ")", "<", ">", "|", "*", "**", "_", "#", "- ", "1. ", "i. ", "a) ", "①",
            "1\ufe0f\u20e3", "✅", "- [ ] ", ": ", " - ", "; ", "\n", "\t", "&amp;", "&#", "<b>",
            "</li>", "<think>", "</think>", "[THINK]", "◁think▷", "<|channel|>",
            "<|message|>", "<|end|>", "final", "Template 1:", "Why:", "(score: 0.9)", "85%",
            "e\u0301", "Here are", "a photo of a {}", "{class}", "[CLASS]", "<class>", "'a {}'"]
_TEXT = st.lists(st.one_of(st.characters(), st.sampled_from(_SPECIAL),
                           st.text(max_size=20)), max_size=120).map("".join)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(st.characters(), max_size=30) | st.sampled_from(_SPECIAL),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(
        st.sampled_from(["templates", "prompts", "template", "why", "reasoning",
                         "candidates", "text", "x"]) | st.text(max_size=8),
        children, max_size=5),
    max_leaves=40)
# Generous: the goal is 10 ms for 4 KB (checked by the fuzzer); this catches a
# blow-up, not a slow machine.
_SECONDS_PER_REPLY = 1.0


def _check_reply(reply: str) -> None:
  start = time.perf_counter()
  reading = parsing.read_reply(reply)
  result = parsing.validate(reading.candidates, seen=set())
  elapsed = time.perf_counter() - start
  assert elapsed < _SECONDS_PER_REPLY, (elapsed, reply[:200])
  for text, reason in reading.rejections + result.rejections:
    assert not reason.startswith(parsing.INTERNAL_ERROR), (reason, reply[:200])
    orjson.dumps([text, reason])  # the run log and the model can take every rejection
  for t in result.valid:
    assert tpl.invalid_reason(t) is None
    assert t == tpl.canonical(t) and "\n" not in t
    orjson.dumps(t)


@settings(max_examples=200, deadline=None)
@given(_TEXT)
def test_arbitrary_text_never_breaks_the_parser(reply):
  _check_reply(reply)


@settings(max_examples=200, deadline=None)
@given(_JSON, st.sampled_from(["", "Here you go:\n", "```json\n"]), st.booleans())
def test_arbitrary_json_never_breaks_the_parser(value, head, ascii_only):
  _check_reply(head + json.dumps(value, ensure_ascii=ascii_only))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(_SPECIAL), st.integers(1, 2000), st.sampled_from(["", "- ", "1. ", '"']))
def test_long_runs_of_one_unit_stay_fast(unit, times, head):
  _check_reply(head + unit * times)


def test_caps_are_rejections_with_reasons():
  huge = "- a photo of a {}\n" * (parsing.MAX_REPLY_CHARS // 10)
  reading = parsing.read_reply(huge)
  assert reading.candidates == []
  assert "longer than" in reading.rejections[0][1]
  long_line = "- a " + "very " * parsing.MAX_LINE_CHARS + "long {}\n- a short {}"
  reading = parsing.read_reply(long_line)
  assert reading.candidates == ["a short {}"]
  assert f"line longer than {parsing.MAX_LINE_CHARS}" in reading.rejections[0][1]
  many = "- a photo of a {}\n" + "some prose\n" * parsing.MAX_LINES + "- a late {}"
  reading = parsing.read_reply(many)
  assert reading.candidates == ["a photo of a {}"]
  assert f"more than {parsing.MAX_LINES} lines" in reading.rejections[-1][1]
  many = "".join(f"- a photo number {i} of a {{}}\n" for i in range(parsing.MAX_CANDIDATES + 5))
  reading = parsing.read_reply(many)
  assert len(reading.candidates) == parsing.MAX_CANDIDATES
  assert f"more than {parsing.MAX_CANDIDATES} candidates" in reading.rejections[-1][1]
  assert parsing.read_reply(None).rejections == [("NoneType", "the reply is not text")]


def test_a_template_that_is_not_utf8_is_rejected_not_crashed(tmp_path):
  reading = parsing.read_reply('{"templates": ["a photo of a {} \\ud800", "a sketch of a {}"]}')
  result = parsing.validate(reading.candidates, seen=set())
  assert result.valid == ["a sketch of a {}"]
  (text, reason), = result.rejections
  assert reason.startswith("not writable as UTF-8") and "\ud800" not in text
  # the run log writes what still holds one, repaired, and goes on
  with runlog.RunLog(tmp_path, fsync=False) as log:
    log.append_transcript({"chain": 0, "reset": 0, "iteration": 0, "attempt": 0,
                           "reply": "a photo of a {} \ud800", "accepted": []})
    log.append_eval({"chain": 0, "seq": 0, "template": "x {} \udfff", "accuracy": 0.5})
  rows = io_lib.read_jsonl(tmp_path / runlog.TRANSCRIPT)
  assert rows[0]["reply"] == "a photo of a {} ?"
  assert io_lib.read_jsonl(tmp_path / runlog.PROMPTS)[0]["template"] == "x {} ?"


def test_invisible_and_unnormalised_copies_are_duplicates():
  seen = {tpl.normalize("a café photo of a {}")}
  reading = parsing.read_reply("- a cafe\u0301 photo of a {}\n- a caf\u00e9\u200b photo\u00ad of a {}\n"
                               "- \u202ea new photo of a {}")
  result = parsing.validate(reading.candidates, seen=seen)
  assert result.valid == ["a new photo of a {}"]
  assert [parsing.reason_kind(r) for _, r in result.rejections] == ["duplicate", "duplicate"]


def test_prose_with_the_slot_never_takes_the_single_new_place():
  reply = ("Here are three templates, each with {} where the class name goes:\n"
           "1. a photo of a {} in the rain\n2. a photo of a {} in the snow\n"
           "These keep {} once, as asked.")
  result = parsing.validate(parsing.read_reply(reply).candidates, seen=set(), max_new=1)
  assert result.valid == ["a photo of a {} in the rain"]
  assert result.rejections == [("a photo of a {} in the snow",
                                "more than m_new templates in the reply")]


@pytest.mark.parametrize("reply", [
    "[__import__('os').system('touch /tmp/lmbbo_pwned')]",
    "{'templates': [open('/etc/passwd').read()]}",
    "['a {}' + 'b']",
])
def test_python_literals_are_scanned_never_evaluated(reply):
  assert parsing.read_reply(reply).candidates in ([], ["a {}"])


def test_a_bracketed_aside_neither_empties_nor_replaces_the_reply():
  for aside in ("[]", '["photo", "picture"]', "{}", "{'a': 1}"):
    reply = f"I changed the wording {aside} this time.\n- a drawing of a {{}}\n- a doodle of a {{}}"
    assert parsing.extract_candidates(reply) == ["a drawing of a {}", "a doodle of a {}"]


def test_a_long_reply_is_read_off_the_event_loop():
  templates = "".join(f"- a photo number {i} of a {{}} (score: 0.{i % 10})\n" for i in range(150))
  reply = "<think>" + "Let me think about {} templates. " * 25_000 + "</think>\n" + templates
  assert parsing.INLINE_PARSE_CHARS < len(reply) <= parsing.MAX_REPLY_CHARS

  async def main():
    ticks = 0

    async def ticker():
      nonlocal ticks
      while True:
        await asyncio.sleep(0)
        ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    reading = await parsing.read_reply_off_loop(reply)
    during = ticks - before
    task.cancel()
    return reading, during

  reading, during = asyncio.run(main())
  assert reading.candidates == parsing.read_reply(reply).candidates
  assert len(reading.candidates) == 150 and not reading.rejections
  assert during > 0  # the loop kept running while the reply was read


# Replies that held the old parser (regular expressions backtracking over runs
# of spaces, braces and brackets): 3 s, 81 s and 22 s on this machine.
_OLD_STALLS = [
    "1. " + "</think>" * 5 + "\ufeff\ufeff: " + "}" * 53 + " " * 117 + "\udfff" * 145,
    '1. **A pixel art image of a {}**: captures the blocky look\n2. 一幅{}的素描。 "a photo of'
    ' a {}." | a rendering of a {}; a doodle of a {}\n1. 一张[<|channel|><|channel|><a'
    + " " * 200 + "的照片。\n2. 一幅{}的素描。",
    "}" * 144 + "\u3000" * 160 + "[acc=" * 10 + "[",
]


@pytest.mark.parametrize("reply", _OLD_STALLS)
def test_replies_that_stalled_the_old_parser(reply):
  _check_reply(reply)
