"""`load_clip` sources: the hub (a prepared offline cache), the converted-params cache, our
own format, random inits, and the one-line errors for what cannot be loaded."""

import json
import os

import jax
import numpy as np
import pytest

import models_helpers as helpers
from lmbbo_jax.models import CheckpointError, load_clip
from lmbbo_jax.models import loading
from lmbbo_jax.models.configs import ARCHITECTURES

REPO_ID = "someone/tiny-clip"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_model():
  return helpers.hf_model(seed=11)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
  """An HF_HOME whose hub cache holds REPO_ID (as a download would leave it); hub offline."""
  home = tmp_path / "hf_home"
  monkeypatch.setenv("HF_HOME", str(home))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return home


def _put_in_hub_cache(home, model):
  repo = home / "hub" / ("models--" + REPO_ID.replace("/", "--"))
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(COMMIT)
  model.save_pretrained(str(repo / "snapshots" / COMMIT))
  return repo


def _features(clip):
  ids, pixels = helpers.sample_ids(2, seed=12), helpers.sample_pixels(2, clip.image_size, 13)
  return np.asarray(clip.encode_text(ids)), np.asarray(clip.encode_image(pixels))


def test_hub_id_from_the_local_hub_cache_then_converted_cache(offline_hub, hf_model, tmp_path,
                                                              monkeypatch):
  repo = _put_in_hub_cache(offline_hub, hf_model)
  cache = str(tmp_path / "converted")
  clip = load_clip(REPO_ID, cache_dir=cache)
  assert clip.source == REPO_ID
  text, image = _features(clip)
  ref_text, ref_image = helpers.torch_features(
      hf_model, helpers.sample_ids(2, seed=12), helpers.sample_pixels(2, 32, 13))
  assert helpers.max_abs(text, ref_text) <= 1e-4 and helpers.max_abs(image, ref_image) <= 1e-4

  # Second load: served from the converted cache, no checkpoint reading at all.
  def fail(*args, **kwargs):
    raise AssertionError("the checkpoint was read again")

  monkeypatch.setattr(loading, "read_state_dict", fail)
  again = load_clip(REPO_ID, cache_dir=cache)
  assert again.weights_hash == clip.weights_hash and again.source == REPO_ID
  np.testing.assert_array_equal(_features(again)[0], text)
  # The hub cache is gone, offline: the converted copy of this source is still used.
  import shutil
  shutil.rmtree(repo)
  assert load_clip(REPO_ID, cache_dir=cache).weights_hash == clip.weights_hash
  # A converted entry is a directory in our own format, loadable by path.
  entries = os.listdir(os.path.join(cache, "converted"))
  assert len(entries) == 1
  own = load_clip(os.path.join(cache, "converted", entries[0]))
  assert own.weights_hash == clip.weights_hash
  np.testing.assert_array_equal(_features(own)[1], image)


def test_offline_without_cache_is_one_clear_error(offline_hub, tmp_path):
  for source in ("openai/clip-vit-base-patch32", "ViT-B/32", "vit-b-32"):
    with pytest.raises(CheckpointError) as info:
      load_clip(source, cache_dir=str(tmp_path / "empty"))
    message = str(info.value)
    assert "'openai/clip-vit-base-patch32' is not available offline" in message
    assert "HF_HUB_OFFLINE=1" in message and "HF_HOME" in message and "local path" in message
    assert "\n" not in message
    # No traceback chain for users: the library errors are not attached.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
  with pytest.raises(CheckpointError, match="'timm/resnet50_clip.openai' is not available"):
    load_clip("RN50", cache_dir=str(tmp_path / "empty"))


def test_random_sources_are_seeded_and_named():
  a = load_clip("random:tiny-vit")
  b = load_clip("tiny-vit", weights="random")
  assert a.source == b.source == "random:tiny-vit"
  assert a.weights_hash == b.weights_hash == loading.weights_hash(jax.device_get(a.variables))
  assert a.config == ARCHITECTURES["tiny-vit"] and a.embed_dim == 32 and a.image_size == 32
  assert a.tokenizer.eot_token_id == 49407
  text, image = _features(a)
  assert text.shape == (2, 32) and image.shape == (2, 32)
  assert np.all(np.isfinite(text)) and np.all(np.isfinite(image))


