"""Shared helpers for tests/test_data_*.py: small generated image trees."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image

# Class names that must survive every step untouched.
AWKWARD_NAMES = ["a b c", "café ünïcode", "brace {} x", "quote ' and \"", "Zebra", "日本語"]


def write_image(path: pathlib.Path, seed: int, size: tuple[int, int] = (12, 9),
                fmt: str | None = None) -> None:
  """Writes a small deterministic RGB image (PNG unless the suffix says otherwise)."""
  rng = np.random.default_rng(seed)
  array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, format=fmt)


def make_class_tree(root: pathlib.Path, classes: list[str], per_class: int,
                    suffix: str = ".png") -> dict[str, list[pathlib.Path]]:
  """root/<class>/img_XX<suffix> with `per_class` images each; returns the paths."""
  out = {}
  for ci, name in enumerate(classes):
    paths = []
    for i in range(per_class):
      p = root / name / f"img_{i:02d}{suffix}"
      write_image(p, seed=ci * 1000 + i)
      paths.append(p)
    out[name] = paths
  return out


def make_coop_dataset(dataset_dir: pathlib.Path, image_subdir: str, split_name: str,
                      classes: list[str], per_split: tuple[int, int, int]) -> dict:
  """A CoOp-style dataset folder: images under `image_subdir` plus a split json.

  Returns the split dict that was written.
  """
  image_root = dataset_dir / image_subdir if image_subdir else dataset_dir
  split = {"train": [], "val": [], "test": []}
  counter = 0
  for label, name in enumerate(classes):
    folder = name.replace(" ", "_")
    for s, n in zip(("train", "val", "test"), per_split):
      for _ in range(n):
        rel = f"{folder}/{folder}_{counter:04d}.jpg"
        write_image(image_root / rel, seed=counter, fmt="JPEG")
        split[s].append([rel, label, folder])
        counter += 1
  dataset_dir.mkdir(parents=True, exist_ok=True)
  with open(dataset_dir / split_name, "w", encoding="utf-8") as f:
    json.dump(split, f, ensure_ascii=False)
  return split
