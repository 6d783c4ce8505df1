"""CoOp's dataset layouts on small generated trees."""

import json
import pickle

import numpy as np
import pytest

from lmbbo_jax.data import DatasetError, build_task, class_names
from lmbbo_jax.data import classnames as classnames_lib

import data_helpers

DTD = class_names("dtd")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("DATA")
  # A known benchmark: DTD with all 47 classes, 3 train / 2 val / 2 test images each.
  split = data_helpers.make_coop_dataset(
      root / "dtd", "images", "split_zhou_DescribableTextures.json", DTD, (3, 2, 2))
  # An unknown dataset with awkward class names, 6/5/2 per class.
  generic = data_helpers.make_coop_dataset(
      root / "my set", "imgs", "split_zhou_MySet.json",
      ["snow_leopard", "café {}", "it's \"quoted\""], (6, 5, 2))
  return root, split, generic


def test_known_dataset_uses_shipped_names(data_root):
  root, split, _ = data_root
  task = build_task(f"coop:{root / 'dtd'}", 1, 1)
  assert task.class_names == DTD
  assert task.name == f"coop:{(root / 'dtd').resolve()}"
  assert len(task.train) == 47 and len(task.val) == 47
  assert len(task.test) == len(split["test"]) == 94
  assert task.info["benchmark"] == "dtd" and task.info["fewshot"] == "seeded"
  image = task.load_image(task.test[0])
  assert image.shape == (9, 12, 3) and image.dtype == np.uint8


def test_items_come_from_their_split(data_root):
  root, split, _ = data_root
  task = build_task(f"coop:{root / 'dtd'}", 2, 3)
  image_root = str((root / "dtd" / "images").resolve()) + "/"
  for name in ("train", "val", "test"):
    allowed = {(image_root + rel, label) for rel, label, _ in split[name]}
    assert {(it.ref, it.label) for it in getattr(task, name)} <= allowed
  refs = [{it.ref for it in s} for s in (task.train, task.val, task.test)]
  assert not (refs[0] & refs[1] or refs[0] & refs[2] or refs[1] & refs[2])


def test_coop_name_with_data_dir(data_root):
  root, _, _ = data_root
  a = build_task("coop:dtd", 1, 2, data_dir=str(root))
  b = build_task(f"coop:{root / 'dtd'}", 1, 2)
  assert a.train == b.train and a.name == b.name


def test_generic_dataset_names_from_split_file(data_root):
  root, _, generic = data_root
  for shots in (1, 2, 4, 8):
    task = build_task(f"coop:{root / 'my set'}", shots, 1)
    assert task.class_names == ["snow leopard", "café {}", "it's \"quoted\""]
    assert np.bincount([it.label for it in task.train]).tolist() == [min(shots, 6)] * 3
    assert np.bincount([it.label for it in task.val]).tolist() == [min(4, shots)] * 3
    assert len(task.test) == 6
  seeds = {tuple(build_task(f"coop:{root / 'my set'}", 2, s).train) for s in (1, 2, 3)}
  assert len(seeds) == 3
  assert build_task(f"coop:{root / 'my set'}", 2, 1).train == build_task(
      f"coop:{root / 'my set'}", 2, 1).train


