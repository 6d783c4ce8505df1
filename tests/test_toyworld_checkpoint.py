"""The shipped toy CLIP: files, loading through `load_clip`, and the accuracy gate."""

import json
import os

import numpy as np
import pytest

from lmbbo_jax.models import load_clip
from lmbbo_jax.models.configs import CLIP_MEAN, CLIP_STD, CLIPConfig
from lmbbo_jax.templates import fill
from lmbbo_jax.toyworld import checkpoint, scenes
from lmbbo_jax.toyworld.tokenizer import ToyTokenizer

ASSETS = checkpoint.ASSETS_DIR


@pytest.fixture(scope="module")
def clip():
  return load_clip("toyclip")


def test_assets_are_complete_and_small():
  sizes = {f: os.path.getsize(os.path.join(ASSETS, f)) for f in checkpoint.FILES}
  assert sum(sizes.values()) < 10 * 2 ** 20, sizes
  with open(os.path.join(ASSETS, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["tokenizer"] == {"kind": "toy", "file": "tokenizer.json"}
  config = CLIPConfig.from_dict(cfg)
  assert config.vision.image_size == scenes.IMAGE_SIZE
  assert config.image_mean == CLIP_MEAN and config.image_std == CLIP_STD
  tok = ToyTokenizer.from_file(os.path.join(ASSETS, "tokenizer.json"))
  assert (config.sot_token_id, config.eot_token_id, config.pad_token_id) == (
      tok.sot_token_id, tok.eot_token_id, tok.pad_token_id)
  assert config.text.vocab_size == tok.vocab_size


def test_train_log_records_recipe_curves_and_gate():
  log = checkpoint.train_log()
  assert log["recipe"]["seed"] == 0 and log["command"].startswith("python -m lmbbo_jax")
  s1 = [p["held_out_head_acc"]["label"] for p in log["stage1"]["curve"]]
  s2 = [p["zero_shot_photo_acc"] for p in log["stage2"]["curve"]]
  assert len(s1) >= 5 and s1[-1] > s1[0] + 0.3  # The class was learned during training.
  assert len(s2) >= 3 and s2[-1] > 0.5
  assert log["gate"]["template"] == "a photo of a {}."
  assert log["gate"]["zero_shot_accuracy"] >= 0.6


def test_loads_through_load_clip_like_any_clip(clip):
  assert clip.image_size == 64 and clip.embed_dim == 128
  ids = clip.tokenize(["a photo of a star.", "an unseen wörd ☃"])  # Any text tokenizes.
  assert ids.shape[0] == 2
  assert np.asarray(clip.encode_text(ids)).shape == (2, 128)
  # The toy reader and the loader see the same weights.
  config, params, _ = checkpoint.load_toy_checkpoint()
  assert config == clip.config
  np.testing.assert_allclose(np.asarray(clip.variables["params"]["logit_scale"]),
                             params["logit_scale"])


def test_zero_shot_photo_template_clears_a_floor_on_held_out_mix(clip):
  # 30 fresh images per class from a stream the training never used (SE about 2.8 pt).
  num = len(scenes.CLASS_NAMES)
  rng = np.random.default_rng([424242, 7])
  batch = scenes.sample_scenes(rng, 30 * num, scenes.MIX, labels=np.arange(30 * num) % num)
  pixels = scenes.preprocess(batch.images, clip.config.image_mean, clip.config.image_std)
  img = np.asarray(clip.encode_image(pixels))
  txt = np.asarray(clip.encode_text(clip.tokenize(
      [fill("a photo of a {}.", c) for c in scenes.CLASS_NAMES])))
  img = img / np.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
  acc = float(np.mean((img @ txt.T).argmax(-1) == batch.label))
  assert acc >= 0.5, acc  # The gate is 0.6 on 2,000 images; chance is 0.1.


def test_generic_templates_stay_in_the_grammar_vocabulary():
  from lmbbo_jax.toyworld import captions, evaluate
  from lmbbo_jax.templates import invalid_reason
  assert len(evaluate.GENERIC_TEMPLATES) >= 20 and evaluate.PHOTO in evaluate.GENERIC_TEMPLATES
  vocab = captions.vocabulary()
  for t in evaluate.GENERIC_TEMPLATES:
    assert invalid_reason(t) is None
    words = t.replace("{}", " ").replace(".", " ").split()
    assert set(words) <= vocab, t


def test_template_table_on_the_shipped_model():
  from lmbbo_jax.toyworld import evaluate
  templates = list(evaluate.GENERIC_TEMPLATES[:3]) + ["a drawing of a {}."]
  (r,) = evaluate.run(ASSETS, ["sketch_dark"], [1, 2], 1, templates=templates)
  assert r["test_images"] == 1000 and len(r["templates"]) == 4
  photo = next(row for row in r["templates"] if row["template"] == evaluate.PHOTO)
  assert photo["test_acc"] == r["photo_acc"]
  drawing = next(row for row in r["templates"] if row["template"] == "a drawing of a {}.")
  assert drawing["diff_vs_photo"] == pytest.approx(drawing["test_acc"] - r["photo_acc"], abs=2e-4)
  assert drawing["test_acc"] != r["photo_acc"]  # the wording changes the reading
  assert r["best"]["test_acc"] == max(row["test_acc"] for row in r["templates"])
  assert [p["seed"] for p in r["train_picked"]["per_seed"]] == [1, 2]
  assert r["photo_acc"] > 0.2  # Far above chance (0.1) even on the hardest style.
  md = evaluate.markdown([r])
  assert "sketch_dark" in md and "a drawing of a {}." in md
