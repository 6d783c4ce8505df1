"""The Python API: the README's example runs as written, and each entry point's contract."""

import asyncio
import pathlib
import re

import numpy as np
import pytest

import lmbbo_jax as lb

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
  text = README.read_text(encoding="utf-8")
  section = text[text.index("## Python API"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_runs_and_returns_typed_results(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  scope: dict = {}
  exec(compile(readme_example(), "README.md", "exec"), scope)  # noqa: S102 (our own README)
  assert isinstance(scope["task"], lb.FewShotTask) and isinstance(scope["photo"], lb.Score)
  assert isinstance(scope["found"], lb.SearchResult)
  assert isinstance(scope["result"], lb.ExperimentResult)
  assert isinstance(scope["result"].best, lb.Entry)
  # The search kept only the function's valid, new templates, and chose by train accuracy.
  found = scope["found"]
  proposed = [r for r in found.records if r.step > 0]
  assert proposed and all(r.template.endswith(("in the picture", "in the picture.")) or
                          "{} in the picture" in r.template for r in proposed)
  assert found.best.accuracy["train"] == max(r.accuracy["train"] for r in found.records if r.ok)
  assert (tmp_path / "runs" / "api_run" / "results.json").exists()
  assert scope["result"].baselines["photo"].template == "a photo of a {}."
  assert set(scope["own"].class_names) == {"cat", "dog"}
  assert found.best.template in capsys.readouterr().out


def test_everything_in_all_is_importable_and_documented():
  for name in lb.__all__:
    obj = getattr(lb, name)
    assert obj is not None
    if callable(obj) and not isinstance(obj, type):
      assert obj.__doc__, f"lmbbo_jax.{name} has no docstring"


def test_arrays_with_the_same_shape_but_other_pixels_are_other_items():
  a = np.zeros((2, 8, 8, 3), np.uint8)
  b = np.ones((2, 8, 8, 3), np.uint8)
  ta = lb.task_from_arrays(["x", "y"], train=(a, [0, 1]))
  tb = lb.task_from_arrays(["x", "y"], train=(b, [0, 1]))
  assert ta.fingerprint("train") != tb.fingerprint("train")  # the feature cache's key
  assert (ta.load_image(ta.train[0]) == 0).all() and (tb.load_image(tb.train[0]) == 1).all()
  with pytest.raises(lb.DatasetError, match="images"):
    lb.task_from_arrays(["x"], train=(np.zeros((2, 8, 8)), [0, 0]))


def test_a_search_through_an_openai_compatible_endpoint_and_an_async_function(
    tmp_path, monkeypatch):
  import fake_llm_server as fake
  from search_helpers import WordScorer
  monkeypatch.setenv("LMBBO_API_TEST_KEY", "k")
  config = lb.SearchConfig(n_iter=2, init_pool_size=4)
  with fake.FakeLLMServer(n_templates=1) as server:
    llm = lb.LLMConfig(base_url=server.base_url, model="gpt-4o-mini",
                       api_key_env="LMBBO_API_TEST_KEY")
    result = lb.search_sync(WordScorer(), "llm", workdir=str(tmp_path / "llm"), config=config,
                            llm=llm)
  assert result.counts["llm_calls"] == 2 and len(server.requests) == 2
  assert result.llm["calls"] == 2

  async def propose(ranked, state):
    await asyncio.sleep(0)
    return [f"{ranked[0].template} {state.iteration}", 42]  # a non-string is rejected

  result = lb.search_sync(WordScorer(), propose, workdir=str(tmp_path / "fn"), config=config)
  new = [r for r in result.records if r.step > 0 and r.ok]
  assert len(new) == 2
  with pytest.raises(lb.ExperimentError, match="base_url"):
    lb.search_sync(WordScorer(), "llm", workdir=str(tmp_path / "x"), config=config)
