"""Shared helpers for tests/test_data_*.py: small generated image trees."""

from __future__ import annotations

import io
import json
import pathlib
import tarfile

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


# CLIP_benchmark's webdataset layout (tests/test_data_wds.py).
WDS_CLASSES = ["café ünïcode", "brace {} x", "quote ' and \"", "Zebra", "日本語"]
TEMPLATES_TXT = ["a photo of a {c}.", "itap of my {c}!", "no slot here", "a {0} bad {c}",
                 "  a {c} with spaces.  ", "a photo of a {c}."]
FORMATS = ("png", "webp", "jpg")


def image_bytes(seed: int, fmt: str) -> tuple[bytes, np.ndarray]:
  array = np.random.default_rng(seed).integers(0, 256, size=(9, 12, 3), dtype=np.uint8)
  out = io.BytesIO()
  kwargs = {"lossless": True} if fmt == "webp" else {}
  Image.fromarray(array).save(out, format={"jpg": "JPEG"}.get(fmt, fmt.upper()), **kwargs)
  return out.getvalue(), array


def write_tar(path: pathlib.Path, members: list[tuple[str, bytes]]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def write_split(root: pathlib.Path, split: str, shards: list[list[tuple[str, bytes]]]) -> None:
  for i, members in enumerate(shards):
    write_tar(root / split / f"{i}.tar", members)
  (root / split / "nshards.txt").write_text(f"{len(shards)}\n")


def make_wds(root: pathlib.Path, per_class: dict[str, int], *, corrupt: bool = True,
             templates: bool = True) -> dict[str, dict[str, tuple[int, np.ndarray | None]]]:
  """A CLIP_benchmark wds folder: `per_class` good samples per class and split (over two
  train shards), plus one sample of each corrupt kind in train and a bad image in test.

  Returns split -> ref -> (label, pixels; None for lossy JPEG) of the good samples.
  """
  root.mkdir(parents=True, exist_ok=True)
  (root / "classnames.txt").write_text("\n".join(WDS_CLASSES) + "\n", encoding="utf-8")
  if templates:
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES_TXT) + "\n")
  (root / "dataset_type.txt").write_text("classification\n")
  good: dict[str, dict] = {}
  seed = 0
  for split, count in per_class.items():
    shards: list[list[tuple[str, bytes]]] = [[], []] if split == "train" else [[]]
    good[split] = {}
    for label in range(len(WDS_CLASSES)):
      for i in range(count):
        seed += 1
        fmt = FORMATS[seed % len(FORMATS)]
        data, pixels = image_bytes(seed, fmt)
        key = f"s{seed:07d}"
        shard = seed % len(shards)
        shards[shard] += [(f"{key}.{fmt}", data), (f"{key}.cls", f"{label}\n".encode())]
        good[split][f"{split}/{shard}.tar/{key}"] = (label, None if fmt == "jpg" else pixels)
    if corrupt and split == "train":
      png, _ = image_bytes(999, "png")
      shards[0] += [("bad_bytes.png", b"\x89PNG not really"), ("bad_bytes.cls", b"0"),
                    ("no_label.png", png),
                    ("no_image.cls", b"1"),
                    ("text_label.png", png), ("text_label.cls", b"one"),
                    ("big_label.png", png), ("big_label.cls", b"5"),
                    ("readme.txt", b"ignored member")]
    if corrupt and split == "test":
      shards[0] += [("bad_test.webp", b"RIFF....WEBPjunk"), ("bad_test.cls", b"2")]
    write_split(root, split, shards)
  return good
