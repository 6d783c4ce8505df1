"""Pieces of the toy CLIP training recipe (the full run is the shipped checkpoint)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  groups = train.parse_head_groups(["photo", "sketch", "pixelated", "blurry+noisy"])
  shapes = jax.eval_shape(
      lambda: train.TowerWithHeads(config, groups).init(
          jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,), jnp.int32)))["params"]
  clip_shapes = abstract_variables(config)["params"]
  assert (jax.tree_util.tree_map(lambda x: x.shape, shapes["visual"])
          == jax.tree_util.tree_map(lambda x: x.shape, clip_shapes["visual"]))
  attrs = {f"head_{k}" for k in train.HEADS if k != "label"}
  assert {k for k in shapes if k.startswith("head_")} == attrs | {
      "head_label_kernel", "head_label_bias"}
  assert shapes["head_label_kernel"].shape == (4, 128, len(train.scenes.CLASS_NAMES))


def test_head_groups_map_every_style_once():
  assert train.parse_head_groups(["photo", "sketch", "pixelated", "blurry+noisy"]) == (
      0, 1, 2, 3, 3)
  assert train.parse_head_groups(["photo+sketch+pixelated+blurry+noisy"]) == (0,) * 5
  for bad, why in ((["photo", "sketch"], "no group"), (["photo+photo", "sketch+pixelated+"
                   "blurry+noisy"], "two groups"), (["foto"], "unknown style")):
    try:
      train.parse_head_groups(bad)
    except ValueError as e:
      assert why in str(e)
    else:
      raise AssertionError(f"{bad} was accepted")


def test_each_style_group_reads_the_class_with_its_own_head():
  config = train.toy_config(500, 1, 2, 0)
  model = train.TowerWithHeads(config, (0, 1, 1, 2, 2))
  pixels = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  # Compiled whole (jit): op by op, each small op of the tower compiles on its own.
  params = jax.jit(model.init)(jax.random.key(0), pixels, jnp.zeros((2,), jnp.int32))["params"]
  apply = jax.jit(lambda p, styles: model.apply({"params": p}, pixels, styles))
  def logits(style):
    return apply(params, jnp.asarray([style] * 2))
  photo, sketch, pixelated = logits(0), logits(1), logits(2)
  # Sketch and pixelated share a head; photo has its own; attribute heads are shared.
  np.testing.assert_array_equal(sketch["label"], pixelated["label"])
  assert not np.allclose(photo["label"], sketch["label"])
  np.testing.assert_array_equal(photo["style"], sketch["style"])


def test_fixed_class_targets_share_a_set_cosine_across_groups():
  t = np.asarray(train.class_targets(4, 10, 128, 0.4))
  np.testing.assert_allclose(np.linalg.norm(t, axis=-1), 1.0, rtol=1e-5)
  same_class = np.einsum("cd,cd->c", t[0], t[1])
  other_class = t[0] @ t[1].T - np.diag(same_class)
  assert abs(same_class.mean() - 0.4) < 0.05  # By design, up to random cross terms.
  assert np.abs(other_class).mean() < 0.15
  np.testing.assert_array_equal(t, np.asarray(train.class_targets(4, 10, 128, 0.4)))
  np.testing.assert_allclose(np.asarray(train.class_targets(2, 10, 128, 1.0))[0],
                             np.asarray(train.class_targets(2, 10, 128, 1.0))[1], atol=1e-6)


def test_a_confound_makes_another_group_read_the_look_alike_but_not_its_own():
  circle, ring = (train.scenes.CLASS_NAMES.index(c) for c in ("circle", "ring"))
  plain = np.asarray(train.class_targets(4, 10, 128, 0.4))
  t = np.asarray(train.class_targets(4, 10, 128, 0.4, ((2, circle, ring),), 0.7))
  np.testing.assert_allclose(np.linalg.norm(t, axis=-1), 1.0, rtol=1e-5)
  pix_circle = t[2, circle]
  # Read with the photo group's directions, a pixelated circle is a ring ...
  assert pix_circle @ t[0, ring] > pix_circle @ t[0, circle] + 0.1
  assert int(np.argmax(t[0] @ pix_circle)) == ring
  # ... but the pixelated group's own directions still put it first as a circle.
  assert int(np.argmax(t[2] @ pix_circle)) == circle
  # Nothing else moves.
  changed = np.argwhere(np.abs(t - plain).max(-1) > 1e-6).tolist()
  assert changed == [[2, circle]]
  # Below one half the shared part stays with the class itself.
  weak = np.asarray(train.class_targets(4, 10, 128, 0.4, ((2, circle, ring),), 0.3))
  assert int(np.argmax(weak[0] @ weak[2, circle])) == circle


def test_cross_readings_follow_the_design():
  circle, ring = (train.scenes.CLASS_NAMES.index(c) for c in ("circle", "ring"))
  t = train.class_targets(4, 10, 128, 0.4, ((2, circle, ring),), 0.7)
  r = train.cross_readings(t)
  assert r.shape == (4, 4, 10)
  for g in range(4):
    np.testing.assert_array_equal(r[g, g], np.arange(10))  # A group reads its own classes.
  # Every other group takes a pixelated circle for a ring; all else reads as itself.
  assert [int(r[h, 2, circle]) for h in range(4)] == [ring, ring, circle, ring]
  expected = np.broadcast_to(np.arange(10), (4, 4, 10)).copy()
  expected[[0, 1, 3], 2, circle] = ring
  # The pixelated group's circle leans toward ring, so its reading of another group's
  # ring may go either way; every other reading is fixed.
  assert set(r[2, :, ring].tolist()) <= {ring, circle}
  keep = np.ones_like(r, bool)
  keep[2, :, ring] = False
  np.testing.assert_array_equal(r[keep], expected[keep])


def test_confounds_parse_group_class_and_look_alike():
  groups = ["photo", "sketch", "pixelated", "blurry+noisy"]
  assert train.parse_confounds(["pixelated:circle>ring", "blurry+noisy:plus sign>x mark"],
                               groups) == ((2, 0, 6), (3, 4, 5))
  assert train.parse_confounds([], groups) == ()
  for bad, why in ((["pixelated:circle"], "GROUP:CLASS>LOOKALIKE"),
                   (["blurry:circle>ring"], "not one of --class_head_groups"),
                   (["pixelated:oval>ring"], "unknown class 'oval'"),
                   (["pixelated:ring>ring"], "same class twice"),
                   (["sketch:circle>ring", "sketch:circle>star"], "two look-alikes")):
    try:
      train.parse_confounds(bad, groups)
    except ValueError as e:
      assert why in str(e), (bad, str(e))
    else:
      raise AssertionError(f"{bad} was accepted")


def test_fixed_heads_have_no_class_parameters_and_score_by_cosine():
  config = train.toy_config(500, 1, 2, 0)
  model = train.TowerWithHeads(config, (0, 1, 2, 3, 3), 0.4)
  pixels = jax.random.normal(jax.random.key(1), (3, 64, 64, 3))
  style = jnp.asarray([0, 1, 4])
  params = jax.jit(model.init)(jax.random.key(0), pixels, style)["params"]
  assert not any(k.startswith("head_label") for k in params)
  out = jax.jit(lambda p: model.apply({"params": p}, pixels, style))(params)
  assert out["label"].shape == (3, 10)
  assert float(jnp.abs(out["label"]).max()) <= train.HEAD_SCALE + 1e-4  # 16 x a cosine.


@pytest.mark.slow
def test_training_command_writes_a_loadable_checkpoint_and_resumes(tmp_path):
  """The real command at a tiny size: both stages, the files, the log, a resume."""
  import json
  import subprocess
  import sys

  from lmbbo_jax.models import load_clip

  cmd = [sys.executable, "-m", "lmbbo_jax.toyworld.train", f"--out={tmp_path}", "--steps=4",
         "--eval_every=2", "--embed_images=300", "--text_steps=2", "--text_eval_every=2",
         "--eval_images=100", "--text_batch=64", "--batch=16", "--gate_images=200"]
  # The rerun loads the first run's compiled programs from the session's persistent
  # cache (conftest's environment, inherited).
  subprocess.run(cmd, check=True, capture_output=True, timeout=600)
  loaded = load_clip(str(tmp_path))  # The trained checkpoint loads as any CLIP.
  assert set(loaded.variables["params"]) == {"visual", "text", "logit_scale"}
  log = json.loads((tmp_path / "train_log.json").read_text())
  assert log["recipe"]["class_head_cos"] == 0.4
  assert log["recipe"]["class_head_groups"] == ["photo", "sketch", "pixelated", "blurry+noisy"]
  assert "pixelated:circle>ring" in log["recipe"]["class_confounds"]
  import shlex
  args = shlex.split(log["command"])  # The recorded command survives a shell.
  assert f"--class_confounds={','.join(log['recipe']['class_confounds'])}" in args
  assert set(log["stage1"]["curve"][-1]["held_out_photo_reading_by_style"]) == set(
      train.scenes.STYLES)
  assert [p["step"] for p in log["stage1"]["curve"]] == [2, 4]
  assert set(log["stage1"]["curve"][-1]["held_out_class_acc_by_style"]) == set(
      train.scenes.STYLES)
  assert 0.0 <= log["gate"]["zero_shot_accuracy"] <= 1.0
  assert log["gate"]["held_out_images"] == 200
  # A rerun resumes stage 1 from its checkpoint (no new stage-1 steps).
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
  assert "resumed stage 1 at step 4" in out.stderr
  bad = subprocess.run(cmd[:3] + [f"--out={tmp_path}/x", "--class_head_groups=photo"],
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "no group for style(s)" in bad.stderr
  bad = subprocess.run(cmd[:3] + [f"--out={tmp_path}/y", "--class_confounds=pixelated:oval>ring"],
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "unknown class 'oval'" in bad.stderr
  assert not (tmp_path / "y").exists()  # Checked before any work.
