"""Class-description methods (lmbbo_jax/descriptions.py, methods.descriptions_method): the
prompts, the reply reading, WaffleCLIP's construction, and cupl, dclip, waffle and
ours_pn+descriptions through the comparison in-process (a fake LLM; waffle with none)."""

import json
import re
import time

import pytest

from lmbbo_jax import descriptions as desc

from test_main import _command, _compare, jax_cache  # noqa: F401 (a fixture)


def test_replies_are_read_as_class_to_descriptions():
  names = ["dog", "Sea  lion", "cat"]
  reply = ('<think>{"dog": ["not this"]}</think>Sure!\n```json\n{"DOG": ["a dog  has\\nfur", 5, '
           '"' + "x" * 400 + '"], "sea lion": "whiskers", "zebra": ["q"]}\n```')
  assert desc.read_descriptions(reply, names) == {0: ["a dog has fur"], 1: ["whiskers"]}
  assert desc.read_descriptions('{"classes": {"cat": ["fur"]}}', names) == {2: ["fur"]}
  assert desc.read_descriptions("{'cat': ['python literal']}", names) == {2: ["python literal"]}
  # Bullets count for a request about one class only.
  assert desc.read_descriptions("- fur\n* four legs\nprose", ["dog"]) == {0: ["fur", "four legs"]}
  assert desc.read_descriptions("- fur", names) == {}
  for junk in ("", "{", "[1, 2]", None, 7, '{"dog": {"a": 1}}', "{" * 100_000):
    assert desc.read_descriptions(junk, names) == {}
  many = json.dumps({"dog": [f"d{i}" for i in range(500)]})
  assert len(desc.read_descriptions(many, names)[0]) == desc.MAX_PER_CLASS


def test_reading_stays_linear_on_hostile_replies():
  for unit in ("{\"a\": [", "- x\n", "[[[", "\"\\u", "<think>"):
    small, big = unit * 2_000, unit * 32_000
    started = time.perf_counter()
    desc.read_descriptions(small, ["a"])
    t_small = time.perf_counter() - started
    started = time.perf_counter()
    desc.read_descriptions(big, ["a"])
    assert time.perf_counter() - started < 16 * max(t_small, 1e-3) + 0.5, unit


@pytest.mark.parametrize("classes,questions,calls,at_least",
                         [(10, 5, 8, 0), (100, 1, 8, 0), (7, 5, 40, 0), (3, 5, 2, 0),
                          (100, 5, 12, 30), (1, 1, 1, 0)])
def test_batches_cover_every_class_within_the_call_budget(classes, questions, calls, at_least):
  plan = desc.batches(classes, questions, calls, at_least)
  assert 0 < len(plan) <= calls
  asked = sorted({q for q, _ in plan})
  assert asked == list(range(min(questions, calls)))
  for q in asked:
    assert sorted(c for p, cs in plan if p == q for c in cs) == list(range(classes))
  assert all(len(cs) >= min(at_least, classes) or cs[-1] == classes - 1 for _, cs in plan)


def test_prompts_fill_names_as_data():
  prompt = desc.cupl_prompt(desc.CUPL_QUESTIONS[1], ["apple", "brace {} {n} x"], 4)
  assert '"apple": How can you identify an apple?' in prompt
  assert '"brace {} {n} x": How can you identify a brace {} {n} x?' in prompt
  assert "4 different short sentences" in prompt
  prompt = desc.dclip_prompt(["{requests}"])
  assert prompt.startswith(desc.DCLIP_EXAMPLES)
  assert '"{requests}": Q: What are useful features for distinguishing a {requests} in a photo?' \
      in prompt


def test_dclip_and_waffle_sentences_follow_their_code():
  assert desc.dclip_sentence("sea_lion", "long tail") == "sea lion, which has long tail"
  assert desc.dclip_sentence("dog", "has four legs") == "dog, which has four legs"
  assert desc.dclip_sentence("dog", "a mammal") == "dog, which is a mammal"
  assert desc.dclip_sentence("dog", "used for herding") == "dog, which is used for herding"
  assert desc.waffle_sentence("dog", "abc") == "A photo of a dog, which is abc."
  assert desc.template_sentence("itap of my {}!", "dog", "fur") == "itap of my dog, which has fur!"


def test_waffle_descriptors_are_seeded_pairs_sized_by_the_class_names():
  names = ["golden retriever", "sea lion", "dog"]
  a = desc.waffle_descriptors(names, 15, seed=1)
  assert a == desc.waffle_descriptors(names, 15, seed=1) != desc.waffle_descriptors(names, 15, 2)
  assert len(a) == 30
  words, chars = a[0::2], a[1::2]
  # round(mean words per name) = 2 words, cut to round(mean word length) = 5 characters.
  assert all(len(w.split(" ")) == 2 and all(len(x) <= 5 for x in w.split(" ")) for w in words)
  # round(mean spaces) + 1 = 2 groups of ceil(mean longest word = 7) -> 8 / 2 = 4 characters.
  assert all(re.fullmatch(r"[a-z0-9]{4}, [a-z0-9]{4}", c) for c in chars), chars
  assert len(desc.waffle_words()) == 4330 and desc.waffle_words()[0] == ""


def test_the_artifact_is_class_name_to_sentences():
  out = desc.artifact(["crane", "dog", "crane"], [["a"], ["b", "c"], ["a", "d"]])
  assert out == {"crane": ["a", "d"], "dog": ["b", "c"]}
  assert desc.load_artifact(out, ["dog", "cat"]) == [["b", "c"], []]


