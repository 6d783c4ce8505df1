"""PromptScorer: exactness of prefix sharing, scores vs a numpy reference, rejections, ensembles."""

import numpy as np
import pytest

from lmbbo_jax.evaluator.scorer import PromptScorer, ScorerError
from lmbbo_jax.evaluator.text_encoder import PackedTextEncoder, pack_segments

from evaluator_helpers import (CLASS_NAMES, TEMPLATES, make_clip, plain_features,
                               random_images, reference_score)

# Small calls: the 5 templates below take several calls, and share some.
SMALL = dict(rows_per_call=8)
SCORED = ["a photo of a {}.", "many {}s.", "{}{}", "a{} thing",
          "An image of a {} with a blurred background that emphasizes the subject"]


@pytest.fixture(scope="module")
def clip():
  return make_clip()


@pytest.fixture(scope="module")
def data(clip):
  # Images near the classes' "a photo of a {}." features: accuracies are not all 0.
  text = plain_features(clip, "a photo of a {}.", CLASS_NAMES)
  train = random_images(len(CLASS_NAMES), 2, clip.embed_dim, seed=1, text=text)
  test = random_images(len(CLASS_NAMES), 3, clip.embed_dim, seed=2, text=text)
  test[1][::7] = -1  # unreadable images are ignored
  return {"train": train, "test": test}


@pytest.fixture(scope="module")
def scorer(clip, data):
  return PromptScorer(clip, {k: v[0] for k, v in data.items()},
                      {k: v[1] for k, v in data.items()}, CLASS_NAMES, per_class=True, **SMALL)


def test_prefix_shared_features_equal_plain_77_token_encode(clip, scorer):
  got = scorer.text_features(TEMPLATES)
  for t, feats in zip(TEMPLATES, got):
    want = plain_features(clip, t, CLASS_NAMES)
    assert np.abs(feats - want).max() <= 1e-5, t


def test_scores_match_numpy_reference(clip, data, scorer):
  scores = scorer.score(SCORED)
  for t, s in zip(SCORED, scores):
    assert s.ok and set(s.accuracy) == {"train", "test"}
    text = plain_features(clip, t, CLASS_NAMES)
    for split, (images, labels) in data.items():
      acc, logp = reference_score(text, images, labels, clip.logit_scale)
      assert s.accuracy[split] == pytest.approx(acc, abs=1e-12), (t, split)
      assert s.logprob[split] == pytest.approx(logp, abs=1e-4), (t, split)
  assert scores[0].accuracy["test"] > 0.5  # the images were made near this template
  # Per-class accuracy is consistent with the overall accuracy.
  labels = data["test"][1]
  counts = np.bincount(labels[labels >= 0], minlength=len(CLASS_NAMES))
  per = np.array(scores[0].per_class["test"])
  assert np.isclose((per * counts).sum() / counts.sum(), scores[0].accuracy["test"])


def test_chunking_and_batching_do_not_change_scores(clip, data, scorer):
  base = scorer.score(SCORED)
  # One-row calls (a template's classes split over calls), prefixes cut at 3 tokens
  # (the rest of a shared prefix repeated in every segment).
  encoder = PackedTextEncoder(clip, CLASS_NAMES, rows_per_call=1, prefix_tokens=3)
  other = PromptScorer(clip, {k: v[0] for k, v in data.items()},
                       {k: v[1] for k, v in data.items()}, CLASS_NAMES, text_encoder=encoder)
  assert all(s.rows == 1 for s in encoder.shapes)
  for a, b in zip(base, other.score(SCORED[::-1])[::-1]):
    assert a.accuracy == b.accuracy
    for split in a.logprob:
      assert a.logprob[split] == pytest.approx(b.logprob[split], abs=1e-5)
  feats = other.text_features(SCORED)
  for t, f in zip(SCORED, feats):
    assert np.abs(f - plain_features(clip, t, CLASS_NAMES)).max() <= 1e-5, t


def test_repeat_scoring_compiles_nothing_new(scorer):
  scorer.score(SCORED)
  before = scorer.stats()
  again = scorer.score(SCORED + SCORED[:2])  # duplicates are scored once
  after = scorer.stats()
  assert after["compiles"] == before["compiles"]
  assert after["templates"] - before["templates"] == len(SCORED)
  assert after["calls"] > before["calls"] and after["seconds_busy"] > before["seconds_busy"]
  assert [s.accuracy for s in again[-2:]] == [s.accuracy for s in again[:2]]


