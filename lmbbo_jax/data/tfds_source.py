"""The benchmarks that TFDS has, read through `tfds.data_source` (ArrayRecord, no TensorFlow).

TFDS labels are mapped onto CoOp's label order and class names (`classnames.py`). For
every dataset here the TFDS label order already equals CoOp's, except Caltech101, where
CoOp drops `BACKGROUND_Google` and `Faces_easy` and sorts the remaining folder names
case-sensitively (`Faces`, `Leopards`, `Motorbikes` first). How each TFDS split differs
from CoOp's `split_zhou` files is in `registry.DatasetInfo.tfds_note` and the README.

Images are read undecoded (`SkipDecoding`) and decoded with PIL like CLIP's own pipeline;
where that is not possible (TFDS's mock data) decoded arrays are used as they come.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from lmbbo_jax.data import classnames, registry, sampling
from lmbbo_jax.data.task import DatasetError, FewShotTask, Item

_CALTECH_FOLDERS = {"background_google": "BACKGROUND_Google", "faces": "Faces",
                    "faces_easy": "Faces_easy", "leopards": "Leopards",
                    "motorbikes": "Motorbikes"}
_CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
_LABEL_CHUNK = 1024


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DatasetError("TFDS sources need tensorflow-datasets and array-record: pip install "
                       "'lmbbo_jax[tfds]', or use --dataset=coop:/path/to/DATA/<dir>") from e
  return tfds


def caltech_label_map(tfds_names: list[str]) -> list[int | None]:
  """TFDS caltech101 label -> CoOp label (None for the two classes CoOp drops)."""
  folders = [_CALTECH_FOLDERS.get(n, n) for n in tfds_names]
  kept = sorted(f for f in folders if f not in _CALTECH_IGNORED)
  position = {f: i for i, f in enumerate(kept)}
  return [position.get(f) for f in folders]


def _not_prepared(info: registry.DatasetInfo, data_dir: str | None, err: Exception) -> DatasetError:
  where = f" under {data_dir}" if data_dir else " in the default TFDS data dir"
  manual = " --manual_dir=DIR_WITH_THE_TARS" if info.name == "imagenet" else ""
  return DatasetError(
      f"TFDS dataset {info.tfds_name!r} is not prepared{where} ({type(err).__name__}: "
      f"{str(err).splitlines()[0][:160] if str(err) else ''}); build it once with `tfds "
      f"build {info.tfds_name} --file_format=array_record{manual}` (needs TensorFlow and "
      f"network) and pass --data_dir, or use --dataset=coop:/path/to/DATA/{info.coop_dir}")


class _Source:
  """One TFDS split as a thread-safe random-access image source."""

  def __init__(self, tfds, info: registry.DatasetInfo, split: str, data_dir: str | None):
    self.split = split
    self._lock = threading.Lock()
    try:
      self._source = self._open(tfds, info, split, data_dir, skip_decoding=True)
    except Exception as first_error:  # pylint: disable=broad-except
      # TFDS's mock data (and builders whose images are not plain encoded bytes) cannot
      # skip decoding: read decoded arrays instead.
      try:
        self._source = self._open(tfds, info, split, data_dir, skip_decoding=False)
      except Exception as e:  # pylint: disable=broad-except
        raise _not_prepared(info, data_dir, e) from first_error

  @staticmethod
  def _open(tfds, info, split, data_dir, *, skip_decoding: bool):
    decoders = {"image": tfds.decode.SkipDecoding()} if skip_decoding else None
    source = tfds.data_source(info.tfds_name, split=split, data_dir=data_dir,
                              download=False, decoders=decoders)
    if len(source):
      _ = source[0]  # Reading one record surfaces format and decoding problems now.
    return source

  def __len__(self) -> int:
    return len(self._source)

  def labels(self) -> np.ndarray:
    out = np.empty(len(self), dtype=np.int64)
    batched = True
    for start in range(0, len(self), _LABEL_CHUNK):
      keys = list(range(start, min(len(self), start + _LABEL_CHUNK)))
      with self._lock:
        records = None
        if batched:
          try:
            records = self._source.__getitems__(keys)
          except TypeError:  # TFDS's mock has a broken __getitems__.
            batched = False
        if records is None:
          records = [self._source[k] for k in keys]
      out[start:start + len(keys)] = [int(r["label"]) for r in records]
    return out

  def image(self, index: int) -> Any:
    with self._lock:
      image = self._source[index]["image"]
    return image


def build_tfds_task(info: registry.DatasetInfo, shots: int, seed: int, *,
                    data_dir: str | None = None,
                    max_test_per_class: int | None = None) -> FewShotTask:
  """A task for a benchmark that TFDS has (see `registry.DATASETS[...].tfds_name`)."""
  if info.tfds_name is None:
    raise DatasetError(f"{info.name} is not available from TFDS ({info.tfds_note}); use "
                       f"--dataset=coop:/path/to/DATA/{info.coop_dir}")
  tfds = _import_tfds()
  class_list = classnames.class_names(info.name)
  split_names = [s for s in (info.tfds_train, info.tfds_val, info.tfds_test) if s]
  sources = {s: _Source(tfds, info, s, data_dir) for s in split_names}

  if info.name == "caltech101":
    names = tfds.builder(info.tfds_name, data_dir=data_dir).info.features["label"].names
    label_map = caltech_label_map(list(names))
  else:
    label_map = None

  def items_of(split: str) -> list[Item]:
    items = []
    for index, label in enumerate(sources[split].labels()):
      mapped = label_map[label] if label_map is not None else int(label)
      if mapped is None:
        continue
      if not 0 <= mapped < len(class_list):
        raise DatasetError(f"TFDS {info.tfds_name} {split}[{index}] has label {label}, "
                           f"outside the {len(class_list)} CoOp classes; rebuild the dataset")
      items.append(Item(f"{split}:{index}", mapped))
    return items

  key_fn = lambda item: item.ref
  train_pool = items_of(info.tfds_train)
  val_pool = items_of(info.tfds_val) if info.tfds_val else None
  if info.tfds_test:
    test = items_of(info.tfds_test)
  else:
    train_pool, val_pool, test = sampling.split_per_class(
        train_pool, dataset=f"tfds:{info.name}", key_fn=key_fn)
  train, val = sampling.sample_few_shot(
      train_pool, val_pool, dataset=info.name, shots=shots, seed=seed, key_fn=key_fn)
  test = sampling.cap_per_class(test, max_test_per_class, dataset=info.name, key_fn=key_fn)

  def loader(item: Item) -> Any:
    split, _, index = item.ref.rpartition(":")
    return sources[split].image(int(index))

  return FewShotTask(
      info.name, class_list, train, val, test, shots=shots, seed=seed, loader=loader,
      source="tfds",
      info={"tfds_name": info.tfds_name, "data_dir": data_dir,
            "tfds_splits": {"train": info.tfds_train, "val": info.tfds_val,
                            "test": info.tfds_test},
            "split_note": info.tfds_note,
            "pool_sizes": {"train": len(train_pool),
                           "val": len(val_pool) if val_pool is not None else None}})