def _describing_llm(body) -> str:
  """Descriptions for the description requests (one class left out: it falls back to its
  name), the fake's template edits for the search's."""
  import fake_llm_server as fake
  text = body["messages"][-1]["content"]
  if "maps each class name" not in text:
    return fake.default_reply(body, 2)
  names = [json.loads(m.group(1)) for m in re.finditer(r'^("(?:[^"\\]|\\.)*"): ', text, re.M)]
  return "Here you go:\n" + json.dumps({
      n: [f"a {n} with {w}" for w in ("fur", "a long tail")] for n in names[1:]})


@pytest.mark.slow
def test_every_description_method_runs_in_the_comparison(tmp_path, jax_cache, capsys,  # noqa: F811
                                                         monkeypatch):
  import fake_llm_server as fake
  workdir = tmp_path / "cmp"
  methods = ["cupl", "dclip", "waffle", "ours_pn", "ours_pn+descriptions"]
  monkeypatch.setenv("LMBBO_TEST_KEY", "k")
  with fake.FakeLLMServer(reply_fn=_describing_llm) as server:
    code, out, err = _compare(methods, workdir, server, jax_cache, capsys, "--seeds=1,2",
                              "--n_restart=1", "--n_reset=2", "--n_iter=1",
                              "--descriptions_waffle_count=3")
    asks = [r.body["messages"][-1]["content"] for r in server.requests]
  assert code == 0, err[-3000:]
  budget = 2 * 1 * 2 * 1  # seeds x n_restart x n_reset x n_iter
  per_method = {}
  for name in methods:
    results = json.loads((workdir / name / "results.json").read_text())
    per_method[name] = results
    assert sorted(results["per_seed"]) == ["1", "2"]
    for seed, ps in results["per_seed"].items():
      best = ps["best"]
      for key in ("train_acc", "test_acc", "test_acc5", "test_mean_per_class_recall"):
        assert best.get(key) is not None, (name, key)
  assert per_method["cupl"]["llm"]["calls"] == budget  # 2 questions of CuPL's 5 fit
  assert per_method["dclip"]["llm"]["calls"] == budget  # classes spread over the calls
  assert per_method["waffle"]["llm"]["calls"] == 0
  assert sum("Describe what" in a or "How can you identify" in a for a in asks) == budget
  assert sum("useful features for distinguishing" in a for a in asks) == budget
  # The fake leaves out the first class of each request: those fall back to their name.
  left_out = {m.group(1) for a in asks for m in [re.search(r'^"([^"]*)": ', a, re.M)] if m}
  for name in ("cupl", "dclip", "waffle", "ours_pn+descriptions"):
    for seed in ("1", "2"):
      counts = per_method[name]["per_seed"][seed]["counts"]["descriptions"]
      saved = json.loads((workdir / name / counts["artifact"]).read_text())
      assert isinstance(saved, dict) and saved
      assert all(isinstance(k, str) and v and all(isinstance(s, str) for s in v)
                 for k, v in saved.items())
      if name in ("cupl", "dclip"):
        assert counts["fallback_classes"] and set(counts["fallback_classes"]) <= left_out
        assert all(saved[c] == [c] for c in counts["fallback_classes"])
  dclip = json.loads((workdir / "dclip" / "seed_1" / "descriptors.json").read_text())
  second = next(c for c in dclip if c not in left_out)
  assert dclip[second] == [f"a {second} with fur", f"a {second} with a long tail"]
  both = json.loads((workdir / "ours_pn+descriptions" / "seed_1" / "descriptions.json").read_text())
  template = per_method["ours_pn"]["per_seed"]["1"]["best"]["template"]
  combined = per_method["ours_pn+descriptions"]["per_seed"]["1"]["counts"]["descriptions"]
  assert combined["template"] == template
  expected = [template.replace("{}", f"{second}, which is a {second} with {w}")
              for w in ("fur", "a long tail")]
  # The toy CLIP's text context is short: a sentence too long for it is left out, and a
  # class left with none falls back to the template with its name.
  assert both[second] in ([e for e in expected if e in both[second]] or None,
                          [template.replace("{}", second)])
  if both[second] != expected:
    assert combined["too_long"] > 0
  table = (workdir / "comparison.md").read_text()
  for label in ("CuPL", "DCLIP", "WaffleCLIP", "ours P+N template + DCLIP descriptors"):
    assert label in table, label


def test_waffle_runs_with_no_llm_at_all(tmp_path, jax_cache, capsys):  # noqa: F811
  workdir = tmp_path / "w"
  code, _, err = _command(["--flagfile=experiments/smoke.flags", f"--workdir={workdir}",
                           "--methods=waffle"], jax_cache, capsys)
  assert code == 0, err[-3000:]
  results = json.loads((workdir / "waffle" / "results.json").read_text())
  assert results["llm"]["calls"] == 0 and results["llm"]["model"] is None
  counts = results["per_seed"]["1"]["counts"]["descriptions"]
  assert counts["mode"] == "mean_logit" and len(counts["descriptors"]) == 30
  assert not (workdir / "waffle" / "llm_cache").exists()


def test_combining_needs_its_sources_earlier_in_the_methods(tmp_path, jax_cache, capsys):  # noqa: F811
  code, _, err = _command(["--flagfile=experiments/smoke.flags", f"--workdir={tmp_path}",
                           "--methods=dclip,ours_pn+descriptions,ours_pn"], jax_cache, capsys)
  assert code != 0 and "list ours_pn before it" in err and "Traceback" not in err
