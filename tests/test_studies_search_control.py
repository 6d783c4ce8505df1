"""The search-vs-control experiment: generic initial pools, domain words for the proposer."""

import pytest

import math

from lmbbo_jax.studies import search_control
from lmbbo_jax.templates import PHOTO
from lmbbo_jax.toyworld import captions

# Words that name a rendering style other than photo.
STYLE_WORDS = {w for group in (captions.STYLE_PREFIXES, captions.STYLE_TAGS)
               for style, options in group.items() if style != "photo"
               for phrase in options for w in phrase.split()
               } - {"a", "an", "of", "image", "photo"}


def test_initial_pools_name_no_style_but_the_vocabulary_does():
  vocab = captions.vocabulary()
  assert set(search_control.POOLS) == {"photo", "style_free"}
  for name, pool in search_control.POOLS.items():
    assert len(pool) >= 12 and len(set(pool)) == len(pool), name  # 12 drawn per chain.
    assert pool[0] == PHOTO
    for t in pool:
      words = set(t.replace("{}", " ").replace(".", " ").split())
      assert words <= vocab, t
      assert not words & STYLE_WORDS, t
  assert all("photo" in t for t in search_control.PHOTO_POOL)
  words = set(search_control.proposer_vocabulary())
  assert {"sketch", "drawing", "pixelated", "blurry", "grainy"} <= words
  assert words <= vocab
  assert search_control.STYLE_FREE_POOL[0] == PHOTO


def test_one_search_reports_pool_and_search_picks_on_the_toy_model():
  from lmbbo_jax.models import load_clip
  from lmbbo_jax.toyworld.tasks import build_toy_task

  clip = load_clip("toyclip")
  task = build_toy_task("sketch_dark", 1, 1)
  out = search_control.run_one(
      clip, task, corpus=list(search_control.STYLE_FREE_POOL),
      vocabulary=search_control.proposer_vocabulary(), n_restart=1, n_iter=2, m_new=2,
      init_pool_size=4, seed=1)
  assert out["pool_template"] in search_control.STYLE_FREE_POOL
  assert out["evaluated"] >= 4
  assert out["search_train"] >= out["pool_train"]  # Selection is by train accuracy.
  assert abs(out["gain"] - (out["search_test"] - out["pool_test"])) < 1e-9
  assert "sketch_dark" in search_control.markdown(
      search_control.summarize([dict(out, task="sketch_dark", seed=1, model="trained")]),
      [dict(out, task="sketch_dark", seed=1, model="trained")])


def test_summary_separates_the_trained_model_from_the_control():
  def row(task, seed, model, pool, search):
    return {"task": task, "seed": seed, "model": model, "pool_test": pool,
            "search_test": search, "gain": search - pool, "pool_template": "p {}",
            "search_template": "s {}"}
  rows = [row("a", 1, "trained", 0.50, 0.60), row("a", 2, "trained", 0.50, 0.70),
          row("a", 1, "control", 0.10, 0.10), row("a", 2, "control", 0.10, 0.12),
          row("b", 1, "trained", 0.40, 0.40), row("b", 1, "control", 0.10, 0.20)]
  a, b = search_control.summarize(rows)
  assert a["task"] == "a" and b["task"] == "b"
  assert a["trained_gain"] == pytest.approx(0.15) and a["control_gain"] == pytest.approx(0.01)
  assert a["trained_gain_se"] == pytest.approx(0.05)  # stdev 0.0707 / sqrt(2)
  assert a["trained_search_test"] == pytest.approx(0.65)
  assert a["gain_beats_control"] and not b["gain_beats_control"]
  assert math.isnan(b["trained_gain_se"])  # One seed: no standard error.
  md = search_control.markdown([a, b], rows)
  assert "+15.0 (5.0)" in md and "+1.0 (1.0)" in md
