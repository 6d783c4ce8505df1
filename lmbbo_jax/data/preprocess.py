"""CLIP's image preprocessing on the host, and fixed-size batches decoded in threads.

`preprocess` matches CLIP's `Compose([Resize(n, BICUBIC), CenterCrop(n), ToTensor(),
Normalize(mean, std)])` on a PIL image, in NHWC float32: the shorter side is resized to
`size` with PIL's bicubic filter (the longer side to `int(size * long / short)`, as
torchvision computes it), then the center `size x size` crop (torchvision's rounding), /255,
normalised. With `crop=False` the whole image is resized to `size x size` (bicubic) instead,
as SigLIP's processor does.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from lmbbo_jax.data.task import FewShotTask, ImageLoadError, Item

def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
  """(width, height) after torchvision's `Resize(size)` (shorter side -> size)."""
  if width <= height:
    return size, int(size * height / width)
  return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
  """torchvision's CenterCrop box (left, top, right, bottom) for an image >= size."""
  left = int(round((width - size) / 2.0))
  top = int(round((height - size) / 2.0))
  return left, top, left + size, top + size


def preprocess(image_uint8: np.ndarray, size: int, mean: Sequence[float],
               std: Sequence[float], crop: bool = True) -> np.ndarray:
  """CLIP preprocessing of one RGB uint8 [H, W, 3] image to float32 [size, size, 3].

  `mean`, `std` and `crop` are the model's (`CLIPConfig.image_mean` / `image_std` /
  `image_crop`): the model owns its preprocessing, the data room only applies it.
  """
  image = Image.fromarray(np.ascontiguousarray(image_uint8, dtype=np.uint8))
  new_size = resized_size(image.width, image.height, size) if crop else (size, size)
  if new_size != image.size:
    image = image.resize(new_size, Image.Resampling.BICUBIC)
  if crop:
    image = image.crop(center_crop_box(image.width, image.height, size))
  pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
  return ((pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(
      np.float32)


@dataclasses.dataclass
class Batch:
  """A fixed-size batch; rows where `mask` is False are zero padding (label -1, ref "")."""
  pixels: np.ndarray  # float32 [batch_size, size, size, 3]
  labels: np.ndarray  # int32 [batch_size]
  mask: np.ndarray  # bool [batch_size]
  refs: list[str]


class BatchIterator:
  """An iterator of a split's `Batch`es in order; decoding runs in threads with prefetch.

  Every batch has exactly `batch_size` rows, so a jitted consumer never recompiles.
  Unreadable images are logged with their ref, recorded in `skipped` as (ref, reason),
  passed to `on_skip` if given, and left as masked rows.
  """

  def __init__(self, task: FewShotTask, split: str, *, size: int, batch_size: int,
               mean: Sequence[float], std: Sequence[float], crop: bool = True,
               num_threads: int = 4, prefetch: int = 2,
               progress: Callable[[int, int], None] | None = None,
               on_skip: Callable[[str, str], None] | None = None):
    if batch_size < 1 or size < 1:
      raise ValueError(f"batch_size and size must be >= 1, got {batch_size}, {size}")
    self.items: list[Item] = list(getattr(task, split))
    self.task, self.split = task, split
    self.size, self.batch_size = size, batch_size
    self.mean, self.std, self.crop = tuple(mean), tuple(std), crop
    self.num_threads = max(1, num_threads)
    self.prefetch = max(0, prefetch)
    self.progress, self.on_skip = progress, on_skip
    self.skipped: list[tuple[str, str]] = []
    self.num_batches = -(-len(self.items) // batch_size)
    self._batches: Iterator[Batch] | None = None

  def __len__(self) -> int:
    return self.num_batches

  def _decode(self, item: Item) -> np.ndarray | str:
    try:
      return preprocess(self.task.load_image(item), self.size, self.mean, self.std, self.crop)
    except ImageLoadError as e:
      return str(e)
    except Exception as e:  # A bad image must never stop the run.
      return f"cannot preprocess image {item.ref!r}: {type(e).__name__}: {e}"

  def _assemble(self, chunk: list[Item], results: list[np.ndarray | str]) -> Batch:
    pixels = np.zeros((self.batch_size, self.size, self.size, 3), np.float32)
    labels = np.full((self.batch_size,), -1, np.int32)
    mask = np.zeros((self.batch_size,), bool)
    refs = [""] * self.batch_size
    for row, (item, result) in enumerate(zip(chunk, results)):
      if isinstance(result, str):
        logging.warning("skipping unreadable image: %s", result)
        self.skipped.append((item.ref, result))
        if self.on_skip is not None:
          self.on_skip(item.ref, result)
        continue
      pixels[row] = result
      labels[row] = item.label
      mask[row] = True
      refs[row] = item.ref
    return Batch(pixels, labels, mask, refs)

  def __iter__(self) -> BatchIterator:
    """Starts (or restarts) a pass over the split."""
    self.close()
    self._batches = self._generate()
    return self

  def __next__(self) -> Batch:
    if self._batches is None:
      self._batches = self._generate()
    return next(self._batches)

  def close(self) -> None:
    """Stops a pass early: queued decodes are cancelled, running ones finish."""
    if self._batches is not None:
      self._batches.close()  # type: ignore[attr-defined]
      self._batches = None

  def _generate(self) -> Iterator[Batch]:
    chunks = [self.items[i:i + self.batch_size]
              for i in range(0, len(self.items), self.batch_size)]
    done = 0
    self.skipped = []
    with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
      pending: collections.deque = collections.deque()
      next_chunk = 0
      try:
        while next_chunk < len(chunks) or pending:
          # Keep the current batch plus `prefetch` more in flight.
          while next_chunk < len(chunks) and len(pending) <= self.prefetch:
            chunk = chunks[next_chunk]
            pending.append((chunk, [pool.submit(self._decode, it) for it in chunk]))
            next_chunk += 1
          chunk, futures = pending.popleft()
          batch = self._assemble(chunk, [f.result() for f in futures])
          done += len(chunk)
          if self.progress is not None:
            self.progress(done, len(self.items))
          yield batch
      finally:
        for _, futures in pending:
          for f in futures:
            f.cancel()


def iter_batches(task: FewShotTask, split: str, *, size: int, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], crop: bool = True,
                 num_threads: int = 4, prefetch: int = 2,
                 progress: Callable[[int, int], None] | None = None,
                 on_skip: Callable[[str, str], None] | None = None) -> BatchIterator:
  """Fixed-size CLIP-preprocessed batches of `task.<split>`; see `BatchIterator`.

  The returned object is iterable (each iteration starts over) and keeps `skipped`, the
  (ref, reason) pairs of images that could not be read.
  """
  return BatchIterator(task, split, size=size, batch_size=batch_size, mean=mean, std=std,
                       crop=crop, num_threads=num_threads, prefetch=prefetch, progress=progress,
                       on_skip=on_skip)
