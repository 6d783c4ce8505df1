"""Shipped class names (CoOp label order, as the paper uses them) and OpenAI's templates."""

from __future__ import annotations

import functools
import json

from lmbbo_jax import extensions
from lmbbo_jax import templates as templates_lib
from lmbbo_jax.data import registry
from lmbbo_jax.data.resources import third_party_path
from lmbbo_jax.data.task import DatasetError

CLASSNAMES_FILE = ("coop_classnames", "classnames.json")
TEMPLATES_FILE = ("openai_clip_templates", "templates.json")
WNIDS_FILE = ("coop_classnames", "imagenet_wnids.txt")


@functools.cache
def _load(parts: tuple[str, ...]) -> dict[str, list[str]]:
  path = third_party_path(*parts)
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    raise DatasetError(f"shipped data file {path} is missing ({e.strerror}); reinstall "
                       "lmbbo_jax with its third_party data") from e
  if not isinstance(data, dict) or not all(
      isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()):
    raise DatasetError(f"shipped data file {path} is not a {{name: [str, ...]}} map")
  return data


def _key(dataset: str) -> str:
  # A benchmark name, or a --dataset value that reads one (`coop:`, `tfds:`, `wds:`).
  info = registry.lookup(dataset) or registry.for_dataset(dataset)
  if info is None:
    known = ", ".join(registry.DATASETS)
    raise DatasetError(f"no shipped class names for {dataset!r}; known: {known}")
  return info.name


def class_names(dataset: str) -> list[str]:
  """Class names of a benchmark in CoOp label order (any accepted alias works)."""
  key = _key(dataset)
  names = _load(CLASSNAMES_FILE).get(key)
  if names is None:
    raise DatasetError(f"shipped class-name file has no list for {key!r}")
  return list(names)


def hand_templates(dataset: str) -> list[str]:
  """OpenAI's hand-engineered CLIP templates for a benchmark, with `{}` slots.

  `dataset` may be a `--dataset` value that reads a benchmark (`coop:PATH`,
  `wds:hf:clip-benchmark/wds_cars`, ...; `registry.for_dataset`).

  A dataset prefix registered under the extension kind "hand_templates" (the toy
  world's `toy:`) gives its own list.
  """
  for prefix in extensions.names("hand_templates"):
    if dataset.startswith(prefix):
      return list(extensions.lookup("hand_templates", prefix))
  key = _key(dataset)
  found = _load(TEMPLATES_FILE).get(key)
  if found is None:
    raise DatasetError(f"shipped template file has no list for {key!r}")
  # `{c}` (clip_benchmark's slot) is accepted too, in case the file is regenerated.
  out = [t.replace("{c}", templates_lib.SLOT) for t in found]
  bad = [t for t in out if templates_lib.invalid_reason(t)]
  if bad:
    raise DatasetError(f"shipped template {bad[0]!r} for {key!r} is invalid: "
                       f"{templates_lib.invalid_reason(bad[0])}")
  return out


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
  """The 1000 ImageNet synset ids in label order (CoOp's folder names)."""
  path = third_party_path(*WNIDS_FILE)
  try:
    text = path.read_text(encoding="utf-8")
  except OSError as e:
    raise DatasetError(f"shipped data file {path} is missing ({e.strerror}); reinstall "
                       "lmbbo_jax with its third_party data") from e
  return tuple(line.strip() for line in text.splitlines() if line.strip())
