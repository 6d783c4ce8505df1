"""Shared fixtures of the model-room tests: tiny reference PyTorch CLIPs with random weights.

The references are transformers' `CLIPModel` (ViT) and OpenAI's own `model.py`
(ViT and ModifiedResNet, vendored in tests/third_party/openai_clip_model.py).
Every parameter and BatchNorm statistic is randomised (the stock inits leave
LayerNorms at 1/0 and zero the last BN of each bottleneck, which would hide
mapping mistakes).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 49408
SOT, EOT = 49406, 49407


def _load_vendored(name: str):
  path = os.path.join(_HERE, "third_party", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"lmbbo_tests_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@functools.lru_cache(maxsize=None)
def openai_model_module():
  return _load_vendored("openai_clip_model")


@functools.lru_cache(maxsize=None)
def openai_simple_tokenizer():
  return _load_vendored("openai_simple_tokenizer").SimpleTokenizer()


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Random values for every parameter and BN statistic, at scales that keep activations sane."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("logit_scale"):
        p.fill_(float(np.log(1 / 0.07)))
      elif p.ndim == 1 and ("ln" in name or "norm" in name or "bn" in name or
                            "layrnorm" in name or "downsample.1" in name):
        # LayerNorm / BatchNorm weights near 1, their biases near 0.
        base = 1.0 if name.endswith("weight") else 0.0
        p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
      else:
        fan_in = p.shape[1] if p.ndim >= 2 else p.shape[0]
        if p.ndim == 4:
          fan_in = p.shape[1] * p.shape[2] * p.shape[3]
        std = 0.02 if "embedding" in name and p.ndim == 2 else fan_in ** -0.5
        p.copy_(std * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=g))
  return model.eval()


def hf_config(**overrides):
  """A tiny transformers CLIPConfig: QuickGELU text, GELU vision (both code paths)."""
  from transformers import CLIPConfig as HFConfig
  text = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              eos_token_id=EOT, bos_token_id=SOT, pad_token_id=1, hidden_act="quick_gelu")
  vision = dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                num_attention_heads=4, image_size=32, patch_size=8, hidden_act="gelu")
  text.update(overrides.pop("text", {}))
  vision.update(overrides.pop("vision", {}))
  return HFConfig(text_config=text, vision_config=vision, projection_dim=32, **overrides)


def hf_model(seed: int = 0, **overrides):
  from transformers import CLIPModel
  torch.manual_seed(seed)
  return randomize_(CLIPModel(hf_config(**overrides)), seed)


# OpenAI-style configs whose heads follow OpenAI's rule (64-wide), so they can be
# inferred from a bare state dict.
OPENAI_VIT = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128,
                  vision_patch_size=8, context_length=77, vocab_size=VOCAB,
                  transformer_width=128, transformer_heads=2, transformer_layers=2)
OPENAI_RN = dict(embed_dim=32, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=16,
                 vision_patch_size=None, context_length=77, vocab_size=VOCAB,
                 transformer_width=128, transformer_heads=2, transformer_layers=2)


def openai_model(kind: str, seed: int = 0):
  """OpenAI's CLIP ("vit" or "rn"), float32, random weights, eval mode."""
  torch.manual_seed(seed)
  m = openai_model_module().CLIP(**(OPENAI_VIT if kind == "vit" else OPENAI_RN))
  return randomize_(m.float(), seed)


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _openai_state(kind: str) -> dict[str, np.ndarray]:
  return numpy_state(openai_model(kind))


def openai_state(kind: str) -> dict[str, np.ndarray]:
  """A fresh dict (tests edit it) over the cached tensors of `openai_model(kind)`."""
  return dict(_openai_state(kind))


@functools.lru_cache(maxsize=None)
def abstract(config):
  """`abstract_variables(config)`, cached (tracing the model takes about a second)."""
  from lmbbo_jax.models.clip import abstract_variables
  return abstract_variables(config)


def sample_ids(n: int = 3, seed: int = 0, context: int = 77, lengths=(5, 12, 20)) -> np.ndarray:
  """[n, context] ids: SOT, random tokens, EOT, then zero padding (EOT is the row max)."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((n, context), np.int64)
  for i in range(n):
    length = lengths[i % len(lengths)]
    ids[i, 0] = SOT
    ids[i, 1:length - 1] = rng.integers(1, SOT, length - 2)
    ids[i, length - 1] = EOT
  return ids


def sample_pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
  """NHWC float32 pixels, as if CLIP-normalised."""
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


@torch.no_grad()
def torch_features(model, ids: np.ndarray, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(text, image) projected features of a transformers CLIPModel or an OpenAI CLIP."""
  t_ids = torch.from_numpy(ids)
  t_px = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
  if hasattr(model, "text_model"):  # transformers: the definition of get_*_features.
    text = model.text_projection(model.text_model(input_ids=t_ids).pooler_output)
    image = model.visual_projection(model.vision_model(pixel_values=t_px).pooler_output)
  else:
    text, image = model.encode_text(t_ids), model.encode_image(t_px)
  return text.float().numpy(), image.float().numpy()


def max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def rel_err(a, ref) -> float:
  """max |a - ref| / max |ref|."""
  ref = np.asarray(ref, np.float64)
  return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / np.max(np.abs(ref)))
