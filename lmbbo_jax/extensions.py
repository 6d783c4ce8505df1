"""Named extensions that the lower rooms look up and the top of the package fills.

A lower room (models, data) asks `lookup(kind, name)` for, say, the tokenizer
of kind "toy" or the dataset prefix "toy:", and never imports who provides it.
Entries are registered by `lmbbo_jax/__init__.py` (the wiring) as
"module:attribute" strings, imported on first use, so registering costs nothing.

Kinds: "tokenizer" (config.json tokenizer kind -> `from_file(path, context_length=)`),
"checkpoint" (a model name -> a function returning its directory), "dataset"
(a `--dataset` prefix -> `build(name, shots, seed) -> FewShotTask`), "hand_templates"
(a `--dataset` prefix -> the hand-engineered templates of its baselines).
"""

from __future__ import annotations

import importlib
from typing import Any

_ENTRIES: dict[tuple[str, str], Any] = {}


def register(kind: str, name: str, target: Any) -> None:
  """Registers `target` (an object or a "module:attribute" string) as `name` of `kind`."""
  _ENTRIES[(kind, name)] = target


def names(kind: str) -> list[str]:
  return sorted(n for k, n in _ENTRIES if k == kind)


def lookup(kind: str, name: str) -> Any | None:
  """The registered object (its module imported on first use), or None."""
  target = _ENTRIES.get((kind, name))
  if isinstance(target, str):
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
      obj = getattr(obj, part)
    target = _ENTRIES[(kind, name)] = obj
  return target
