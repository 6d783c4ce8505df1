"""Plain image folders: `root/<class name>/*.jpg` (optionally `root/{train,val,test}/...`).

Classes are the sub-folder names, sorted by code point, used verbatim as class names
(spaces, unicode, quotes and braces are kept). Without predefined splits each class is
divided 50/20/30 into train/val/test pools with a seed-independent key (CoOp's ratios),
so the test set is the same for every few-shot seed.
"""

from __future__ import annotations

import logging
import pathlib

from lmbbo_jax.data import paths, sampling
from lmbbo_jax.data.task import DatasetError, FewShotTask, Item

_SPLIT_DIRS = ("train", "val", "test")


def _items_for(folder: pathlib.Path, classes: list[str]) -> list[Item]:
  items = []
  for label, name in enumerate(classes):
    class_dir = folder / name
    if class_dir.is_dir():
      items.extend(Item(str(p), label) for p in paths.list_images(class_dir))
  return items


def build_folder_task(path: str, shots: int, seed: int, *,
                      max_test_per_class: int | None = None) -> FewShotTask:
  """A task from a plain image folder.

  Args:
    path: the folder; either `path/<class>/...` or `path/{train,test}[,val]/<class>/...`.
    shots: train images per class.
    seed: few-shot seed.
    max_test_per_class: optional cap on test images per class.

  Returns:
    The FewShotTask named `folder:<absolute path>`.
  """
  root = pathlib.Path(path).expanduser()
  if not root.is_dir():
    raise DatasetError(f"folder:{path} is not a directory; pass --dataset=folder:/path "
                       "with one sub-folder of images per class")
  root = root.resolve()
  dataset_key = f"folder:{root.name}"
  key_fn = paths.relative_key(root)
  top = paths.subdirs(root)
  predefined = "train" in top and "test" in top
  if predefined:
    classes = paths.subdirs(root / "train")
    extra = sorted(set(paths.subdirs(root / "test")) - set(classes))
    if extra:
      raise DatasetError(f"folder:{root}: test classes {extra[:3]} have no train folder; "
                         "every class needs root/train/<class>/")
    train_pool = _items_for(root / "train", classes)
    val_pool = _items_for(root / "val", classes) if "val" in top else None
    test = _items_for(root / "test", classes)
  else:
    candidates = top
    classes = [c for c in candidates if paths.list_images(root / c)]
    empty = sorted(set(candidates) - set(classes))
    if empty:
      logging.warning("folder:%s: skipping %d class folder(s) without images: %s",
                      root, len(empty), empty[:5])
    pool = _items_for(root, classes)
    train_pool, val_pool, test = sampling.split_per_class(
        pool, dataset=dataset_key, key_fn=key_fn)
  if not classes:
    raise DatasetError(f"folder:{root} has no class sub-folders with images "
                       f"(extensions: {', '.join(sorted(paths.IMAGE_EXTENSIONS))})")
  train, val = sampling.sample_few_shot(
      train_pool, val_pool, dataset=dataset_key, shots=shots, seed=seed, key_fn=key_fn)
  test = sampling.cap_per_class(test, max_test_per_class, dataset=dataset_key,
                                key_fn=key_fn)
  return FewShotTask(
      f"folder:{root}", classes, train, val, test, shots=shots, seed=seed,
      source="folder",
      info={"root": str(root), "split": "predefined" if predefined else "seeded 50/20/30",
            "pool_sizes": {"train": len(train_pool),
                           "val": len(val_pool) if val_pool is not None else None}})
