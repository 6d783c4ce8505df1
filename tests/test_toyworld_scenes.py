"""Toy-world scene generator and caption grammar."""

import numpy as np
import pytest

from lmbbo_jax.toyworld import captions, scenes
from lmbbo_jax.toyworld.tokenizer import ToyTokenizer, train_tokenizer


def _batch(seed, n=64, dist=scenes.MIX, labels=None):
  return scenes.sample_scenes(np.random.default_rng(seed), n, dist, labels=labels)


def test_generator_is_deterministic_by_seed():
  a, b, c = _batch(7), _batch(7), _batch(8)
  for field in ("label", "colour", "size", "count", "style", "background", "hpos", "images"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert not np.array_equal(a.images, c.images)


def test_unrendered_scenes_have_the_rendered_attributes_and_the_shipped_tokenizer(tmp_path):
  rendered, bare = (scenes.sample_scenes(np.random.default_rng(3), 50, scenes.MIX, render=r)
                    for r in (True, False))
  for field in ("label", "colour", "size", "count", "style", "background", "hpos", "vpos"):
    np.testing.assert_array_equal(getattr(rendered, field), getattr(bare, field))
  assert bare.images.shape == (50, 0, 0, 3)
  # The training command builds its tokenizer from unrendered scenes: the shipped one.
  import json
  import pathlib
  from lmbbo_jax.toyworld import train
  shipped = pathlib.Path(train.__file__).parent / "assets" / "tokenizer.json"
  built = tmp_path / "tokenizer.json"
  train.build_tokenizer(0).save(str(built))
  assert json.loads(built.read_text()) == json.loads(shipped.read_text())


def test_images_are_uint8_64px_and_labels_respected():
  labels = np.arange(40) % len(scenes.CLASS_NAMES)
  b = _batch(0, 40, labels=labels)
  assert b.images.shape == (40, 64, 64, 3) and b.images.dtype == np.uint8
  np.testing.assert_array_equal(b.label, labels)
  assert b.images.std() > 10  # Not blank.


def test_distribution_weights_restrict_attributes():
  dist = scenes.SceneDistribution(
      style=scenes.one_hot_weights(scenes.STYLES, {"sketch": 1}),
      count=scenes.one_hot_weights(scenes.COUNTS, {3: 1}))
  b = _batch(1, 50, dist)
  assert set(b.style) == {scenes.STYLES.index("sketch")}
  assert set(b.count) == {2}
  assert (b.hpos == -1).all()  # Positions are only named for single objects.
  with pytest.raises(ValueError, match="weights"):
    scenes.SceneDistribution(style=(1.0, 0.0))


def test_easy_world_is_one_solid_object_on_white():
  b = _batch(2, 50, scenes.EASY)
  assert set(b.count) == {0} and set(b.style) == {0} and set(b.background) == {0}
  assert (b.hpos >= 0).all()


def test_shapes_differ_from_each_other():
  # The same layout/colour for every class: the rendered masks must all differ.
  n = len(scenes.CLASS_NAMES)
  imgs = []
  for c in range(n):
    imgs.append(_batch(3, 1, scenes.EASY, labels=[c]).images[0])
  flat = np.stack(imgs).reshape(n, -1).astype(int)
  dists = np.abs(flat[:, None] - flat[None]).sum(-1)
  assert (dists[~np.eye(n, dtype=bool)] > 0).all()


def test_sketch_of_circle_is_hollow_like_a_ring():
  # The confound the tasks rely on: an outlined circle has an empty centre.
  dist = scenes.SceneDistribution(
      style=scenes.one_hot_weights(scenes.STYLES, {"sketch": 1}),
      background=scenes.one_hot_weights(scenes.BACKGROUNDS, {"white": 1}),
      count=scenes.one_hot_weights(scenes.COUNTS, {1: 1}),
      size=scenes.one_hot_weights(scenes.SIZES, {"large": 1}))
  b = _batch(4, 20, dist, labels=[0] * 20)
  centre_dark = [img[30:34, 30:34].mean() for img in b.images]
  solid = _batch(4, 20, scenes.EASY, labels=[0] * 20)
  # Sketched circles show the background near the middle far more often than solid ones.
  assert np.mean(centre_dark) > np.mean([img[30:34, 30:34].mean() for img in solid.images])


def test_captions_name_the_class_and_cover_the_grammar():
  b = _batch(5, 600)
  texts = captions.captions(np.random.default_rng(0), b)
  assert len(texts) == 600
  for text, label, count in zip(texts, b.label, b.count):
    name = scenes.CLASS_NAMES[label]
    noun = name if count == 0 else scenes.PLURALS[name]
    assert noun in text, (text, noun)
  joined = "\n".join(texts)
  # Every style prefix family, colour, background word and count word shows up.
  for style, prefixes in captions.STYLE_PREFIXES.items():
    assert any(p in joined for p in prefixes), style
  for word in [*scenes.COLOURS, "two", "three", "dark background", "striped", "checkered",
               "small", "large"]:
    assert word in joined, word
  assert any(t.endswith(".") for t in texts) and any(not t.endswith(".") for t in texts)
  assert any(", " in t and not t.startswith("on a ") for t in texts)  # The tag form.
  words = set(joined.replace(",", " ").replace(".", " ").split())
  assert words <= captions.vocabulary()


def test_captions_are_deterministic():
  b = _batch(6, 30)
  assert (captions.captions(np.random.default_rng(1), b)
          == captions.captions(np.random.default_rng(1), b))


def test_tokenizer_round_trips_any_text_and_pads():
  b = _batch(9, 300)
  texts = captions.captions(np.random.default_rng(2), b)
  tok = ToyTokenizer(train_tokenizer(texts, vocab_size=400), context_length=16)
  assert (tok.pad_token_id, tok.sot_token_id, tok.eot_token_id) == (0, 1, 2)
  ids = tok.encode_batch(["a photo of a star.", "Ünïcode ☃ and unseen wordz"])
  assert all(isinstance(i, int) for i in ids[0]) and len(ids[1]) > 5
  assert tok.decode(ids[0]).strip() == "a photo of a star."
  assert tok.encode_batch(["A PHOTO"]) == tok.encode_batch(["a photo"])  # Lower-cased.
  arr, eot = tok.tokenize(["a photo of a star.", "x " * 40])
  assert arr.shape == (2, 16) and arr[0, 0] == tok.sot_token_id
  assert arr[0, eot[0]] == tok.eot_token_id and (arr[0, eot[0] + 1:] == 0).all()
  assert eot[1] == 15 and arr[1, 15] == tok.eot_token_id  # Truncated, EOT kept.

