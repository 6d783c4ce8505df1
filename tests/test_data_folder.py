"""Plain image folders and the seeded few-shot sampling."""

import shutil

import numpy as np
import pytest

from lmbbo_jax.data import DatasetError, Item, build_task
from lmbbo_jax.data import sampling

import data_helpers


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder") / "my data"
  data_helpers.make_class_tree(root, data_helpers.AWKWARD_NAMES, per_class=12)
  (root / "empty class").mkdir()
  (root / ".hidden").mkdir()
  data_helpers.write_image(root / ".hidden" / "x.png", 1)
  (root / "a b c" / "notes.txt").write_text("not an image")
  return root


def _rel(task, items):
  root = task.info["root"]
  return [(it.ref[len(root) + 1:], it.label) for it in items]


def test_classes_sorted_verbatim_and_empty_skipped(tree):
  task = build_task(f"folder:{tree}", 1, 1)
  assert task.class_names == sorted(data_helpers.AWKWARD_NAMES)
  assert task.name == f"folder:{tree.resolve()}"
  assert task.source == "folder"


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_shot_counts_and_disjoint_splits(tree, shots):
  task = build_task(f"folder:{tree}", shots, 1)
  n = len(task.class_names)
  # 12 images/class -> pools of 6 train, 2 val (round(2.4)), 4 test per class.
  assert len(task.train) == n * min(shots, 6)
  assert len(task.val) == n * min(min(4, shots), 2)
  assert len(task.test) == n * 4
  refs = [set(it.ref for it in s) for s in (task.train, task.val, task.test)]
  assert not (refs[0] & refs[1] or refs[0] & refs[2] or refs[1] & refs[2])
  for split in (task.train, task.val, task.test):
    for item in split:
      assert task.class_names[item.label] in item.ref  # label matches its folder


def test_val_shots_is_min_4_k(tmp_path):
  data_helpers.make_class_tree(tmp_path / "d", ["x", "y"], per_class=40)
  for shots in (1, 2, 4, 8, 16):
    task = build_task(f"folder:{tmp_path / 'd'}", shots, 3)
    per_class = np.bincount([it.label for it in task.val], minlength=2)
    assert per_class.tolist() == [min(4, shots)] * 2
    assert np.bincount([it.label for it in task.train]).tolist() == [shots] * 2


def test_reproducible_and_seed_dependent(tree):
  a, b = build_task(f"folder:{tree}", 2, 1), build_task(f"folder:{tree}", 2, 1)
  assert a.train == b.train and a.val == b.val and a.test == b.test
  assert a.fingerprint("train") == b.fingerprint("train")
  others = [build_task(f"folder:{tree}", 2, s) for s in (2, 3)]
  trains = {tuple(t.train) for t in [a, *others]}
  assert len(trains) == 3
  # The test set never depends on the few-shot seed.
  assert all(t.test == a.test for t in others)
  assert a.fingerprint("train") != others[0].fingerprint("train")


def test_same_images_after_moving_the_folder(tree, tmp_path):
  moved = tmp_path / "elsewhere" / tree.name
  shutil.copytree(tree, moved)
  a = build_task(f"folder:{tree}", 4, 2)
  b = build_task(f"folder:{moved}", 4, 2)
  for split in ("train", "val", "test"):
    assert _rel(a, getattr(a, split)) == _rel(b, getattr(b, split))


def test_predefined_split_folders(tmp_path):
  root = tmp_path / "pre"
  data_helpers.make_class_tree(root / "train", ["cat {}", "dog"], per_class=5)
  data_helpers.make_class_tree(root / "test", ["cat {}", "dog"], per_class=3)
  task = build_task(f"folder:{root}", 2, 1)
  assert task.class_names == ["cat {}", "dog"]
  assert len(task.test) == 6 and all("/test/" in it.ref for it in task.test)
  assert len(task.train) == 4 and len(task.val) == 4  # val from the train pool
  assert not {it.ref for it in task.train} & {it.ref for it in task.val}


def test_load_image_and_fingerprint(tree):
  task = build_task(f"folder:{tree}", 1, 1)
  image = task.load_image(task.train[0])
  assert image.dtype == np.uint8 and image.shape == (9, 12, 3)
  assert set(task.splits()) == {"train", "val", "test"}
  with pytest.raises(KeyError):
    task.fingerprint("nope")


def test_max_test_per_class(tree):
  task = build_task(f"folder:{tree}", 1, 1, max_test_per_class=1)
  assert np.bincount([it.label for it in task.test]).tolist() == [1] * 6


@pytest.mark.parametrize("spec, match", [
    ("folder:/definitely/not/here", "not a directory"),
    ("folder:", "needs a value"),
])
def test_bad_folder(spec, match):
  with pytest.raises(DatasetError, match=match):
    build_task(spec, 1, 1)


def test_folder_without_images(tmp_path):
  (tmp_path / "a").mkdir()
  with pytest.raises(DatasetError, match="no class sub-folders with images"):
    build_task(f"folder:{tmp_path}", 1, 1)


def test_bad_shots_and_seed(tree):
  with pytest.raises(DatasetError, match="shots"):
    build_task(f"folder:{tree}", 0, 1)
  with pytest.raises(DatasetError, match="seed"):
    build_task(f"folder:{tree}", 1, "1")


def test_sampling_ignores_input_order():
  items = [Item(f"c{l}/{i}.jpg", l) for l in range(3) for i in range(10)]
  key = lambda it: it.ref
  a = sampling.sample_few_shot(items, None, dataset="d", shots=2, seed=5, key_fn=key)
  b = sampling.sample_few_shot(items[::-1], None, dataset="d", shots=2, seed=5, key_fn=key)
  assert a == b
  c = sampling.sample_few_shot(items, None, dataset="other", shots=2, seed=5, key_fn=key)
  assert a != c


def test_sampling_with_small_classes():
  items = [Item("a/0", 0), Item("b/0", 1), Item("b/1", 1)]
  train, val = sampling.sample_few_shot(items, None, dataset="d", shots=4, seed=1,
                                        key_fn=lambda it: it.ref)
  assert len(train) == 3 and val == []  # CoOp takes what exists, never repeats
  tr, va, te = sampling.split_per_class(items, dataset="d", key_fn=lambda it: it.ref)
  assert len(tr) == 2 and len(va) == 0 and len(te) == 1
