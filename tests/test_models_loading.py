"""`load_clip` round trips: each checkpoint format, saved from a random PyTorch CLIP.

Every loaded model is compared with the PyTorch reference that wrote it
(float32 features within 1e-4).
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import models_helpers as helpers
from lmbbo_jax.models import CheckpointError, ClipBPETokenizer, load_clip


@pytest.fixture(scope="module")
def models():
  return {"hf": helpers.hf_model(seed=5), "vit": helpers.openai_model("vit", seed=6),
          "rn": helpers.openai_model("rn", seed=7)}


def _assert_same_features(clip, model, max_err=1e-4):
  ids = helpers.sample_ids(3, seed=8)
  pixels = helpers.sample_pixels(2, clip.image_size, seed=9)
  ref_text, ref_image = helpers.torch_features(model, ids, pixels)
  assert helpers.max_abs(clip.encode_text(ids), ref_text) <= max_err
  assert helpers.max_abs(clip.encode_image(pixels), ref_image) <= max_err


def _contiguous_state(model):
  return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def test_hf_directory_safetensors_and_bin(models, tmp_path):
  model = models["hf"]
  model.save_pretrained(str(tmp_path / "st"))
  assert (tmp_path / "st" / "model.safetensors").exists()
  # A directory's own tokenizer.json is used (and kept with the converted copy).
  ClipBPETokenizer.from_bpe_file().save(str(tmp_path / "st" / "tokenizer.json"))
  clip = load_clip(str(tmp_path / "st"), cache_dir=str(tmp_path / "cache"))
  _assert_same_features(clip, model)
  assert clip.source == str(tmp_path / "st") and len(clip.weights_hash) == 64
  assert clip.tokenizer.source == str(tmp_path / "st" / "tokenizer.json")
  assert clip.tokenize(["a photo of a dog."])[0, :8].tolist() == [
      49406, 320, 1125, 539, 320, 1929, 269, 49407]
  cached = load_clip(str(tmp_path / "st"), cache_dir=str(tmp_path / "cache"))
  assert cached.tokenizer.source.startswith(str(tmp_path / "cache"))
  assert cached.tokenizer.source.endswith("tokenizer.json")
  # The same weights as pytorch_model.bin (the older HF format).
  (tmp_path / "bin").mkdir()
  model.config.save_pretrained(str(tmp_path / "bin"))
  torch.save(model.state_dict(), str(tmp_path / "bin" / "pytorch_model.bin"))
  clip_bin = load_clip(str(tmp_path / "bin"), cache_dir=str(tmp_path / "cache"))
  assert clip_bin.weights_hash == clip.weights_hash
  assert clip_bin.config == clip.config


def test_hf_sharded_directory(models, tmp_path):
  model = models["hf"]
  state = _contiguous_state(model)
  keys = sorted(state)
  halves = {"model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2]}
  for name, part in halves.items():
    save_file({k: state[k] for k in part}, str(tmp_path / name))
  weight_map = {k: name for name, part in halves.items() for k in part}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  model.config.save_pretrained(str(tmp_path))
  _assert_same_features(load_clip(str(tmp_path), cache_dir=str(tmp_path / "cache")), model)


def test_openai_state_dict_files(models, tmp_path):
  vit, rn = models["vit"], models["rn"]
  save_file(_contiguous_state(vit), str(tmp_path / "vit.safetensors"))
  clip = load_clip(str(tmp_path / "vit.safetensors"), cache_dir=str(tmp_path / "cache"))
  assert clip.config.vision.kind == "vit" and clip.config.vision.heads == 2
  _assert_same_features(clip, vit)
  torch.save(rn.state_dict(), str(tmp_path / "rn.pt"))
  clip = load_clip(str(tmp_path / "rn.pt"), cache_dir=str(tmp_path / "cache"))
  assert clip.config.vision.kind == "resnet" and clip.config.vision.layers == (1, 2, 1, 1)
  _assert_same_features(clip, rn)


def test_open_clip_directory(models, tmp_path):
  vit = models["vit"]
  save_file(_contiguous_state(vit), str(tmp_path / "open_clip_model.safetensors"))
  (tmp_path / "open_clip_config.json").write_text(json.dumps({
      "model_cfg": {"embed_dim": 32, "quick_gelu": True,
                    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128,
                                   "patch_size": 8},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128,
                                 "heads": 2, "layers": 2}},
      "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                         "std": [0.26862954, 0.26130258, 0.27577711]}}))
  _assert_same_features(load_clip(str(tmp_path), cache_dir=str(tmp_path / "cache")), vit)


def _block_torch(monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
      raise ImportError("torch is blocked in this test")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning",
                            "ignore:.*torch.jit.*deprecated:DeprecationWarning")
def test_torchscript_archive_then_cached_load_without_torch(models, tmp_path, monkeypatch):
  rn = models["rn"]
  scripted = helpers.openai_model("rn", seed=7)  # Same weights as models["rn"].
  # OpenAI's archives carry these metadata entries in their state dict.
  for name, value in (("input_resolution", 64), ("context_length", 77), ("vocab_size", 49408)):
    if hasattr(scripted, name):
      delattr(scripted, name)  # A plain attribute here; a tensor in OpenAI's archives.
    scripted.register_buffer(name, torch.tensor(value))
  ids = torch.from_numpy(helpers.sample_ids(2))
  traced = torch.jit.trace(scripted, (torch.zeros(2, 3, 64, 64), ids), check_trace=False)
  torch.jit.save(traced, str(tmp_path / "RN.pt"))
  cache = str(tmp_path / "cache")
  first = load_clip(str(tmp_path / "RN.pt"), cache_dir=cache)
  _assert_same_features(first, rn)

  ids, pixels = helpers.sample_ids(3), helpers.sample_pixels(2, 64)
  expected = np.asarray(first.encode_text(ids)), np.asarray(first.encode_image(pixels))

  _block_torch(monkeypatch)
  second = load_clip(str(tmp_path / "RN.pt"), cache_dir=cache)  # From the cache: no torch.
  assert second.weights_hash == first.weights_hash and second.config == first.config
  np.testing.assert_array_equal(second.encode_text(ids), expected[0])
  np.testing.assert_array_equal(second.encode_image(pixels), expected[1])
  # Without the cache, a torch archive needs the `convert` extra, said in one line.
  with pytest.raises(CheckpointError, match=r"needs PyTorch: pip install 'lmbbo_jax\[convert\]'"):
    load_clip(str(tmp_path / "RN.pt"), cache_dir=str(tmp_path / "empty"))


# open_clip's ViT-H-14 (MetaCLIP H/14, DFN5B H/14) has 80-wide vision heads: a tiny tower
# of width 160 has OpenAI's 2 heads (width // 64) of 80, as open_clip_config says.
DFN_LIKE = dict(helpers.OPENAI_VIT, vision_width=160)


def _dfn_like_directory(directory, model):
  directory.mkdir(parents=True, exist_ok=True)
  save_file(_contiguous_state(model), str(directory / "open_clip_model.safetensors"))
  (directory / "open_clip_config.json").write_text(json.dumps({
      "model_cfg": {"embed_dim": 32, "quick_gelu": True,
                    "vision_cfg": {"image_size": 32, "layers": 2, "width": 160,
                                   "head_width": 80, "patch_size": 8},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128,
                                 "heads": 2, "layers": 2}}}))
  return directory


def test_dfn_and_metaclip_shaped_open_clip_checkpoints_load(tmp_path, monkeypatch):
  torch.manual_seed(3)
  model = helpers.randomize_(helpers.openai_model_module().CLIP(**DFN_LIKE).float(), 3)
  _dfn_like_directory(tmp_path / "dfn", model)
  clip = load_clip(str(tmp_path / "dfn"), cache_dir=str(tmp_path / "cache"))
  assert clip.config.vision.heads == 2 and clip.config.text.act == "quick_gelu"
  _assert_same_features(clip, model)
  # The short name finds the hub repo (here a prepared offline hub cache) and names the model.
  from lmbbo_jax.models.loading import SHORT_NAMES
  home = tmp_path / "hf_home"
  monkeypatch.setenv("HF_HOME", str(home))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  commit = "0123456789abcdef0123456789abcdef01234567"
  repo = home / "hub" / ("models--" + SHORT_NAMES["DFN5B-H/14"].replace("/", "--"))
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(commit)
  _dfn_like_directory(repo / "snapshots" / commit, model)
  named = load_clip("dfn5b-h/14", cache_dir=str(tmp_path / "cache2"))
  assert named.name == "DFN5B-H/14" and named.source == "apple/DFN5B-CLIP-ViT-H-14"
  _assert_same_features(named, model)


def test_eva02_open_clip_checkpoints_are_refused_with_the_reason(tmp_path):
  model = helpers.openai_model("vit", seed=6)
  directory = _dfn_like_directory(tmp_path / "eva", model)
  cfg = json.loads((directory / "open_clip_config.json").read_text())
  cfg["model_cfg"]["vision_cfg"]["timm_model_name"] = "eva02_large_patch14_clip_224"
  (directory / "open_clip_config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="timm_model_name"):
    load_clip(str(directory), cache_dir=str(tmp_path / "cache"))
