"""`python -m lmbbo_jax.bench`: the cold mode's figures and its one-line errors.

Speed itself is measured by running the bench, never asserted here; these tests
check that the cold mode counts what it says (compiles, first template, stream).
"""

import json
import os
import pathlib
import subprocess
import sys
import types

from lmbbo_jax.bench import llm_like_stream, work_bound

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _bench(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", "lmbbo_jax.bench", "--json", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def test_the_generated_stream_is_seeded_distinct_and_mixed():
  a, b = llm_like_stream(60, seed=3), llm_like_stream(60, seed=3)
  assert a == b and len(set(a)) == 60 and all(t.count("{}") == 1 for t in a)
  words = [len(t.split()) for t in a]
  assert min(words) <= 6 and max(words) >= 14  # short and long, as LLMs write them
  assert llm_like_stream(60, seed=4) != a


class _WordClip:
  """`token_ids` of a CLIP with one token per word (0: start, 1: end); `causal=False`: as a
  SigLIP of text length 8."""

  def __init__(self, causal: bool = True):
    self.vocab = {}
    self.config = types.SimpleNamespace(text_causal=causal)
    self.context_length = 8

  def token_ids(self, texts):
    return [[0, *(self.vocab.setdefault(w, len(self.vocab) + 2) for w in t.split()), 1]
            for t in texts]


def test_work_bound_counts_the_peers_tokens_and_the_distinct_prefixes():
  templates, names = ["a {} x", "a {} y"], ["cat", "big dog"]
  # Sentences of 5 and 6 tokens; in one chunk both are trimmed to 6: 12 per template.
  work = work_bound(_WordClip(), templates, names)
  assert work["tokens_peer_per_template"] == 12.0
  # <s>, <s> a, then "cat x </s>" (3) and "big dog x </s>" (4), and for the second
  # template only what follows the class: "y </s>" twice: 2 + 3 + 4 + 4 = 13.
  assert work["tokens_distinct_per_template"] == 6.5
  assert work["token_ratio_peer_over_distinct"] == round(24 / 13, 3)
  # Chunks of one sentence: each is trimmed to its own length, 5 + 6 per template.
  assert work_bound(_WordClip(), templates, names, chunk=1)["tokens_peer_per_template"] == 11.0
  # A bidirectional tower reads every sentence as a full row: 2 x 8 per template, and the
  # two templates' sentences all differ.
  work = work_bound(_WordClip(causal=False), templates, names)
  assert work["tokens_peer_per_template"] == work["tokens_distinct_per_template"] == 16.0
  assert work_bound(_WordClip(causal=False), ["a {} x", "a {} x"], names)[
      "tokens_distinct_per_template"] == 8.0  # the same sentences twice: counted once


def test_cold_mode_counts_compiles_and_the_first_template(tmp_path):
  stream = tmp_path / "stream.txt"
  templates = llm_like_stream(10, seed=0)
  stream.write_text("a header line without a slot\n" + "\n".join(templates) + "\n")
  proc = _bench("--mode=cold", "--arch=tiny-vit", "--classes=10", "--stream_batch=3",
                f"--stream_file={stream}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  rec = json.loads(proc.stdout.strip().splitlines()[-1])
  assert rec["mode"] == "cold" and rec["templates"] == 10 and rec["templates_scored"] == 10
  assert rec["cache_files_before"] == 0  # a new, empty compilation cache
  # A fixed program set: each call shape's text and partials programs, nothing per template.
  assert 1 <= rec["compiles"] <= 2 * len(rec["call_shapes"])
  assert 0 < rec["first_template_s"] <= rec["stream_s"]
  assert rec["templates_per_s_incl_compile"] < rec["templates_per_s_steady"]
  assert 0 <= rec["compile_share"] <= 1
  # Exact prefix sharing runs no fewer tokens than the distinct prefixes, the peer no fewer.
  assert rec["tokens_distinct_per_template"] <= rec["tokens_per_template"]
  assert rec["tokens_distinct_per_template"] <= rec["tokens_peer_per_template"]
  assert abs(rec["token_ratio_peer_over_executed"] - rec["tokens_peer_per_template"]
             / rec["tokens_per_template"]) < 0.01


def test_bench_errors_are_one_line(tmp_path):
  empty = tmp_path / "none.txt"
  empty.write_text("no slot here\n")
  proc = _bench("--mode=cold", "--arch=tiny-vit", "--classes=4", f"--stream_file={empty}")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error:")
  assert "no line holds a {} slot" in proc.stderr
  proc = _bench("--mode=cold", "--what=images")
  assert proc.returncode == 2 and "--mode=cold measures the scorer" in proc.stderr
