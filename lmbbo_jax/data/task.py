"""`FewShotTask`: class names plus k-shot train, val and full test items of one benchmark."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
  """A dataset source that cannot be used; the message says how to fix it (one line)."""


class ImageLoadError(OSError):
  """An image that cannot be read or decoded; the message names its reference."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One labelled image.

  Attributes:
    ref: how to find the image: a file path, a TFDS `split:index`, or a generator key.
    label: class index into the task's `class_names`.
  """
  ref: str
  label: int


def decode_image(source: str | bytes | np.ndarray) -> np.ndarray:
  """Decodes a file path, encoded bytes or an array into RGB uint8 [H, W, 3].

  PIL does the decoding, as CLIP's own preprocessing does; grey, palette, CMYK and alpha
  images are converted to RGB.
  """
  if isinstance(source, np.ndarray):
    array = source
    if array.ndim == 2:
      array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
      array = np.repeat(array, 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
      array = array[:, :, :3]
    if array.ndim != 3 or array.shape[2] != 3:
      raise ValueError(f"image array of shape {array.shape} is not [H, W, 3]")
    return np.ascontiguousarray(array, dtype=np.uint8)
  stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
  with Image.open(stream) as image:
    image.load()
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


class FewShotTask:
  """Ordered class names and the train (k-shot), val (min(4, k)-shot) and test items.

  The default image loader reads `item.ref` as a file path; sources with other
  references pass `loader` (called with the item) or subclass and override `_load`.
  """

  def __init__(
      self,
      name: str,
      class_names: Sequence[str],
      train: Sequence[Item],
      val: Sequence[Item],
      test: Sequence[Item],
      *,
      shots: int,
      seed: int,
      loader: Callable[[Item], Any] | None = None,
      source: str = "",
      info: dict[str, Any] | None = None,
      templates: Sequence[str] = (),
  ):
    """Builds a task; items are checked against the class list.

    Args:
      name: canonical dataset string, e.g. "caltech101" or "coop:/data/dtd".
      class_names: class names in label order (untrusted text, kept verbatim).
      train: the k-shot train items.
      val: the few-shot val items.
      test: the full (or capped) test items.
      shots: k.
      seed: the few-shot seed.
      loader: returns a path, encoded bytes or an array for an item (default: the ref as
        a path).
      source: short source kind for `describe()` ("tfds", "coop", "folder", ...).
      info: extra facts for `describe()` (JSON-serialisable).
      templates: the source's own zero-shot templates with `{}` slots (a CLIP_benchmark
        wds folder's), kept as `dataset_templates`; empty when it has none.
    """
    self.name = name
    self.class_names = [str(c) for c in class_names]
    self.train = list(train)
    self.val = list(val)
    self.test = list(test)
    self.shots = shots
    self.seed = seed
    self.source = source
    self.info = dict(info or {})
    self.dataset_templates = list(templates)
    self._loader = loader
    if not self.class_names:
      raise DatasetError(f"{name}: no classes found; check the dataset path")
    num = len(self.class_names)
    for split, items in self.splits().items():
      for item in items:
        if not 0 <= item.label < num:
          raise DatasetError(
              f"{name}: {split} item {item.ref!r} has label {item.label} outside "
              f"0..{num - 1}; the split file does not match the class list")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def splits(self) -> dict[str, list[Item]]:
    """The non-empty splits, in train/val/test order."""
    return {s: getattr(self, s) for s in SPLITS if getattr(self, s)}

  def _load(self, item: Item) -> Any:
    if self._loader is not None:
      return self._loader(item)
    return item.ref

  def load_image(self, item: Item) -> np.ndarray:
    """RGB uint8 [H, W, 3] for `item`; raises ImageLoadError naming the ref."""
    try:
      return decode_image(self._load(item))
    except ImageLoadError:
      raise
    except Exception as e:  # Any decoder failure is a bad image, not a crash.
      raise ImageLoadError(f"cannot load image {item.ref!r}: {type(e).__name__}: {e}") from e

  def fingerprint(self, split: str) -> str:
    """sha256 over the class names and the split's refs and labels (a cache key)."""
    items = getattr(self, split) if split in SPLITS else None
    if items is None:
      raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
    digest = hashlib.sha256()
    digest.update(json.dumps(self.class_names, ensure_ascii=False).encode("utf-8"))
    for item in items:
      digest.update(b"\x00")
      digest.update(json.dumps([item.ref, item.label], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()

  def describe(self, num_names: int = 5) -> dict[str, Any]:
    """A JSON-serialisable summary (what the inspect CLI prints)."""
    return {
        "name": self.name,
        "source": self.source,
        "num_classes": self.num_classes,
        "shots": self.shots,
        "seed": self.seed,
        "splits": {s: len(getattr(self, s)) for s in SPLITS},
        "class_names_head": self.class_names[:num_names],
        **self.info,
    }

  def __repr__(self) -> str:
    counts = ", ".join(f"{s}={len(getattr(self, s))}" for s in SPLITS)
    return (f"FewShotTask({self.name!r}, classes={self.num_classes}, shots={self.shots}, "
            f"seed={self.seed}, {counts})")