def test_rejections_say_why(clip, scorer):
  long = "a photo of " + "very " * 70 + "{}"
  bad = ["no slot here", "a {0} photo {}", "a {name} of {}", "unbalanced { {}", "", long, 3]
  scores = scorer.score(bad)
  assert all(not s.ok and s.accuracy == {} for s in scores)
  reasons = [s.rejected for s in scores]
  assert "slot" in reasons[0] and "format field" in reasons[1] and "format field" in reasons[2]
  assert "brace" in reasons[3] and "empty" in reasons[4] and "not a string" in reasons[6]
  assert "too long" in reasons[5] and "context 77" in reasons[5]
  # Fits with the short names but not with the longest one: measured in tokens.
  edge = "a " * 72 + "{}"
  assert scorer.rejection_reason("a photo of a {}.") is None
  assert "too long" in scorer.rejection_reason(edge)
  assert "too long" in scorer.score([edge])[0].rejected
  with pytest.raises(ScorerError):
    scorer.score("a photo of a {}.")


def test_argmax_ties_go_to_the_lowest_class_index(clip):
  names = ["cat", "dog", "cat"]  # classes 0 and 2 have identical text features
  text = plain_features(clip, "a photo of a {}.", names)
  images, _ = random_images(3, 2, clip.embed_dim, seed=3, text=text)
  labels = np.array([0, 0, 1, 1, 2, 2], np.int32)
  # Then segments longer than half a row in one-row calls: every class in its own
  # call, so the tie is resolved across calls (on the host) too.
  long = "a photo of a {}" + " very" * 40 + " nice."
  for template, rows in (("a photo of a {}.", 8), (long, 1)):
    scorer = PromptScorer(clip, {"test": images}, {"test": labels}, names, per_class=True,
                          rows_per_call=rows)
    s = scorer.score([template])[0]
    assert s.per_class["test"][2] == 0.0, template  # class 2 is never predicted
    ref = plain_features(clip, template, names)
    acc, logp = reference_score(ref, images, labels, clip.logit_scale)
    assert s.accuracy["test"] == acc and s.logprob["test"] == pytest.approx(logp, abs=1e-4)
  assert scorer.stats()["calls"] == 2  # the two "cat" sentences are one segment


def test_ensembles_average_normalised_features(clip, data, scorer):
  groups = [["a photo of a {}."], ["a photo of a {}.", "many {}s."], ["many {}s.", "bad {0} {}"], []]
  scores = scorer.score_ensemble(groups)
  single = scorer.score(["a photo of a {}."])[0]
  assert scores[0].accuracy == single.accuracy
  mean = plain_features(clip, "a photo of a {}.", CLASS_NAMES) + plain_features(
      clip, "many {}s.", CLASS_NAMES)
  mean /= np.linalg.norm(mean, axis=-1, keepdims=True)
  for split, (images, labels) in data.items():
    acc, logp = reference_score(mean, images, labels, clip.logit_scale)
    assert scores[1].accuracy[split] == acc
    assert scores[1].logprob[split] == pytest.approx(logp, abs=1e-4)
  assert scores[1].template == "a photo of a {}. | many {}s."
  assert "format field" in scores[2].rejected and "empty" in scores[3].rejected


def test_bad_inputs_raise_clear_errors(clip):
  with pytest.raises(ScorerError, match="splits"):
    PromptScorer(clip, {"train": np.zeros((2, clip.embed_dim))}, {"test": [0, 0]}, ["a"])
  with pytest.raises(ScorerError, match="labels"):
    PromptScorer(clip, {"train": np.zeros((2, clip.embed_dim))}, {"train": [0, 5]}, ["a"])
  with pytest.raises(ScorerError, match="class names"):
    PromptScorer(clip, {}, {}, [])


