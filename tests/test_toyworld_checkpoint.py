"""The shipped toy CLIP: files, loading through `load_clip`, and its log against the code."""

import json
import os

import numpy as np
import pytest

from lmbbo_jax.models import load_clip
from lmbbo_jax.models.configs import CLIP_MEAN, CLIP_STD, CLIPConfig
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


@pytest.mark.slow
def test_train_log_matches_what_the_code_computes_on_the_shipped_weights(clip):
  """The log is no static claim: its gate and command are recomputed from code."""
  from lmbbo_jax.toyworld import train
  with open(os.path.join(ASSETS, "train_log.json")) as f:
    log = json.load(f)
  assert log["command"] == train.recipe_command(log["recipe"])
  gate = train.gate_accuracy(clip.config, clip.variables["params"], clip.tokenizer,
                             n=log["gate"]["held_out_images"], template=log["gate"]["template"])
  assert gate == pytest.approx(log["gate"]["zero_shot_accuracy"], abs=1e-4)
  assert gate >= 0.6  # The gate the shipped checkpoint passed (chance is 0.1).


def test_loads_through_load_clip_like_any_clip(clip):
  assert clip.image_size == 64 and clip.embed_dim == 128
  ids = clip.tokenize(["a photo of a star.", "an unseen wörd ☃"])  # Any text tokenizes.
  assert ids.shape[0] == 2
  assert np.asarray(clip.encode_text(ids)).shape == (2, 128)
  # The registered name and the directory are the same checkpoint.
  direct = load_clip(ASSETS)
  assert direct.config == clip.config
  np.testing.assert_allclose(np.asarray(direct.variables["params"]["logit_scale"]),
                             np.asarray(clip.variables["params"]["logit_scale"]))


def test_generic_templates_stay_in_the_grammar_vocabulary():
  from lmbbo_jax.templates import PHOTO, invalid_reason
  from lmbbo_jax.toyworld import captions
  assert len(captions.GENERIC_TEMPLATES) >= 20 and PHOTO in captions.GENERIC_TEMPLATES
  vocab = captions.vocabulary()
  for t in captions.GENERIC_TEMPLATES:
    assert invalid_reason(t) is None
    words = t.replace("{}", " ").replace(".", " ").split()
    assert set(words) <= vocab, t
