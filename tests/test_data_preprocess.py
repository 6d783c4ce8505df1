"""CLIP preprocessing parity and the threaded fixed-size batch iterator."""

import numpy as np
import pytest
import torch
from PIL import Image

from lmbbo_jax.data import build_task
from lmbbo_jax.data import preprocess as pp
from lmbbo_jax.models.configs import CLIP_MEAN, CLIP_STD

import data_helpers


def _reference(image_uint8, size):
  """CLIP's transform written out independently: PIL resize, crop, ToTensor, Normalize."""
  img = Image.fromarray(image_uint8)
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  img = img.resize((new_w, new_h), Image.BICUBIC)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  arr = np.array(img)[top:top + size, left:left + size]
  x = torch.from_numpy(arr).permute(2, 0, 1).float().div(255)
  mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
  std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
  return ((x - mean) / std).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("hw", [(300, 400), (400, 300), (224, 224), (224, 500), (50, 37),
                                (97, 1000), (225, 225), (31, 31)])
@pytest.mark.parametrize("size", [224, 32])
def test_matches_clip_reference(hw, size):
  rng = np.random.default_rng(hw[0] * 7 + hw[1])
  # Smooth + noise content so that bicubic ringing and clipping both occur.
  yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
  base = (np.sin(xx / 5.0)[..., None] * 90 + 128 + rng.normal(0, 40, (*hw, 3)))
  image = np.clip(base, 0, 255).astype(np.uint8)
  out = pp.preprocess(image, size, CLIP_MEAN, CLIP_STD)
  ref = _reference(image, size)
  assert out.dtype == np.float32 and out.shape == (size, size, 3)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_custom_mean_std_and_geometry_helpers():
  image = np.full((10, 20, 3), 255, np.uint8)
  out = pp.preprocess(image, 8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
  np.testing.assert_allclose(out[0, 0], [1.0, 2.0, 0.5], atol=1e-6)
  assert pp.resized_size(20, 10, 8) == (16, 8)
  assert pp.center_crop_box(16, 8, 8) == (4, 0, 12, 8)


@pytest.fixture()
def task_with_corrupt_image(tmp_path):
  root = tmp_path / "d"
  data_helpers.make_class_tree(root / "train", ["x {}", "y"], per_class=2)
  data_helpers.make_class_tree(root / "test", ["x {}", "y"], per_class=5)
  bad = root / "test" / "y" / "img_02.png"
  bad.write_bytes(b"\x89PNG not really")
  (root / "test" / "x {}" / "img_00.png").write_bytes(b"")
  empty = root / "test" / "x {}" / "img_00.png"
  return build_task(f"folder:{root}", 1, 1), {str(bad.resolve()), str(empty.resolve())}


def test_batches_fixed_size_ordered_and_skip_bad(task_with_corrupt_image):
  task, bad_refs = task_with_corrupt_image
  seen_skips, progress = [], []
  it = pp.iter_batches(task, "test", size=16, batch_size=4, num_threads=3, prefetch=1,
                       mean=CLIP_MEAN, std=CLIP_STD,
                       progress=lambda d, t: progress.append((d, t)),
                       on_skip=lambda ref, why: seen_skips.append(ref))
  batches = list(it)
  assert len(batches) == len(it) == 3  # 10 items -> 4 + 4 + 2 (+2 padding)
  for b in batches:
    assert b.pixels.shape == (4, 16, 16, 3) and b.pixels.dtype == np.float32
    assert b.labels.dtype == np.int32 and b.mask.dtype == bool and len(b.refs) == 4
  flat_refs = [r for b in batches for r in b.refs]
  expected = [item.ref if item.ref not in bad_refs else "" for item in task.test] + ["", ""]
  assert flat_refs == expected
  assert sorted(ref for ref, _ in it.skipped) == sorted(bad_refs) == sorted(seen_skips)
  assert all(ref in why for ref, why in it.skipped)
  for b in batches:
    assert (b.labels[~b.mask] == -1).all() and not b.pixels[~b.mask].any()
  first = task.test[1]
  row = flat_refs.index(first.ref)
  np.testing.assert_array_equal(batches[row // 4].pixels[row % 4],
                                pp.preprocess(task.load_image(first), 16, CLIP_MEAN, CLIP_STD))
  assert batches[row // 4].labels[row % 4] == first.label
  assert progress[-1] == (10, 10) and len(progress) == 3
  # A second pass starts over with a fresh skip list.
  assert len(list(it)) == 3 and len(it.skipped) == 2


def test_next_and_early_close(task_with_corrupt_image):
  task, _ = task_with_corrupt_image
  it = pp.iter_batches(task, "test", size=8, batch_size=3, num_threads=2, prefetch=2,
                       mean=CLIP_MEAN, std=CLIP_STD)
  first = next(it)
  assert first.refs[1] == task.test[1].ref
  it.close()
  assert next(it).refs[1] == task.test[1].ref  # a closed iterator starts over
  assert sum(b.mask.sum() for b in pp.iter_batches(task, "train", size=8, batch_size=8,
                                                     mean=CLIP_MEAN, std=CLIP_STD)) == 2


def test_load_image_error_names_ref(task_with_corrupt_image):
  task, bad_refs = task_with_corrupt_image
  bad = next(item for item in task.test if item.ref in bad_refs)
  with pytest.raises(pp.ImageLoadError, match="img_0"):
    task.load_image(bad)


def test_grey_and_rgba_images_become_rgb(tmp_path):
  root = tmp_path / "g"
  (root / "a").mkdir(parents=True)
  Image.fromarray(np.full((5, 6), 40, np.uint8), mode="L").save(root / "a" / "grey.png")
  Image.fromarray(np.full((5, 6, 4), 90, np.uint8)).save(root / "a" / "rgba.png")
  task = build_task(f"folder:{root}", 2, 1)
  for item in task.train + task.val + task.test:
    image = task.load_image(item)
    assert image.shape == (5, 6, 3) and image.dtype == np.uint8
