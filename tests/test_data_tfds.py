"""TFDS sources under `tfds.testing.mock_data` (no TensorFlow, no network)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lmbbo_jax.data import DATASETS, DatasetError, build_task, class_names
from lmbbo_jax.data import preprocess, tfds_source


def _raw_labels(name, split):
  src = tfds.data_source(name, split=split, download=False)
  return [int(src[i]["label"]) for i in range(len(src))]


def test_caltech_label_map_aligns_with_openai_names():
  names = tfds.builder("caltech101").info.features["label"].names
  mapping = tfds_source.caltech_label_map(list(names))
  coop = class_names("caltech101")
  expect = {"faces": "face", "leopards": "leopard", "motorbikes": "motorbike",
            "accordion": "accordion", "airplanes": "airplane", "car_side": "side of a car",
            "cougar_body": "body of a cougar cat", "cougar_face": "face of a cougar cat",
            "crocodile_head": "head of a  crocodile", "snoopy": "snoopy (cartoon beagle)",
            "yin_yang": "yin and yang symbol", "wrench": "wrench"}
  for tfds_name, coop_name in expect.items():
    assert coop[mapping[names.index(tfds_name)]] == coop_name
  assert mapping[names.index("background_google")] is None
  assert mapping[names.index("faces_easy")] is None
  assert sorted(m for m in mapping if m is not None) == list(range(100))


def test_caltech101_mocked():
  with tfds.testing.mock_data(num_examples=80):
    task = build_task("caltech101", 1, 1)
    raw_test = _raw_labels("caltech101", "test")
    mapping = tfds_source.caltech_label_map(
        list(tfds.builder("caltech101").info.features["label"].names))
    assert task.class_names == class_names("caltech101")
    kept = [(f"test:{i}", mapping[l]) for i, l in enumerate(raw_test) if mapping[l] is not None]
    assert [(it.ref, it.label) for it in task.test] == kept
    assert len(kept) < len(raw_test) or not {4, 39} & set(raw_test)
    for item in task.train:
      assert item.ref.startswith("train:")
    # Val shots come from train, never overlapping the train shots.
    assert all(it.ref.startswith("train:") for it in task.val)
    assert not {it.ref for it in task.train} & {it.ref for it in task.val}
    image = task.load_image(task.test[0])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    again = build_task("Caltech101", 1, 1)
    assert again.train == task.train and again.test == task.test
    assert task.info["tfds_name"] == "caltech101" and task.source == "tfds"


def test_eurosat_single_split_is_divided():
  with tfds.testing.mock_data(num_examples=200):
    task = build_task("eurosat", 2, 1)
    pool = task.info["pool_sizes"]
    refs = [{it.ref for it in s} for s in (task.train, task.val, task.test)]
    assert all(r.startswith("train:") for s in refs for r in s)
    assert not (refs[0] & refs[1] or refs[0] & refs[2] or refs[1] & refs[2])
    other_seed = build_task("eurosat/rgb", 2, 2)
    assert other_seed.test == task.test and other_seed.train != task.train
    assert pool["train"] + pool["val"] + len(task.test) == 200


@pytest.mark.parametrize("name, test_split", [("food101", "validation"),
                                              ("oxford_flowers", "test"),
                                              ("oxford_pets", "test")])
def test_named_benchmarks_map_splits(name, test_split):
  with tfds.testing.mock_data(num_examples=30):
    task = build_task(name, 1, 1)
    info = DATASETS[name]
    assert len(task.class_names) == info.num_classes
    assert all(it.ref.startswith(f"{test_split}:") for it in task.test)
    assert len(task.test) == 30
    if info.tfds_val:
      assert all(it.ref.startswith(f"{info.tfds_val}:") for it in task.val)


def test_tfds_task_batches():
  with tfds.testing.mock_data(num_examples=5):
    task = build_task("dtd", 1, 1)
    batches = list(preprocess.iter_batches(task, "test", size=16, batch_size=4,
                                           mean=(0.5,) * 3, std=(0.25,) * 3, num_threads=2))
    assert len(batches) == 2 and batches[1].mask.tolist() == [True, False, False, False]


def test_not_prepared_gives_one_clear_error(tmp_path):
  with pytest.raises(DatasetError) as err:
    build_task("dtd", 1, 1, data_dir=str(tmp_path))
  message = str(err.value)
  assert "\n" not in message
  assert "tfds build dtd" in message and "coop:" in message


@pytest.mark.parametrize("name", ["fgvc_aircraft", "ucf101"])
def test_datasets_without_tfds_point_to_coop(name):
  with pytest.raises(DatasetError, match=f"coop:/path/to/DATA/{DATASETS[name].coop_dir}"):
    build_task(name, 1, 1)


def test_unknown_dataset():
  with pytest.raises(DatasetError, match="unknown dataset 'cifar10'"):
    build_task("cifar10", 1, 1)
  with pytest.raises(DatasetError, match="folder:PATH"):
    build_task("/some/path", 1, 1)


class _FakeSource:
  """A prepared ArrayRecord source as TFDS returns it with `SkipDecoding`: PNG bytes."""

  def __init__(self, examples, skip):
    self.examples, self.skip = examples, skip

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    image, label = self.examples[i]
    if self.skip:
      import io  # pylint: disable=g-import-not-at-top
      from PIL import Image  # pylint: disable=g-import-not-at-top
      buf = io.BytesIO()
      Image.fromarray(image).save(buf, format="PNG")
      return {"image": buf.getvalue(), "label": np.int64(label)}
    return {"image": image, "label": np.int64(label)}

  def __getitems__(self, keys):
    return [self[k] for k in keys]


def test_undecoded_bytes_path(monkeypatch):
  rng = np.random.default_rng(0)
  splits = {s: [(rng.integers(0, 256, (5 + i, 7, 3), dtype=np.uint8), i % 47)
                for i in range(n)] for s, n in (("train", 60), ("validation", 50), ("test", 9))}
  calls = []

  class FakeTfds:
    class decode:  # pylint: disable=invalid-name
      SkipDecoding = object

    @staticmethod
    def data_source(name, *, split, data_dir, download, decoders=None):
      calls.append((name, split, download, decoders is not None))
      return _FakeSource(splits[split], skip=decoders is not None)

  monkeypatch.setattr(tfds_source, "_import_tfds", lambda: FakeTfds)
  task = build_task("dtd", 1, 1, data_dir="/somewhere")
  assert {c[0] for c in calls} == {"dtd"} and all(c[2] is False and c[3] for c in calls)
  assert [it.ref for it in task.test] == [f"test:{i}" for i in range(9)]
  item = task.test[4]
  np.testing.assert_array_equal(task.load_image(item), splits["test"][4][0])
  assert item.label == 4
