"""The reply parser on a corpus of real and styled LLM replies.

`tests/reply_corpus/*.jsonl` rows hold a reply, the request that produced it
where it was recorded (`smollm2*.jsonl`, `gemma*.jsonl`: the local models of
the demo, recorded by `python -m lmbbo_jax.main` runs), and the templates a
person reads in it (`expected`). Every expected template must be recovered,
nothing else, and no template may carry explanation text, markup, text
addressed to the reader or invisible characters.
"""

import json
import pathlib
import re
import unicodedata

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
# Markup of any kind: HTML tags and entities, table pipes, list numbering, check
# boxes, bullets, special tokens of chat formats and reasoning blocks.
_MARKUP = re.compile(r"</?[a-z][a-z0-9]*>|&[a-z]+;|&#\d+;|\||^\s*(\(?\d+[.)]|\(?[ivx]+[.)]\s"
                     r"|[a-h][.)]\s|#\d|step \d|\[[ x]\])|<\||\|>|\[/?think\]|◁|▷"
                     r"|^[①-⑳✅🔹👉✨・]|\ufe0f|\u20e3|^\s*`|`\s*$", re.I)
# Text addressed to the reader: lead-ins, notes, rationales, closing remarks.
_READER = re.compile(r"\b(here are|here is|template|templates|let me|i hope|note:|why:|"
                     r"because|explanation|rationale|modèles|vorlagen|plantillas)\b|模板|"
                     r"テンプレート|템플릿", re.I)
# Invisible characters that make a copy look new.
_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")


def scorable(reply: str) -> list[str]:
  return [c for c in parsing.extract_candidates(reply) if tpl.invalid_reason(c) is None]


def test_the_corpus_is_large_and_recorded_with_its_requests():
  recorded = [r for _, _, r in ROWS if "request" in r]
  assert len(recorded) >= 200
  assert all(r["request"] and r["request"][-1]["role"] == "user" for r in recorded)
  styles = {r.get("style") for _, _, r in ROWS}
  assert {"gpt-4o-mini", "qwen", "deepseek", "json"} <= styles
  # one row each for many more styles: markup, reasoning formats, structured replies, languages
  assert len(styles) >= 80


@pytest.mark.parametrize("name,index,row", ROWS,
                         ids=[f"{n}:{i}" for n, i, _ in ROWS])
def test_every_expected_template_and_nothing_else(name, index, row):
  got = scorable(row["reply"])
  assert got == row["expected"]
  for t in got:
    assert not _LEAKS.search(t), f"explanation text in {t!r}"
    assert "\n" not in t and len(t.split()) <= 30
    if name == "styles.jsonl":  # the recorded small models' replies are junk of their own
      assert not _MARKUP.search(t), f"markup in {t!r}"
      assert not _READER.search(t), f"reader-addressed text in {t!r}"
    assert not _INVISIBLE.search(t) and t == unicodedata.normalize("NFC", t)
