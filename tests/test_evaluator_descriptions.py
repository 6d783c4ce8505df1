"""Class-level prompts (`PromptScorer.score_descriptions`): per-class sentence sets scored
as CuPL (mean of normalised embeddings) and DCLIP (mean logit) do, against the plain encode
of every sentence in numpy, on CLIP (packed, shared prefixes) and SigLIP (plain rows), in
the task's bounded program set."""

import numpy as np
import pytest

from lmbbo_jax.evaluator.scorer import PromptScorer, ScorerError

from evaluator_helpers import (CLASS_NAMES, make_clip, random_images, reference_score,
                               tiny_siglip)

FEATURES = ["four legs", "a long tail", "whiskers", "black and white stripes", "wings"]


def descriptions(seed: int, names=CLASS_NAMES, per_class: int = 4) -> list[list[str]]:
  """DCLIP-form sentences (sharing "a photo of a {c}, which has") mixed with free-form ones
  and one sentence shared by two classes."""
  rng = np.random.default_rng(seed)
  out = []
  for c, name in enumerate(names):
    k = 1 + (c + seed) % per_class
    sentences = [f"a photo of a {name}, which has {FEATURES[i]}."
                 for i in rng.choice(len(FEATURES), size=k, replace=False)]
    if c % 3 == 0:
      sentences.append(f"The {name} is often seen outdoors in daylight.")
    out.append(sentences)
  out[1].append(out[0][0])  # a sentence in two classes
  return out


def plain(clip, sentences) -> np.ndarray:
  """Normalised features through `CLIP.encode_text` of each sentence alone (float64)."""
  feats = np.asarray(clip.encode_text(clip.tokenize(sentences)), np.float64)
  return feats / np.linalg.norm(feats, axis=-1, keepdims=True)


def expected_weights(clip, per_class, mode) -> np.ndarray:
  w = np.stack([plain(clip, sentences).mean(axis=0) for sentences in per_class])
  return w / np.linalg.norm(w, axis=-1, keepdims=True) if mode == "mean_embedding" else w


def make_scorer(clip, names=CLASS_NAMES, seed=0):
  text = plain(clip, [f"a photo of a {n}." for n in names])
  data = {}
  for i, split in enumerate(("train", "val", "test")):
    data[split] = random_images(len(names), 3, clip.embed_dim, seed=seed + i, text=text)
  scorer = PromptScorer(clip, {k: v[0] for k, v in data.items()},
                        {k: v[1] for k, v in data.items()}, names)
  return scorer, data

@pytest.fixture(scope="module", params=["clip", "siglip"])
def setup(request):
  clip = make_clip() if request.param == "clip" else tiny_siglip()
  scorer, data = make_scorer(clip)
  yield clip, scorer, data
  scorer.close()


def test_sentence_features_equal_the_plain_encode(setup):
  clip, scorer, _ = setup
  groups = descriptions(0)
  flat = [s for g in groups for s in g]
  got = scorer.sentence_features(groups)
  assert got.shape == (len(flat), clip.embed_dim)
  np.testing.assert_allclose(got, plain(clip, flat), atol=1e-5)
  if clip.config.text_causal:  # the DCLIP form's shared words sit in prefix slots
    preps, _ = scorer.text_encoder.pack_sentences(groups)
    assert max(len(p.prefix) for p in preps) > 5


@pytest.mark.parametrize("mode", ["mean_embedding", "mean_logit"])
def test_scores_match_numpy_from_the_plain_encode(setup, mode):
  clip, scorer, data = setup
  sets = [descriptions(0), descriptions(1)]
  scores = scorer.score_descriptions(sets, mode=mode, names=["a", "b"])
  for per_class, score, name in zip(sets, scores, ["a", "b"]):
    assert score.ok and score.template == name
    w = expected_weights(clip, per_class, mode)
    for split, (images, labels) in data.items():
      acc, logp = reference_score(w, images, labels, clip.logit_scale)
      assert score.accuracy[split] == acc
      # The log-probability is a sum over logits: 1e-5 on each logit, a little more here.
      assert score.logprob[split] == pytest.approx(logp, abs=5e-5)
  # The modes differ as soon as classes have different numbers of unlike sentences.
  other = "mean_logit" if mode == "mean_embedding" else "mean_embedding"
  assert scorer.score_descriptions(sets[:1], mode=other)[0].logprob != scores[0].logprob


def test_one_sentence_per_class_is_the_template_score(setup):
  clip, scorer, _ = setup
  # Literal sentences: "brace {} x" stays as written, as the template's filling leaves it.
  sets = [[[f"a photo of a {n}."] for n in CLASS_NAMES]]
  for mode in ("mean_embedding", "mean_logit"):
    got = scorer.score_descriptions(sets, mode=mode)[0]
    want = scorer.score_ensemble([["a photo of a {}."]])[0]
    assert got.accuracy == want.accuracy


def test_bad_sets_are_rejected_with_a_reason(setup):
  clip, scorer, _ = setup
  good = descriptions(0)
  missing = [list(c) for c in good]
  missing[2] = []
  long = [list(c) for c in good]
  long[3] = long[3] + [" ".join(["word"] * 200)]
  scores = scorer.score_descriptions([good[:-1], missing, long, good])
  assert "classes" in scores[0].rejected
  assert repr(CLASS_NAMES[2]) in scores[1].rejected
  assert "too long" in scores[2].rejected
  assert scores[3].ok
  with pytest.raises(ScorerError, match="mode"):
    scorer.score_descriptions([good], mode="max")
  with pytest.raises(ScorerError, match="list of description sets"):
    scorer.score_descriptions(good)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_fifty_sentences_for_a_hundred_classes_in_the_bounded_program_set(family):
  """The Done-when of issue 23: 50 x 100 sentences in one call, <= 8 programs per task."""
  clip = make_clip() if family == "clip" else tiny_siglip()
  names = [f"class number {i}" for i in range(100)]
  scorer, data = make_scorer(clip, names, seed=5)
  rng = np.random.default_rng(0)
  words = "red green small large striped furry shiny metal wooden round".split()
  per_class = [[f"a photo of a {n}, which has {' '.join(rng.choice(words, size=1 + k % 4))} "
                f"parts {k}." for k in range(50)] for n in names]
  score = scorer.score_descriptions([per_class], mode="mean_embedding")[0]
  scorer.wait_compiled()  # every program of the task, background ones included
  stats = scorer.stats()
  assert stats["description_sentences"] == 5000 and stats["description_sets"] == 1
  assert stats["compiles"] <= 8
  # A text and a partials program per call shape (shapes that share segment and slot
  # counts share one partials program).
  assert len(scorer.text_encoder.shapes) < stats["compiles"] <= 2 * len(scorer.text_encoder.shapes)
  w = expected_weights(clip, per_class, "mean_embedding")
  for split, (images, labels) in data.items():
    assert score.accuracy[split] == reference_score(w, images, labels, clip.logit_scale)[0]
  compiled = stats["compiles"]
  scorer.score_descriptions([per_class], mode="mean_logit")
  assert scorer.stats()["compiles"] == compiled
  scorer.close()
