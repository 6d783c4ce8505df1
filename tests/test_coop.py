"""CoOp in JAX: its forward pass is the scorer's text encode, its schedule is CoOp's, it learns."""

import jax.numpy as jnp
import numpy as np
import pytest

from lmbbo_jax import coop
from lmbbo_jax.evaluator.scorer import PromptScorer

from evaluator_helpers import CLASS_NAMES, make_clip, plain_features, random_images


@pytest.fixture(scope="module")
def clip():
  return make_clip()


def test_forward_with_the_x_embeddings_equals_the_scorers_encode_of_the_template(clip):
  prompts = coop.CoOpPrompts.build(clip, CLASS_NAMES, 16)
  assert prompts.template == " ".join(["X"] * 16) + " {}."
  table = np.asarray(clip.variables["params"]["text"]["token_embedding"]["embedding"])
  x_ctx = jnp.asarray(table[prompts.ids[0, 1:17]])
  got = np.asarray(coop.class_features(clip.model, clip.variables, prompts, x_ctx))
  images, labels = random_images(len(CLASS_NAMES), 2, clip.embed_dim, seed=3)
  scorer = PromptScorer(clip, {"train": images}, {"train": labels}, CLASS_NAMES)
  want = scorer.text_features([prompts.template])[0]
  want = want / np.linalg.norm(want, axis=-1, keepdims=True)
  assert np.abs(got - want).max() <= 1e-5
  assert np.abs(got - plain_features(clip, prompts.template, CLASS_NAMES)).max() <= 1e-5
  # Another context gives other features: the context is what is learned.
  other = np.asarray(coop.class_features(clip.model, clip.variables, prompts, x_ctx * 0.5))
  assert np.abs(other - got).max() > 1e-3
  scorer.close()


def test_coops_schedule_and_epochs():
  cfg = coop.CoOpConfig()
  assert (cfg.n_ctx, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size) == (
      16, 0.002, 0.9, 5e-4, 32)
  assert [coop.epochs_for_shots(s) for s in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
  assert coop.learning_rate(cfg, 0, 50) == 1e-5  # The constant warm-up epoch.
  assert coop.learning_rate(cfg, 1, 50) == pytest.approx(0.002 * 0.5 * (1 + np.cos(np.pi / 50)))
  assert coop.learning_rate(cfg, 25, 50) == pytest.approx(0.001)
  assert coop.learning_rate(cfg, 49, 50) < 1e-5


def test_a_context_too_long_for_the_text_context_is_a_clear_error(clip):
  with pytest.raises(coop.CoOpError, match="coop_n_ctx"):
    coop.CoOpPrompts.build(clip, CLASS_NAMES, clip.context_length)


@pytest.mark.slow
def test_coop_learns_on_the_toy_task_and_beats_the_photo_template():
  from lmbbo_jax.evaluator import features as features_lib
  from lmbbo_jax.models import load_clip
  from lmbbo_jax.data import build_task
  toy = load_clip("toyclip")
  task = build_task("toy:pixel_clutter", 1, 1, max_test_per_class=30)
  fb, lb = features_lib.scorer_inputs(features_lib.encode_task(toy, task, progress=False))
  scorer = PromptScorer(toy, fb, lb, task.class_names)
  photo = scorer.score(["a photo of a {}."])[0].accuracy
  scorer.close()
  seen = []
  result = coop.train(toy, task.class_names, fb, lb, shots=1, seed=1,
                      progress=lambda e, n, loss: seen.append((e, n)))
  assert result.epochs == 50 and len(result.loss_curve) == 50 and seen[-1] == (50, 50)
  assert result.loss_curve[-1] < 0.5 * result.loss_curve[0]  # The loss falls.
  assert set(result.accuracy) == {"train", "val", "test"}
  assert result.accuracy["train"] > photo["train"]
  assert result.accuracy["test"] > photo["test"]
  assert result.ctx.shape == (16, toy.config.text.width)
  again = coop.train(toy, task.class_names, fb, lb, shots=1, seed=1)  # Seeded.
  np.testing.assert_array_equal(again.ctx, result.ctx)
