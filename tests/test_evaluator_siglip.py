"""PromptScorer on a bidirectional (SigLIP) text tower: the plain rows mode equals a direct
encode of each padded sentence, in the same bounded program set; rejections know its length."""

import numpy as np
import pytest

from lmbbo_jax import templates as templates_lib
from lmbbo_jax.evaluator.scorer import PromptScorer
from lmbbo_jax.evaluator.text_encoder import PackedTextEncoder

from evaluator_helpers import CLASS_NAMES, TEMPLATES, random_images, reference_score, tiny_siglip


@pytest.fixture(scope="module")
def clip():
  return tiny_siglip()


def direct_features(clip, template, names=CLASS_NAMES) -> np.ndarray:
  """Normalised features of each filled sentence through `CLIP.encode_text` (no scorer)."""
  feats = np.asarray(clip.encode_text(clip.tokenize([templates_lib.fill(template, n)
                                                     for n in names])), np.float64)
  return feats / np.linalg.norm(feats, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data(clip):
  text = direct_features(clip, "a photo of a {}.")
  return {"train": random_images(len(CLASS_NAMES), 2, clip.embed_dim, seed=1, text=text),
          "test": random_images(len(CLASS_NAMES), 3, clip.embed_dim, seed=2, text=text)}


def _scorer(clip, data, **kw):
  return PromptScorer(clip, {k: v[0] for k, v in data.items()},
                      {k: v[1] for k, v in data.items()}, CLASS_NAMES, rows_per_call=16, **kw)


def test_plain_rows_equal_the_direct_encode_and_scores_match(clip, data):
  scorer = _scorer(clip, data)
  assert scorer.text_encoder.plain and scorer.text_encoder.prefix_tokens == 0
  feats = scorer.text_features(TEMPLATES)
  for t, f in zip(TEMPLATES, feats):
    assert np.abs(f - direct_features(clip, t)).max() <= 1e-5, t
  scores = scorer.score(TEMPLATES)
  for t, s in zip(TEMPLATES, scores):
    assert s.ok, (t, s.rejected)
    text = direct_features(clip, t)
    for split, (images, labels) in data.items():
      acc, logp = reference_score(text, images, labels, clip.logit_scale)
      assert s.accuracy[split] == pytest.approx(acc, abs=1e-12), (t, split)
      assert s.logprob[split] == pytest.approx(logp, abs=1e-5), (t, split)
      # The same as the log-softmax of SigLIP's logits, bias included (it cancels).
      logits = clip.logits(images, text).astype(np.float64)
      lsm = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
      assert s.logprob[split] == pytest.approx(lsm[np.arange(len(labels)), labels].mean(),
                                               abs=1e-5)
      assert s.accuracy[split] == pytest.approx((logits.argmax(1) == labels).mean(), abs=1e-12)
  assert len({round(s.logprob["test"], 6) for s in scores}) > 1  # templates do differ
  # A bounded program set: 3 text and 3 partials programs, whatever the templates.
  scorer.score(["{} " * k + "!" for k in range(1, 12)])
  assert scorer.stats()["compiles"] == 2 * len(scorer.text_encoder.shapes) <= 8
  scorer.close()


def test_duplicate_sentences_share_a_row_and_tie_to_the_lowest_class(clip, data):
  names = ["cat", "dog", "cat"]
  labels = np.array([0, 1, 2], np.int32)
  images = np.eye(clip.embed_dim, dtype=np.float32)[:3]
  scorer = PromptScorer(clip, {"test": images}, {"test": labels}, names, rows_per_call=4)
  prep = scorer.text_encoder.pack("a photo of a {}.")
  assert prep.num_rows == 2 and [list(c) for c in prep.row_classes] == [[0, 2], [1]]
  feats = scorer.text_features(["a photo of a {}."])[0]
  np.testing.assert_array_equal(feats[0], feats[2])
  score = scorer.score(["a photo of a {}."])[0]
  text = direct_features(clip, "a photo of a {}.", names)
  acc, logp = reference_score(text, images, labels, clip.logit_scale)
  assert score.accuracy["test"] == pytest.approx(acc) and score.logprob["test"] == pytest.approx(logp, abs=1e-5)
  scorer.close()


def test_rejection_knows_the_text_length(clip, data):
  encoder = PackedTextEncoder(clip, CLASS_NAMES, rows_per_call=4)
  scorer = _scorer(clip, data, text_encoder=encoder, precompile=False)
  # "golden retriever" is the longest name: 64 tokens fit, 65 do not.
  longest = max(len(ids) for ids in clip.tokenizer.encode_batch(CLASS_NAMES))
  fits = "a " * (64 - 1 - longest) + "{}"
  assert scorer.rejection_reason(fits) is None
  reason = scorer.rejection_reason("a " + fits)
  assert "too long" in reason and "context 64" in reason and "65 tokens" in reason
  assert "context 64" in scorer.score(["a " + fits])[0].rejected
