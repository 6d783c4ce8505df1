"""Reads the shipped toy CLIP (config.json, params.msgpack, tokenizer.json) without the loader.

`load_clip("toyclip")` (lmbbo_jax.models) is the normal path; this module is
the toy world's own minimal reader, used by its evaluation script and tests so
they do not depend on anything but the files.
"""

from __future__ import annotations

import json
import os

from flax import serialization

from lmbbo_jax.models.configs import CLIPConfig
from lmbbo_jax.toyworld.tokenizer import ToyTokenizer

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def assets_dir() -> str:
  """Where the shipped toy CLIP lies (registered as the "toyclip" checkpoint)."""
  return ASSETS_DIR
FILES = ("config.json", "params.msgpack", "tokenizer.json", "train_log.json")


class ToyCheckpointError(FileNotFoundError):
  """The toy checkpoint directory is incomplete."""


def load_toy_checkpoint(directory: str = ASSETS_DIR):
  """(CLIPConfig, params dict of numpy arrays, ToyTokenizer) from a checkpoint directory."""
  for name in FILES[:3]:
    if not os.path.isfile(os.path.join(directory, name)):
      raise ToyCheckpointError(f"toy checkpoint {directory!r} lacks {name}; train one with "
                               "python -m lmbbo_jax.toyworld.train --out=DIR")
  with open(os.path.join(directory, "config.json")) as f:
    cfg_dict = json.load(f)
  config = CLIPConfig.from_dict(cfg_dict)
  with open(os.path.join(directory, "params.msgpack"), "rb") as f:
    params = serialization.msgpack_restore(f.read())
  tok = ToyTokenizer.from_file(os.path.join(directory, "tokenizer.json"),
                               context_length=config.text.context_length)
  return config, params, tok


def train_log(directory: str = ASSETS_DIR) -> dict:
  with open(os.path.join(directory, "train_log.json")) as f:
    return json.load(f)
