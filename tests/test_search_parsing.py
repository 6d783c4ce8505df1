"""Reply parsing/validation, meta-prompt rendering and initial pools."""

import random

import pytest

from lmbbo_jax import templates as tpl
from lmbbo_jax.search import meta_prompts as mp
from lmbbo_jax.search import parsing
from lmbbo_jax.search import pool


@pytest.mark.parametrize("reply,expected", [
    ('- "a photo of a {}."', ["a photo of a {}."]),
    ("1. a photo of a {}.\n2) a clear picture of the {}", [
        "a photo of a {}.", "a clear picture of the {}"]),
    ("* a {} on a table\n• a {} in a field", ["a {} on a table",
                                              "a {} in a field"]),
    ("```\n- a bright photo of a {}\n```", ["a bright photo of a {}"]),
    ('Sure! Here is one:\n\n“A high-quality photo of a {}.”\nGood luck!',
     ["A high-quality photo of a {}."]),
    ('1. "An image of {} in nature" - this emphasises the setting',
     ["An image of {} in nature"]),
    ("Template 2: 'a sharp photo of the {}'", ["a sharp photo of the {}"]),
    ("(3) `a {} close-up`", ["a {} close-up"]),
    ("Here are some templates:\nI hope they help.", []),
    ("- Templates:\n- a {}.", ["a {}."]),
])
def test_extract_candidates(reply, expected):
  assert parsing.extract_candidates(reply) == expected


def test_bulleted_template_without_slot_is_reported():
  cands = parsing.extract_candidates("- a photo of a dog\n- a photo of a {}")
  v = parsing.validate(cands, seen=set())
  assert v.valid == ["a photo of a {}"]
  assert v.rejections == [("a photo of a dog", "no {} slot for the class name")]


def test_validate_rejects_fields_duplicates_length_and_extras():
  cands = ["A {} with {0.__class__}", "{name} photo of {}", "a {}}",
           "A Photo of  a {}.", "a photo of a {}.", "a new {}",
           "x" * 400 + " {}", "too long {}", "a third {}"]
  v = parsing.validate(cands, seen={"a photo of a {}."},
                       context_check=lambda t: ("context" if "too long" in t
                                                else None),
                       max_new=2)
  assert v.valid == ["a new {}", "a third {}"]
  reasons = dict(v.rejections)
  assert parsing.reason_kind(reasons["A {} with {0.__class__}"]) == "format_field"
  assert parsing.reason_kind(reasons["{name} photo of {}"]) == "format_field"
  assert parsing.reason_kind(reasons["a {}}"]) == "unbalanced_brace"
  assert parsing.reason_kind(reasons["A Photo of  a {}."]) == "duplicate"
  assert parsing.reason_kind(reasons["x" * 400 + " {}"]) == "too_long"
  assert reasons["too long {}"] == "context"
  # Duplicates inside one reply count too.
  v = parsing.validate(["a {} here", "A {}  HERE"], seen=set())
  assert v.valid == ["a {} here"] and len(v.rejections) == 1


def test_multi_slot_templates_are_accepted():
  v = parsing.validate(["a top-down view of {} arranged in a pattern {}"],
                       seen=set())
  assert len(v.valid) == 1
  assert tpl.fill(v.valid[0], "forest").count("forest") == 2


def test_render_is_single_pass_and_never_formats():
  text = mp.render("A: <<a>> B: <<b>>",
                   {"a": "<<b>> {0.__class__} {name} {}", "b": "x"})
  assert text == "A: <<b>> {0.__class__} {name} {} B: x"
  with pytest.raises(mp.MetaPromptError):
    mp.render("<<missing>>", {})


def test_meta_prompt_data_has_every_feedback_mode():
  for mode in ("pos_neg", "pos", "neg", "none"):
    assert mode in mp.DEFAULT_META_PROMPTS.first_turn
  assert "improves to <<score>>" in mp.DEFAULT_META_PROMPTS.feedback_improved
  assert "drops to <<score>>" in mp.DEFAULT_META_PROMPTS.feedback_dropped
  assert mp.percent(0.8669) == "86.69%"


def test_builtin_corpus_is_valid_and_unique():
  corpus = pool.builtin_corpus()
  assert len(corpus) >= 100
  assert all(tpl.invalid_reason(t) is None for t in corpus)
  assert len({tpl.normalize(t) for t in corpus}) == len(corpus)


def test_captions_become_templates(tmp_path):
  lines = ["A brown dog sleeping on a sofa", "two cats and a dog",
           "a golden retriever in the park", "nothing to see here",
           "a {weird} dog caption", "A Dog running", "a brown dog sleeping on "
           "a sofa"]
  out = pool.templates_from_captions(
      lines, class_words=["dog", "cat", "golden retriever", "retriever"])
  assert out == ["A brown {} sleeping on a sofa", "two cats and a {}",
                 "a {} in the park", "A {} running"]
  f = tmp_path / "captions.txt"
  f.write_text("\n".join(lines))
  assert pool.load_caption_file(f, ["dog"], max_templates=2) == [
      "A brown {} sleeping on a sofa", "two cats and a {}"]
  with pytest.raises(pool.PoolError):
    pool.load_caption_file(f, ["zebra"])
  with pytest.raises(pool.PoolError):
    pool.load_template_file(tmp_path / "missing.txt")


def test_sample_initial_pool_is_seeded():
  corpus = pool.builtin_corpus()
  a = pool.sample_initial_pool(corpus, 20, random.Random(3))
  b = pool.sample_initial_pool(corpus, 20, random.Random(3))
  c = pool.sample_initial_pool(corpus, 20, random.Random(4))
  assert a == b and a != c and len(set(a)) == 20
  assert len(pool.sample_initial_pool(corpus[:5], 80, random.Random(0))) == 5


def test_a_candidate_that_copies_the_instructions_is_rejected():
  messages = [{"role": "user", "content": (
      'Templates that work well:\n- "a photo of a {}."\n\nRequirements:\n- Each '
      "template must contain {} where the class name goes and no other curly "
      "braces.")}]
  text = parsing.instruction_text(messages, ["a photo of a {}."])
  assert "a photo of a {}." not in text
  v = parsing.validate(["Each template must contain {} where the class name goes",
                        "a sketch of a {}.", "a {}"], seen=set(), instructions=text)
  assert v.valid == ["a sketch of a {}.", "a {}"]  # short ones are not echoes
  assert parsing.reason_kind(v.rejections[0][1]) == "echo"


@pytest.mark.parametrize("text,expected", [
    ("a photo of a {class}.", "a photo of a {}."),
    ("a [CLASS] at night", "a {} at night"),
    ("a <class> from above", "a {} from above"),
    ("a {{}} on a table", "a {} on a table"),
    ("a { } in a field", "a {} in a field"),
    ("the {Object}, close up", "the {}, close up"),
    ("a {name} and a {0}", "a {name} and a {0}"),  # ambiguous: left for validate
])
def test_placeholder_variants_become_slots(text, expected):
  assert parsing.normalize_placeholders(text) == expected


@pytest.mark.parametrize("reply,expected", [
    ('- "Photo" of a {} in the wild', ['"Photo" of a {} in the wild']),
    ('- "A template with no slot" : no {} where the class name goes',
     ["A template with no slot"]),
    ("- a \x000\x00 {} here", ["a 0 {} here"]),
])
def test_quoted_heads_and_control_bytes(reply, expected):
  assert parsing.extract_candidates(reply) == expected
