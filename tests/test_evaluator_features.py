"""Image features: masked fixed-size batches, L2-normalised, and a cache that is never trusted blindly."""

import json
import logging

import numpy as np
import pytest

from lmbbo_jax.data.preprocess import preprocess
from lmbbo_jax.data.task import FewShotTask, ImageLoadError, Item
from lmbbo_jax.evaluator import features as features_lib

from evaluator_helpers import make_clip


def _image(i: int) -> np.ndarray:
  return np.random.default_rng(i).integers(0, 256, (40, 36, 3), dtype=np.uint8)


def _task(num_train=7, broken=(), seed=0, labels=None):
  """3 classes; item i's image is `_image(i)`; refs in `broken` fail to load."""
  def loader(item):
    if item.ref in broken:
      raise ImageLoadError(f"cannot load image {item.ref!r}: broken on purpose")
    return _image(int(item.ref.split("-")[1]))
  labels = labels or [i % 3 for i in range(num_train)]
  train = [Item(f"img-{i}", y) for i, y in enumerate(labels)]
  test = [Item(f"img-{100 + i}", i % 3) for i in range(4)]
  return FewShotTask("fake", ["a", "b", "c"], train, [], test, shots=2, seed=seed, loader=loader)


@pytest.fixture(scope="module")
def clip():
  return make_clip()


def _direct(clip, refs):
  """The reference: CLIP.encode_image on preprocessed pixels, normalised in numpy."""
  cfg = clip.config
  px = np.stack([preprocess(_image(int(r.split("-")[1])), clip.image_size, cfg.image_mean,
                            cfg.image_std) for r in refs])
  f = np.asarray(clip.encode_image(px), np.float64)
  return f / np.linalg.norm(f, axis=-1, keepdims=True)


def test_features_are_normalised_masked_and_match_direct_encode(clip):
  task = _task(broken={"img-3"})
  out = features_lib.encode_split(clip, task, "train", batch_size=3, progress=False)
  assert out.num_items == 7 and out.num_valid == 6 and not out.from_cache
  feats = np.asarray(out.features)
  valid = out.labels >= 0
  assert feats.shape[0] == len(out.labels) >= 6
  np.testing.assert_allclose(np.linalg.norm(feats[valid], axis=-1), 1.0, atol=1e-5)
  refs = [it.ref for it in task.train if it.ref != "img-3"]
  np.testing.assert_allclose(feats[valid], _direct(clip, refs), atol=1e-5)
  assert list(out.labels[valid]) == [it.label for it in task.train if it.ref != "img-3"]


def test_cache_round_trip_and_invalidation(clip, tmp_path, caplog):
  task = _task()
  first = features_lib.encode_split(clip, task, "train", batch_size=4, cache_dir=str(tmp_path),
                                    progress=False)
  again = features_lib.encode_split(clip, task, "train", batch_size=4,
                                    cache_dir=str(tmp_path), progress=False,
                                    batch_iter=_no_encoding)
  assert again.from_cache
  np.testing.assert_array_equal(np.asarray(first.features), np.asarray(again.features))
  np.testing.assert_array_equal(first.labels, again.labels)

  # Another model (weights hash), another split content or seed: a new entry, re-encoded.
  other_clip = make_clip(seed=1)
  assert not features_lib.encode_split(other_clip, task, "train", batch_size=4,
                                       cache_dir=str(tmp_path), progress=False).from_cache
  changed = _task(labels=[0, 1, 2, 0, 1, 2, 2])
  assert not features_lib.encode_split(clip, changed, "train", batch_size=4,
                                       cache_dir=str(tmp_path), progress=False).from_cache
  assert not features_lib.encode_split(clip, _task(seed=5), "train", batch_size=4,
                                       cache_dir=str(tmp_path), progress=False).from_cache

  # A corrupted entry is detected, logged and rebuilt.
  key = features_lib.cache_key(clip, task, "train")
  npz_path, manifest_path = features_lib.cache_paths(str(tmp_path), key)
  with open(manifest_path) as f:
    manifest = json.load(f)
  manifest["sha256"] = "0" * 64
  with open(manifest_path, "w") as f:
    json.dump(manifest, f)
  with caplog.at_level(logging.WARNING):
    rebuilt = features_lib.encode_split(clip, task, "train", batch_size=4,
                                        cache_dir=str(tmp_path), progress=False)
  assert not rebuilt.from_cache and "hash mismatch" in caplog.text
  np.testing.assert_allclose(np.asarray(rebuilt.features), np.asarray(first.features), atol=1e-6)
  assert features_lib.encode_split(clip, task, "train", batch_size=4, cache_dir=str(tmp_path),
                                   progress=False, batch_iter=_no_encoding).from_cache


def test_cache_with_wrong_shape_is_rejected(clip, tmp_path):
  task = _task()
  key = features_lib.cache_key(clip, task, "train")
  labels = np.array([it.label for it in task.train])
  # Features of the wrong width under the right key: a valid hash, but unusable.
  features_lib.save_cache(str(tmp_path), key, np.zeros((7, 5)), labels, np.arange(7))
  with pytest.raises(features_lib.FeatureCacheError, match="shape"):
    features_lib.load_cache(str(tmp_path), key, labels, clip.embed_dim)
  features_lib.save_cache(str(tmp_path), key, np.zeros((7, clip.embed_dim)), labels[::-1],
                          np.arange(7))
  with pytest.raises(features_lib.FeatureCacheError, match="labels"):
    features_lib.load_cache(str(tmp_path), key, labels, clip.embed_dim)


def test_encode_task_feeds_the_scorer(clip):
  from lmbbo_jax.evaluator.scorer import PromptScorer
  task = _task()
  feats = features_lib.encode_task(clip, task, batch_size=4, progress=False)
  assert set(feats) == {"train", "test"}
  by_split, labels = features_lib.scorer_inputs(feats)
  scorer = PromptScorer(clip, by_split, labels, task.class_names,
                        rows_per_call=8)
  score = scorer.score(["a photo of a {}."])[0]
  assert score.ok and set(score.accuracy) == {"train", "test"}


def _no_encoding(*args, **kwargs):
  raise AssertionError("the cache should have been used")
