"""Seeded, platform-independent few-shot sampling and per-class splitting.

Every choice ranks a class's candidates by sha256(salt, stable key) and takes a prefix.
The stable key is machine-independent (a path relative to the dataset root, or a TFDS
`split:index`), so the same (dataset, shots, seed) gives the same images on any machine
and any numpy version. Candidates are sorted by key first, so ties and listing order never
matter.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable, Iterable, Sequence

from lmbbo_jax.data.task import Item

KeyFn = Callable[[Item], str]

# CoOp's own random splits are 50% train, 20% val, 30% test per class.
COOP_RATIOS = (0.5, 0.2)
MAX_VAL_SHOTS = 4


def _rank_value(salt: str, key: str) -> bytes:
  return hashlib.sha256(f"{salt}\x1f{key}".encode("utf-8")).digest()


def by_class(items: Iterable[Item]) -> dict[int, list[Item]]:
  """Items grouped by label, labels ascending."""
  groups: dict[int, list[Item]] = collections.defaultdict(list)
  for item in items:
    groups[item.label].append(item)
  return dict(sorted(groups.items()))


def ranked(items: Sequence[Item], key_fn: KeyFn, salt: str) -> list[Item]:
  """`items` in their seeded order (sorted by key first, then by hash rank)."""
  keyed = sorted(((key_fn(it), it) for it in items), key=lambda pair: pair[0])
  keyed.sort(key=lambda pair: _rank_value(salt, pair[0]))
  return [it for _, it in keyed]


def salt_for(dataset: str, shots: int, seed: int, purpose: str) -> str:
  return f"{dataset}|shots={shots}|seed={seed}|{purpose}"


def val_shots(shots: int) -> int:
  return min(MAX_VAL_SHOTS, shots)


def sample_few_shot(
    train_pool: Sequence[Item],
    val_pool: Sequence[Item] | None,
    *,
    dataset: str,
    shots: int,
    seed: int,
    key_fn: KeyFn,
) -> tuple[list[Item], list[Item]]:
  """CoOp few-shot sets: `shots` train and min(4, shots) val images per class.

  Args:
    train_pool: all train items.
    val_pool: all val items, or None to draw val shots from the train pool (disjoint from
      the train shots).
    dataset: stable dataset key (part of the seed).
    shots: k >= 1.
    seed: any int.
    key_fn: stable, machine-independent key of an item.

  Returns:
    (train, val), each ordered by label then key. A class with fewer candidates than
    asked gives all it has (CoOp does not repeat images).
  """
  if shots < 1:
    raise ValueError(f"shots must be >= 1, got {shots}")
  k_val = val_shots(shots)
  train, val = [], []
  for _, items in by_class(train_pool).items():
    order = ranked(items, key_fn, salt_for(dataset, shots, seed, "train"))
    train.extend(order[:shots])
    if val_pool is None:
      val.extend(order[shots:shots + k_val])
  if val_pool is not None:
    for _, items in by_class(val_pool).items():
      order = ranked(items, key_fn, salt_for(dataset, shots, seed, "val"))
      val.extend(order[:k_val])
  sort_key = lambda it: (it.label, key_fn(it))
  return sorted(train, key=sort_key), sorted(val, key=sort_key)


def split_per_class(
    items: Sequence[Item],
    *,
    dataset: str,
    key_fn: KeyFn,
    ratios: tuple[float, float] = COOP_RATIOS,
) -> tuple[list[Item], list[Item], list[Item]]:
  """Seed-independent train/val/test split per class with CoOp's rounding.

  The test set is the same for every few-shot seed. A class keeps at least one train
  image; val and test get what is left (a class of 1-2 images may have no val/test).
  """
  train, val, test = [], [], []
  p_train, p_val = ratios
  for _, group in by_class(items).items():
    order = ranked(group, key_fn, f"{dataset}|split")
    n = len(order)
    n_train = max(1, round(n * p_train))
    n_val = round(n * p_val)
    if n - n_train - n_val < 1 and n >= 3:
      n_val = max(0, n - n_train - 1)  # Keep a test image when there are enough.
    train.extend(order[:n_train])
    val.extend(order[n_train:n_train + n_val])
    test.extend(order[n_train + n_val:])
  sort_key = lambda it: (it.label, key_fn(it))
  return sorted(train, key=sort_key), sorted(val, key=sort_key), sorted(test, key=sort_key)


def cap_per_class(items: Sequence[Item], limit: int | None, *, dataset: str,
                  key_fn: KeyFn) -> list[Item]:
  """At most `limit` items per class (a seed-independent subset), order kept."""
  if limit is None:
    return list(items)
  if limit < 1:
    raise ValueError(f"max_test_per_class must be >= 1, got {limit}")
  keep: set[int] = set()
  for _, group in by_class(items).items():
    for it in ranked(group, key_fn, f"{dataset}|test-cap")[:limit]:
      keep.add(id(it))
  return [it for it in items if id(it) in keep]
