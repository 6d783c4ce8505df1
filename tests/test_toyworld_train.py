"""Pieces of the toy CLIP training recipe (the full run is the shipped checkpoint)."""

import jax
import jax.numpy as jnp
import numpy as np

from lmbbo_jax.models.clip import abstract_variables
from lmbbo_jax.models.configs import CLIPConfig
from lmbbo_jax.toyworld import train


def test_curriculum_fades_from_easy_to_mix():
  fr = [train.easy_fraction(s, 1000, 0.2, 0.1) for s in range(1000)]
  assert fr[0] == fr[199] == 1.0 and fr[300] == 0.0 and fr[-1] == 0.0
  assert all(a >= b for a, b in zip(fr, fr[1:]))
  assert 0.0 < fr[250] < 1.0


def test_training_batches_are_a_pure_function_of_seed_and_step():
  a = train.train_batch(0, 5, 100, 16, 0.2, 0.1)
  b = train.train_batch(0, 5, 100, 16, 0.2, 0.1)
  c = train.train_batch(1, 5, 100, 16, 0.2, 0.1)
  np.testing.assert_array_equal(a.images, b.images)
  assert not np.array_equal(a.images, c.images)
  # Early batches are the easy world; late ones the full mix.
  assert set(a.style) == {0} and set(a.count) == {0}
  late = train.train_batch(0, 99, 100, 64, 0.2, 0.1)
  assert len(set(late.style)) > 1 and len(set(late.count)) > 1


def test_eval_sets_are_balanced_and_fixed():
  a, b = train.eval_set(50), train.eval_set(50)
  np.testing.assert_array_equal(a.images, b.images)
  assert np.bincount(a.label).tolist() == [5] * 10
  assert not np.array_equal(train.eval_set(50, stream=1).images, a.images)


def test_stage1_tower_params_fit_the_clip_tree():
  config = train.toy_config(500, 1, 2, 0)
  assert CLIPConfig.from_dict(config.to_dict()) == config
  shapes = jax.eval_shape(
      lambda: train.TowerWithHeads(config).init(jax.random.key(0),
                                                jnp.zeros((1, 64, 64, 3))))["params"]
  clip_shapes = abstract_variables(config)["params"]
  assert (jax.tree_util.tree_map(lambda x: x.shape, shapes["visual"])
          == jax.tree_util.tree_map(lambda x: x.shape, clip_shapes["visual"]))
  assert {k for k in shapes if k.startswith("head_")} == {f"head_{k}" for k in train.HEADS}
