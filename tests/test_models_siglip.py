"""SigLIP and SigLIP 2 FixRes: parity with transformers' SiglipModel on random weights, loaded
by `load_clip` from a saved checkpoint directory (and the hub cache), tokenization included."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import models_helpers as helpers
import siglip_helpers as sh
from lmbbo_jax.models import CheckpointError, load_clip
from lmbbo_jax.models import loading
from lmbbo_jax.models.configs import ARCHITECTURES
from lmbbo_jax.models.convert import config_from_hf_siglip

TEXTS = ["a photo of a dog.", "A blurry photo of the Golden Retriever!",
         "itap of my airplane", "many dogs, and cats, on a sunny day"]


@pytest.fixture(scope="module", params=["siglip", "siglip2"])
def saved(request, tmp_path_factory):
  """(directory, transformers model, transformers tokenizer, is SigLIP 2)."""
  directory = str(tmp_path_factory.mktemp(request.param))
  model, tok = sh.save_siglip(directory, gemma=request.param == "siglip2")
  return directory, model, tok, request.param == "siglip2"


@pytest.fixture(scope="module")
def loaded(saved, tmp_path_factory):
  return load_clip(saved[0], cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_tokenize_equals_transformers_padded_ids(saved, loaded):
  _, _, tok, gemma = saved
  # SigLIP's tokenizer canonicalises itself (lower-case, no punctuation); SigLIP 2 was
  # trained on lower-cased text, which its Gemma tokenizer leaves to the caller.
  want = sh.hf_ids(tok, [t.lower() for t in TEXTS] if gemma else TEXTS)
  got = loaded.tokenize(TEXTS)
  np.testing.assert_array_equal(got, want)
  assert loaded.context_length == sh.TEXT_LENGTH and loaded.config.family == "siglip"
  assert loaded.tokenizer.sot_token_id is None and loaded.tokenizer.eot_token_id == 1
  assert loaded.tokenizer.pad_token_id == (0 if gemma else 1)
  if not gemma:  # big_vision's canonicalisation
    np.testing.assert_array_equal(*loaded.tokenize(["A Photo, of the DOG!", "a photo of the dog"]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_features_and_logits_match_transformers(saved, loaded, dtype):
  _, model, _, _ = saved
  ids = loaded.tokenize(TEXTS)
  pixels = helpers.sample_pixels(3, 32, seed=5)
  ref_text, ref_image, ref_logits = sh.hf_outputs(model, ids, pixels)
  clip = loaded if dtype == jnp.float32 else load_clip(saved[0], dtype=dtype,
                                                       cache_dir=os.path.dirname(saved[0]))
  text, image = np.asarray(clip.encode_text(ids)), np.asarray(clip.encode_image(pixels))
  logits = clip.logits(image, text)
  tol = 1e-4 if dtype == jnp.float32 else 0.05
  assert helpers.max_abs(text, ref_text) <= tol * max(1, np.abs(ref_text).max())
  assert helpers.max_abs(image, ref_image) <= tol * max(1, np.abs(ref_image).max())
  assert helpers.max_abs(logits, ref_logits) <= tol * 10
  if dtype == jnp.float32:
    print(f"max abs diff: text {helpers.max_abs(text, ref_text):.2e}, image "
          f"{helpers.max_abs(image, ref_image):.2e}, logits {helpers.max_abs(logits, ref_logits):.2e}")
    # The features are not trivially equal (different texts, a real image tower).
    assert np.abs(text[0] - text[1]).max() > 1e-2 and np.abs(logits).max() > 1e-2


def test_short_ids_are_padded_to_the_text_length(loaded):
  ids = loaded.tokenize(TEXTS[:2])
  last = int(max(np.flatnonzero(r != loaded.tokenizer.pad_token_id).max() for r in ids)) + 1
  np.testing.assert_array_equal(loaded.encode_text(ids[:, :last]), loaded.encode_text(ids))


def test_converted_cache_then_own_format(saved, loaded, tmp_path, monkeypatch):
  cache = str(tmp_path / "cache")
  first = load_clip(saved[0], cache_dir=cache)
  assert first.weights_hash == loaded.weights_hash

  def fail(*args, **kwargs):
    raise AssertionError("the checkpoint was read again")

  monkeypatch.setattr(loading, "read_state_dict", fail)
  again = load_clip(saved[0], cache_dir=cache)
  entry = os.path.join(cache, "converted", os.listdir(os.path.join(cache, "converted"))[0])
  own = load_clip(entry)  # our format, its tokenizer files copied beside it
  for clip in (again, own):
    assert clip.weights_hash == first.weights_hash and clip.config == first.config
    np.testing.assert_array_equal(clip.tokenize(TEXTS), first.tokenize(TEXTS))
    np.testing.assert_array_equal(clip.encode_text(clip.tokenize(TEXTS)),
                                  first.encode_text(first.tokenize(TEXTS)))


def test_hub_id_from_the_local_hub_cache(saved, tmp_path, monkeypatch):
  import shutil
  home = tmp_path / "hf_home"
  monkeypatch.setenv("HF_HOME", str(home))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  commit = "0123456789abcdef0123456789abcdef01234567"
  repo = home / "hub" / "models--google--tiny-siglip"
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(commit)
  shutil.copytree(saved[0], repo / "snapshots" / commit)
  clip = load_clip("google/tiny-siglip", cache_dir=str(tmp_path / "cache"))
  assert clip.source == "google/tiny-siglip" and clip.config.family == "siglip"
  ids = clip.tokenize(TEXTS)
  np.testing.assert_allclose(clip.encode_text(ids),
                             sh.hf_outputs(saved[1], ids, helpers.sample_pixels(1, 32))[0],
                             atol=1e-4)


def test_missing_tokenizer_and_naflex_are_clear_errors(saved, tmp_path):
  bare = tmp_path / "bare"
  saved[1].save_pretrained(str(bare))
  with pytest.raises(CheckpointError, match="tokenizer files"):
    load_clip(str(bare), cache_dir=str(tmp_path / "cache"))
  with pytest.raises(CheckpointError, match="NaFlex"):
    config_from_hf_siglip({"model_type": "siglip2"})
  with pytest.raises(CheckpointError, match="load its directory"):
    load_clip(str(bare / "model.safetensors"), cache_dir=str(tmp_path / "cache"))


def test_named_siglip_shapes_match_the_published_configs():
  """The true shapes of the named architectures (from the models' config.json files)."""
  shapes = {  # name: (width, layers, heads, mlp, image, patch, vocab)
      "siglip-base-patch16-224": (768, 12, 12, 3072, 224, 16, 32000),
      "siglip-base-patch16-256": (768, 12, 12, 3072, 256, 16, 32000),
      "siglip-large-patch16-256": (1024, 24, 16, 4096, 256, 16, 32000),
      "siglip-so400m-patch14-384": (1152, 27, 16, 4304, 384, 14, 32000),
      "siglip2-base-patch16-224": (768, 12, 12, 3072, 224, 16, 256000),
  }
  for name, (width, layers, heads, mlp, image, patch, vocab) in shapes.items():
    c = ARCHITECTURES[name]
    for tower in (c.text, c.vision):
      assert (tower.width, tower.layers, tower.heads, int(tower.width * tower.mlp_ratio)) == \
          (width, layers, heads, mlp), name
    assert (c.vision.image_size, c.vision.patch_size, c.text.vocab_size,
            c.text.context_length, c.embed_dim) == (image, patch, vocab, 64, width), name
    hf = {"model_type": "siglip",
          "text_config": {"hidden_size": width, "num_hidden_layers": layers,
                          "num_attention_heads": heads, "intermediate_size": mlp,
                          "vocab_size": vocab},
          "vision_config": {"hidden_size": width, "num_hidden_layers": layers,
                            "num_attention_heads": heads, "intermediate_size": mlp,
                            "image_size": image, "patch_size": patch}}
    got = config_from_hf_siglip(hf)
    assert got.replace(name="", sot_token_id=c.sot_token_id, eot_token_id=c.eot_token_id,
                       pad_token_id=c.pad_token_id) == c.replace(name=""), name


def test_image_preprocessing_follows_siglips_processor():
  """SigLIP resizes the whole image to the square (no center crop), bicubic, mean/std 0.5."""
  from transformers import SiglipImageProcessor
  from lmbbo_jax.data.preprocess import preprocess
  config = ARCHITECTURES["siglip-base-patch16-224"]
  image = np.random.default_rng(0).integers(0, 256, (150, 300, 3), dtype=np.uint8)
  ours = preprocess(image, 224, config.image_mean, config.image_std, crop=config.image_crop)
  ref = SiglipImageProcessor()(images=image, return_tensors="np")["pixel_values"][0]
  ref = ref.transpose(1, 2, 0)
  assert ours.shape == ref.shape == (224, 224, 3)
  assert np.abs(ours - ref).max() <= 1e-6  # the same PIL bicubic resize of the uint8 image
  cropped = preprocess(image, 224, config.image_mean, config.image_std, crop=True)
  assert np.abs(cropped - ref).mean() > 0.05  # CLIP's center crop would differ


def test_scorer_on_the_loaded_tokenizer_equals_a_direct_encode(loaded):
  """The scorer's token assembly and plain rows with the real tokenizer (case, punctuation)."""
  from lmbbo_jax import templates as templates_lib
  from lmbbo_jax.evaluator.scorer import PromptScorer
  names = ["dog", "Golden Retriever", "sea lion", "t-shirt", "cat's toy"]
  templates = ["a photo of a {}.", "A blurry photo of the {}!", "many {}s", "{}", "itap of my {}"]
  rng = np.random.default_rng(1)
  scorer = PromptScorer(loaded, {"test": rng.normal(size=(10, loaded.embed_dim))},
                        {"test": np.repeat(np.arange(5), 2)}, names, rows_per_call=8)
  feats = scorer.text_features(templates)
  scorer.close()
  for t, f in zip(templates, feats):
    direct = np.asarray(loaded.encode_text(loaded.tokenize([templates_lib.fill(t, n)
                                                            for n in names])), np.float64)
    direct /= np.linalg.norm(direct, axis=-1, keepdims=True)
    assert np.abs(f - direct).max() <= 1e-5, t