def _toy_checkpoint(directory):
  """Our own format with the toy world's tokenizer: config.json + params.msgpack + tokenizer."""
  from flax import serialization
  from lmbbo_jax.toyworld.tokenizer import ToyTokenizer, train_tokenizer
  tok = ToyTokenizer(train_tokenizer(["a red circle", "two blue stars", "a green ring"] * 20,
                                     vocab_size=300), context_length=24)
  tok.save(str(directory / "tokenizer.json"))
  base = ARCHITECTURES["tiny-vit"]
  config = base.replace(
      text=base.text.__class__(vocab_size=tok.vocab_size, context_length=24, width=32,
                               layers=2, heads=4),
      sot_token_id=tok.sot_token_id, eot_token_id=tok.eot_token_id,
      pad_token_id=tok.pad_token_id, name="toy")
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: (0.05 * rng.normal(size=s.shape)).astype(np.float32),
      helpers.abstract(config)["params"])
  (directory / "config.json").write_text(json.dumps(
      {**config.to_dict(), "tokenizer": {"kind": "toy", "file": "tokenizer.json"}}))
  (directory / "params.msgpack").write_bytes(serialization.msgpack_serialize(params))
  return config, params


def test_own_format_and_toyclip(tmp_path, monkeypatch):
  config, params = _toy_checkpoint(tmp_path)
  clip = load_clip(str(tmp_path))
  assert clip.config == config and clip.context_length == 24
  assert clip.weights_hash == loading.weights_hash({"params": params})
  ids = clip.tokenize(["a red circle", "two blue stars"])
  assert ids.shape == (2, 24) and ids[0, 0] == config.sot_token_id
  assert np.all(np.isfinite(np.asarray(clip.encode_text(ids))))
  # Any name registered from outside the models room loads from its directory.
  from lmbbo_jax import extensions
  monkeypatch.setitem(extensions._ENTRIES, ("checkpoint", "my-clip"), lambda: str(tmp_path))
  mine = load_clip("my-clip")
  assert mine.source == "my-clip" and mine.weights_hash == clip.weights_hash
  control = load_clip("random:my-clip")  # its shape and tokenizer, random weights
  assert control.config == config and control.weights_hash != clip.weights_hash
  monkeypatch.setitem(extensions._ENTRIES, ("checkpoint", "my-clip"),
                      lambda: str(tmp_path / "absent"))
  with pytest.raises(CheckpointError, match="registered as 'my-clip'"):
    load_clip("my-clip")
  # A config whose token ids disagree with its tokenizer is refused, not silently misread.
  meta = json.loads((tmp_path / "config.json").read_text())
  meta["eot_token_id"] = 7
  (tmp_path / "config.json").write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match="tokenizer start/end ids"):
    load_clip(str(tmp_path))


def test_own_format_shape_mismatch_names_the_variable(tmp_path):
  _toy_checkpoint(tmp_path)
  meta = json.loads((tmp_path / "config.json").read_text())
  meta["embed_dim"] = 16
  (tmp_path / "config.json").write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match=r"variable 'params/text/text_projection' has shape "
                     r"\(32, 32\), the config needs \(32, 16\)"):
    load_clip(str(tmp_path))


@pytest.mark.parametrize("kwargs, message", [
    (dict(source="no-such-model"), "unknown CLIP source 'no-such-model'"),
    (dict(source="random:ViT-Z/99"), "random weights need an architecture name"),
    (dict(source="", ), "load_clip needs a source"),
    (dict(source="tiny-vit", weights="pretrained"), "weights='pretrained'"),
])
def test_bad_sources(kwargs, message):
  with pytest.raises(CheckpointError, match=message):
    load_clip(**kwargs)


def test_bad_local_paths(tmp_path):
  with pytest.raises(CheckpointError, match="holds no CLIP checkpoint"):
    load_clip(str(tmp_path))
  (tmp_path / "weights.npz").write_bytes(b"")
  with pytest.raises(CheckpointError, match="unknown checkpoint file type"):
    load_clip(str(tmp_path / "weights.npz"))
  (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(CheckpointError, match="cannot read"):
    load_clip(str(tmp_path / "broken.safetensors"), cache_dir=str(tmp_path / "cache"))