def test_a_stream_of_mixed_templates_compiles_a_fixed_program_set(clip, data):
  """However long the templates and wherever the slot: 3 text + 3 partials programs."""
  rng = np.random.default_rng(0)
  words = "a photo of the small large blurry bright dark cropped close-up rendering".split()
  stream = []
  for _ in range(40):
    before = " ".join(rng.choice(words, rng.integers(0, 14)))
    after = " ".join(rng.choice(words, rng.integers(0, 20)))
    stream.append(f"{before} {{}} {after}.".strip())
  scorer = PromptScorer(clip, {k: v[0] for k, v in data.items()},
                        {k: v[1] for k, v in data.items()}, CLASS_NAMES, **SMALL)
  scorer.wait_compiled()
  compiled = scorer.stats()["compiles"]
  assert compiled == 2 * len(scorer.text_encoder.shapes) == 6
  for i in range(0, len(stream), 3):
    scorer.score(stream[i:i + 3])
  scorer.score(stream)
  assert scorer.stats()["compiles"] == compiled
  for t, f in zip(stream[:6], scorer.text_features(stream[:6])):
    assert np.abs(f - plain_features(clip, t, CLASS_NAMES)).max() <= 1e-5, t


def test_packing_fills_rows_first_fit_without_overflow():
  lengths = np.array([30, 50, 10, 40, 77, 5, 5, 20])
  place, rows = pack_segments(lengths, 77)
  assert rows == 4  # 77 | 50+20+5 | 40+30+5 | 10 (first fit, longest first)
  used = np.zeros((rows, 77), int)
  for (r, col), n in zip(place, lengths):
    used[r, col:col + n] += 1
  assert used.max() == 1 and used.sum() == lengths.sum()


def test_device_resident_features_score_as_host_ones(clip, data, scorer):
  import jax
  from lmbbo_jax.evaluator import sharding
  mesh = scorer.mesh
  on_device = {}
  for k, (images, labels) in data.items():
    n = sharding.round_up(len(labels), sharding.num_shards(mesh))
    padded = np.zeros((n, images.shape[1]), np.float32)
    padded[:len(labels)] = 3.0 * images  # Not normalised: the scorer normalises.
    y = np.full((n,), -1, np.int32)
    y[:len(labels)] = labels
    on_device[k] = (sharding.put_sharded(padded, mesh), y)
  assert all(isinstance(f, jax.Array) for f, _ in on_device.values())
  dev = PromptScorer(clip, {k: v[0] for k, v in on_device.items()},
                     {k: v[1] for k, v in on_device.items()}, CLASS_NAMES,
                     text_encoder=scorer.text_encoder)
  for a, b in zip(dev.score(SCORED), scorer.score(SCORED)):
    assert a.accuracy == b.accuracy
    for split in a.logprob:
      assert a.logprob[split] == pytest.approx(b.logprob[split], abs=1e-5)
  dev.close()


def test_train_val_is_the_joined_splits_not_the_mean(clip, data):
  """At 8-16 shots val has fewer images per class than train: "train_val" is the metric
  over the joined images, as select_by="train_val" promises, not the mean of the two."""
  text = plain_features(clip, "a photo of a {}.", CLASS_NAMES)
  val = random_images(len(CLASS_NAMES), 1, clip.embed_dim, seed=5, text=text)
  splits = {"train": data["train"], "val": val, "test": data["test"]}
  scorer = PromptScorer(clip, {k: v[0] for k, v in splits.items()},
                        {k: v[1] for k, v in splits.items()}, CLASS_NAMES, **SMALL)
  for t, s in zip(SCORED[:3], scorer.score(SCORED[:3])):
    feats = plain_features(clip, t, CLASS_NAMES)
    joined = (np.concatenate([data["train"][0], val[0]]),
              np.concatenate([data["train"][1], val[1]]))
    acc, logp = reference_score(feats, *joined, clip.logit_scale)
    assert s.accuracy["train_val"] == pytest.approx(acc, abs=1e-12), t
    assert s.logprob["train_val"] == pytest.approx(logp, abs=1e-4), t
    n_train, n_val = len(data["train"][1]), len(val[1])
    weighted = (s.accuracy["train"] * n_train + s.accuracy["val"] * n_val) / (n_train + n_val)
    assert s.accuracy["train_val"] == pytest.approx(weighted, abs=1e-12)
  from lmbbo_jax.search.state import select_value
  assert select_value(s.accuracy, "train_val") == s.accuracy["train_val"]
