"""Where the shipped toy CLIP lies: config.json, params.msgpack, tokenizer.json.

Read it as any checkpoint, with `lmbbo_jax.models.load_clip("toyclip")` (the
name is registered in `lmbbo_jax/__init__.py`) or `load_clip(directory)` for
a checkpoint that `python -m lmbbo_jax.toyworld.train --out=DIR` wrote.
"""

from __future__ import annotations

import os

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
# The checkpoint's files, and its training log (recipe, curves, the accuracy gate).
FILES = ("config.json", "params.msgpack", "tokenizer.json", "train_log.json")


def assets_dir() -> str:
  """Where the shipped toy CLIP lies (registered as the "toyclip" checkpoint)."""
  return ASSETS_DIR
