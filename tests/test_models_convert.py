"""Conversion parity against the PyTorch references, strict key maps and config inference."""

import jax.numpy as jnp
import numpy as np
import pytest

import models_helpers as helpers
from lmbbo_jax.models import CLIP, CheckpointError
from lmbbo_jax.models.clip import abstract_variables
from lmbbo_jax.models.configs import ARCHITECTURES, CLIPConfig, TextConfig, VisionConfig
from lmbbo_jax.models.convert import (
    config_from_hf, config_from_open_clip, config_from_openai_state, convert_state_dict, flatten,
    key_map)
from lmbbo_jax.models.tokenizer import ClipBPETokenizer

# The OpenAI ViT is checked against its reference in test_models_loading.py.
FAMILIES = ["hf-vit", "openai-rn"]


@pytest.fixture(scope="module")
def tok():
  return ClipBPETokenizer.from_bpe_file()


@pytest.fixture(scope="module", params=FAMILIES)
def reference(request):
  """(torch model, numpy state dict, our inferred config) of one family."""
  if request.param == "hf-vit":
    model = helpers.hf_model(seed=1)
    return model, helpers.numpy_state(model), config_from_hf(model.config.to_dict())
  model = helpers.openai_model(request.param.split("-")[1], seed=2)
  state = helpers.numpy_state(model)
  return model, state, config_from_openai_state(state)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_features_match_the_pytorch_reference(reference, tok, dtype):
  model, state, config = reference
  variables = convert_state_dict(state, config, helpers.abstract(config))
  clip = CLIP(config, variables, tok, jnp.dtype(dtype))
  ids = helpers.sample_ids(3, seed=3)
  pixels = helpers.sample_pixels(2, config.vision.image_size, seed=4)
  ref_text, ref_image = helpers.torch_features(model, ids, pixels)
  text, image = np.asarray(clip.encode_text(ids)), np.asarray(clip.encode_image(pixels))
  assert text.shape == ref_text.shape and image.shape == ref_image.shape
  if dtype == "float32":
    assert helpers.max_abs(text, ref_text) <= 1e-4
    assert helpers.max_abs(image, ref_image) <= 1e-4
  else:
    assert helpers.rel_err(text, ref_text) <= 2e-2
    assert helpers.rel_err(image, ref_image) <= 2e-2
  # The features are not trivially small: the tolerance above means something.
  assert np.abs(ref_text).max() > 0.1 and np.abs(ref_image).max() > 0.1


def test_inferred_configs():
  rn = config_from_openai_state(helpers.openai_state("rn"))
  assert rn == CLIPConfig(
      embed_dim=32, vision=VisionConfig(kind="resnet", image_size=64, width=16,
                                        layers=(1, 2, 1, 1), heads=8),
      text=TextConfig(width=128, layers=2, heads=2))
  vit = config_from_openai_state(helpers.openai_state("vit"))
  assert (vit.vision.kind, vit.vision.width, vit.vision.layers, vit.vision.heads,
          vit.vision.patch_size, vit.vision.image_size) == ("vit", 128, 2, 2, 8, 32)
  # A saved Hugging Face config lists only non-defaults; the defaults are ViT-B/32.
  assert config_from_hf({"model_type": "clip"}) == ARCHITECTURES["ViT-B/32"]
  hf = config_from_hf(helpers.hf_config().to_dict())
  assert (hf.text.act, hf.vision.act, hf.vision.heads, hf.embed_dim) == (
      "quick_gelu", "gelu", 4, 32)
  with pytest.raises(CheckpointError, match="model_type 'siglip'"):
    config_from_hf({"model_type": "siglip"})


