"""Toy few-shot tasks: fixed test sets, seeded shots, rendering from references."""

import numpy as np
import pytest

from lmbbo_jax.data.task import DatasetError, FewShotTask
from lmbbo_jax.toyworld import scenes, tasks


def test_registry_has_three_nuisance_tasks_and_the_mix():
  assert {"mix", "sketch_dark", "pixel_clutter", "blurry_noisy"} <= set(tasks.TOY_TASKS)
  assert all(spec.description for spec in tasks.TOY_TASKS.values())


def test_task_splits_sizes_and_balance():
  t = tasks.build_toy_task("sketch_dark", 3, 1)
  assert isinstance(t, FewShotTask) and t.class_names == list(scenes.CLASS_NAMES)
  num = len(scenes.CLASS_NAMES)
  assert len(t.train) == 3 * num and len(t.val) == 3 * num
  assert len(t.test) == 100 * num
  assert np.bincount([i.label for i in t.test]).tolist() == [100] * num
  assert len(tasks.build_toy_task("mix", 16, 1).val) == 4 * num  # val = min(4, k)
  refs = {i.ref for s in (t.train, t.val, t.test) for i in s}
  assert len(refs) == len(t.train) + len(t.val) + len(t.test)  # Splits never share images.


def test_test_set_is_fixed_and_shots_follow_the_seed():
  a, b, c = (tasks.build_toy_task("blurry_noisy", 2, s) for s in (1, 1, 2))
  assert [i.ref for i in a.test] == [i.ref for i in c.test]
  assert [i.ref for i in a.train] == [i.ref for i in b.train]
  assert not set(i.ref for i in a.train) & set(i.ref for i in c.train)


def test_images_render_deterministically_with_the_task_style():
  t = tasks.build_toy_task("pixel_clutter", 1, 0)
  img = t.load_image(t.test[3])
  assert img.shape == (64, 64, 3) and img.dtype == np.uint8
  tasks.render_chunk.cache_clear()
  np.testing.assert_array_equal(img, t.load_image(t.test[3]))
  batch = t.load_images(t.test[:8])
  np.testing.assert_array_equal(batch[3], img)
  # Pixelated with 4x4 blocks: neighbouring pixels inside a block are nearly equal.
  block = batch[:, :4, :4].astype(int)
  assert np.abs(block - block[:, :1, :1]).mean() <= 7  # Only the faint sensor noise differs.


def test_bad_requests_raise_dataset_errors():
  with pytest.raises(DatasetError, match="unknown toy task"):
    tasks.build_toy_task("nope", 1, 0)
  with pytest.raises(DatasetError, match="shots"):
    tasks.build_toy_task("mix", 0, 0)
  with pytest.raises(DatasetError, match="toy:<task>"):
    tasks.render_ref("toy:mix:test:-1")


def test_dataset_string_routes_to_toy_tasks():
  from lmbbo_jax.data import build_task  # The data room's `--dataset=toy:<task>` path.
  t = build_task("toy:sketch_dark", shots=2, seed=1)
  assert t.name == "toy:sketch_dark" and len(t.train) == 20