def test_fewshot_index_json_and_pickle_ignored(data_root, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  root, split, _ = data_root
  ds = tmp_path / "dtd"
  shutil.copytree(root / "dtd", ds)
  (ds / "split_fewshot").mkdir()
  with open(ds / "split_fewshot" / "shot_1-seed_9.pkl", "wb") as f:
    pickle.dump({"boom": 1}, f)
  seeded = build_task(f"coop:{ds}", 1, 9)
  assert seeded.info["fewshot"] == "seeded"
  wanted_train = [3 * c + 2 for c in range(47)]
  wanted_val = [2 * c for c in range(47)]
  with open(ds / "split_fewshot" / "shot_1-seed_9.json", "w") as f:
    json.dump({"train": {"indices": wanted_train}, "val": {"indices": wanted_val}}, f)
  task = build_task(f"coop:{ds}", 1, 9)
  assert task.info["fewshot"].endswith("shot_1-seed_9.json")
  assert [it.ref.rsplit("/", 2)[-2:] for it in task.train] == [
      split["train"][i][0].split("/") for i in wanted_train]
  with open(ds / "split_fewshot" / "shot_1-seed_9.json", "w") as f:
    json.dump({"train": {"indices": [10_000]}, "val": {"indices": []}}, f)
  with pytest.raises(DatasetError, match="indices"):
    build_task(f"coop:{ds}", 1, 9)


def test_aircraft_layout(tmp_path):
  ds = tmp_path / "fgvc_aircraft"
  variants = classnames_lib.class_names("fgvc_aircraft")
  (ds / "images").mkdir(parents=True)
  (ds / "variants.txt").write_text("\n".join(variants) + "\n")
  lines = {"train": [], "val": [], "test": []}
  n = 0
  for label in (0, 72, 99):  # '707-320', 'F-16A/B', 'Yak-42'
    for split in lines:
      data_helpers.write_image(ds / "images" / f"{n:07d}.jpg", n, fmt="JPEG")
      lines[split].append(f"{n:07d} {variants[label]}")
      n += 1
  for split, rows in lines.items():
    (ds / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
  task = build_task(f"coop:{ds}", 1, 1)
  assert task.class_names == variants
  assert sorted(it.label for it in task.test) == [0, 72, 99]
  assert all(it.ref.endswith(".jpg") for it in task.train)
  assert task.load_image(task.train[0]).shape == (9, 12, 3)


def test_imagenet_layout(tmp_path):
  ds = tmp_path / "imagenet"
  wnids = classnames_lib.imagenet_wnids()
  picked = [wnids[0], wnids[500], wnids[999]]
  for w in picked:
    for i in range(6):
      data_helpers.write_image(ds / "images" / "train" / w / f"{w}_{i}.JPEG", i, fmt="JPEG")
    data_helpers.write_image(ds / "images" / "val" / w / f"val_{w}.JPEG", 7, fmt="JPEG")
  task = build_task(f"coop:{ds}", 2, 1)
  assert len(task.class_names) == 1000
  assert sorted({it.label for it in task.train}) == [0, 500, 999]
  assert len(task.train) == 6 and len(task.val) == 6  # val drawn from train, disjoint
  assert not {it.ref for it in task.train} & {it.ref for it in task.val}
  assert len(task.test) == 3 and all("/images/val/" in it.ref for it in task.test)
  (ds / "images" / "train" / "not_a_wnid").mkdir()
  with pytest.raises(DatasetError, match="synset"):
    build_task(f"coop:{ds}", 2, 1)


def test_errors(data_root, tmp_path):
  root, _, _ = data_root
  with pytest.raises(DatasetError, match="DATA root"):
    build_task(f"coop:{root}", 1, 1)
  with pytest.raises(DatasetError, match="not a directory"):
    build_task(f"coop:{tmp_path / 'missing'}", 1, 1)
  (tmp_path / "eurosat").mkdir()
  with pytest.raises(DatasetError, match="split_zhou_EuroSAT.json is missing"):
    build_task(f"coop:{tmp_path / 'eurosat'}", 1, 1)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "split_zhou_Bad.json").write_text('{"train": [["x.jpg", "zero", "x"]], "test": []}')
  with pytest.raises(DatasetError, match="relative_path, label, classname"):
    build_task(f"coop:{bad}", 1, 1)
  (bad / "split_zhou_Bad.json").write_text('{"train": [["x.jpg", 0, "x"]], "test": []}')
  with pytest.raises(DatasetError, match="not under"):
    build_task(f"coop:{bad}", 1, 1)


def test_label_count_mismatch(tmp_path):
  ds = tmp_path / "eurosat"
  data_helpers.make_coop_dataset(ds, "2750", "split_zhou_EuroSAT.json",
                                 [f"c{i}" for i in range(12)], (1, 1, 1))
  with pytest.raises(DatasetError, match="10 class names"):
    build_task(f"coop:{ds}", 1, 1)