def test_open_clip_config():
  state = helpers.openai_state("vit")
  oc = {"model_cfg": {"embed_dim": 32, "quick_gelu": True,
                      "vision_cfg": {"image_size": 32, "layers": 2, "width": 128,
                                     "patch_size": 8, "head_width": 32},
                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128,
                                   "heads": 4, "layers": 2}},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
  cfg = config_from_open_clip(oc, state)
  assert (cfg.vision.heads, cfg.text.heads, cfg.text.act, cfg.image_mean) == (
      4, 4, "quick_gelu", (0.5, 0.5, 0.5))
  oc["model_cfg"].pop("quick_gelu")
  assert config_from_open_clip(oc, state).vision.act == "gelu"  # open_clip's default.
  oc["model_cfg"]["vision_cfg"]["pool_type"] = "avg"
  with pytest.raises(CheckpointError, match=r"vision_cfg.pool_type='avg' is not supported"):
    config_from_open_clip(oc, state)


@pytest.fixture(scope="module")
def rn_state():
  state = helpers.openai_state("rn")
  return state, config_from_openai_state(state)


def _convert(state, config):
  return convert_state_dict(state, config, helpers.abstract(config), what="test.pt")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("visual.layer2.1.bn2.running_var"),
     r"test.pt: missing tensor\(s\) 'visual.layer2.1.bn2.running_var'"),
    (lambda s: s.pop("transformer.resblocks.1.attn.in_proj_weight"),
     r"missing tensor\(s\) 'transformer.resblocks.1.attn.in_proj_weight'"),
    (lambda s: s.update({"visual.extra_head.weight": np.zeros(3)}),
     r"unmapped tensor\(s\) 'visual.extra_head.weight'"),
    (lambda s: s.update({"transformer.resblocks.2.ln_1.weight": np.zeros(128)}),
     r"unmapped tensor\(s\) 'transformer.resblocks.2.ln_1.weight'"),
    (lambda s: s.update({"ln_final.weight": np.zeros(127)}),
     r"tensor 'ln_final.weight' has shape \(127,\).*'params/text/ln_final/scale' needs \(128,\)"),
    (lambda s: s.update({"visual.layer1.0.conv2.weight": np.zeros((16, 16, 1, 1))}),
     r"tensor 'visual.layer1.0.conv2.weight' has shape \(16, 16, 1, 1\)"),
])
def test_strict_mapping_names_the_tensor(rn_state, edit, message):
  state, config = rn_state
  state = dict(state)
  edit(state)
  with pytest.raises(CheckpointError, match=message):
    _convert(state, config)


def test_known_buffers_and_ddp_prefix_are_accepted(rn_state):
  state, config = rn_state
  assert any(k.endswith("num_batches_tracked") for k in state)  # Ignored, not "unmapped".
  extra = {"input_resolution": np.array(64), "context_length": np.array(77),
           "vocab_size": np.array(49408)}  # OpenAI TorchScript metadata.
  plain = _convert({**state, **extra}, config)
  prefixed = _convert({f"module.{k}": v for k, v in state.items()}, config)
  for k, v in flatten(plain).items():
    np.testing.assert_array_equal(v, flatten(prefixed)[k])
  # Transposes really happened: a Linear [out, in] became a Dense kernel [in, out].
  np.testing.assert_array_equal(flatten(plain)["params/visual/attnpool/c_proj/kernel"],
                                state["visual.attnpool.c_proj.weight"].T)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_key_maps_cover_every_named_architecture(name):
  config = ARCHITECTURES[name]
  wanted = set(flatten(abstract_variables(config)))
  if config.family == "siglip":
    families = ["hf_siglip"]
    with pytest.raises(CheckpointError, match="does not fit"):
      key_map("hf", config)
  else:
    families = ["openai"] + (["hf"] if config.vision.kind == "vit" else [])
  for family in families:
    targets = [r.target for r in key_map(family, config)]
    assert len(targets) == len(set(targets))
    assert set(targets) == wanted, (family, set(targets) ^ wanted)
  if config.vision.kind == "resnet":
    with pytest.raises(CheckpointError, match="ViT only"):
      key_map("hf", config)
