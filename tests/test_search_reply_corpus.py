"""The reply parser on a corpus of real and styled LLM replies.

`tests/reply_corpus/*.jsonl` rows hold a reply, the request that produced it
where it was recorded (`smollm2*.jsonl`, `gemma*.jsonl`: the local models of
the demo, recorded by `python -m lmbbo_jax.main` runs), and the templates a
person reads in it (`expected`). Every expected template must be recovered,
nothing else, and no template may carry explanation text.
"""

import json
import pathlib
import re

import pytest

from lmbbo_jax import templates as tpl
from lmbbo_jax.search import parsing

CORPUS = pathlib.Path(__file__).parent / "reply_corpus"
ROWS = [(path.name, i, json.loads(line))
        for path in sorted(CORPUS.glob("*.jsonl"))
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())
        if line.strip()]
# Traces of explanations, markdown or annotations that must never reach a template.
_LEAKS = re.compile(r"\*\*|<\/?think|\(\s*(accuracy|score)|\baccuracy\s*[:=]?\s*\d|"
                    r"\d+(\.\d+)?\s*%|^\s*[-*•]\s|:\s*$|\bthis template\b|"
                    r"\bemphasi[sz]es\b", re.I)


def scorable(reply: str) -> list[str]:
  return [c for c in parsing.extract_candidates(reply) if tpl.invalid_reason(c) is None]


def test_the_corpus_is_large_and_recorded_with_its_requests():
  recorded = [r for _, _, r in ROWS if "request" in r]
  assert len(recorded) >= 200
  assert all(r["request"] and r["request"][-1]["role"] == "user" for r in recorded)
  styles = {r.get("style") for _, _, r in ROWS}
  assert {"gpt-4o-mini", "qwen", "deepseek", "json"} <= styles


@pytest.mark.parametrize("name,index,row", ROWS,
                         ids=[f"{n}:{i}" for n, i, _ in ROWS])
def test_every_expected_template_and_nothing_else(name, index, row):
  got = scorable(row["reply"])
  assert got == row["expected"]
  for t in got:
    assert not _LEAKS.search(t), f"explanation text in {t!r}"
    assert "\n" not in t and len(t.split()) <= 30
