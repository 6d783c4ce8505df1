"""Image files on disk: listing and stable (root-relative) keys."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

from lmbbo_jax.data.task import Item

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def is_image_file(name: str) -> bool:
  return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: pathlib.Path) -> list[pathlib.Path]:
  """Image files below `folder` (recursive, hidden entries skipped), sorted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    found.extend(pathlib.Path(dirpath, f) for f in filenames if is_image_file(f))
  return sorted(found)


def subdirs(folder: pathlib.Path) -> list[str]:
  """Names of visible sub-folders, sorted by code point (like CoOp's `sorted`)."""
  return sorted(e.name for e in os.scandir(folder)
                if e.is_dir(follow_symlinks=True) and not e.name.startswith("."))


def relative_key(root: pathlib.Path) -> Callable[[Item], str]:
  """Key function: the item's path relative to `root`, with `/` separators."""
  prefix = str(root).rstrip(os.sep) + os.sep

  def key(item: Item) -> str:
    ref = item.ref
    if ref.startswith(prefix):
      ref = ref[len(prefix):]
    return ref.replace(os.sep, "/")

  return key
