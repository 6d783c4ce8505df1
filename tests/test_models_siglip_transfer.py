"""Transfer across families: templates scored (and chosen) on a tiny random CLIP are scored
on a tiny random SigLIP through the same scorer API, at the library level and through the
experiment's transfer step."""


import numpy as np
import pytest

from lmbbo_jax import templates as templates_lib
from lmbbo_jax.evaluator.scorer import PromptScorer
from lmbbo_jax.models import load_clip

from evaluator_helpers import reference_score

CLASSES = ["circle", "square", "triangle", "star"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}", "{}", "a blurry photo of the {}, a shape."]


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_templates_chosen_on_clip_score_on_siglip_as_a_direct_encode():
  clip, siglip = load_clip("random:tiny-vit"), load_clip("random:tiny-siglip")
  assert siglip.config.family == "siglip" and not siglip.config.text_causal
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(len(CLASSES) * 3, 32, 32, 3)).astype(np.float32)
  labels = np.repeat(np.arange(len(CLASSES)), 3).astype(np.int32)
  chosen = {}
  for name, model in (("clip", clip), ("siglip", siglip)):
    feats = np.asarray(model.encode_image(pixels))
    scorer = PromptScorer(model, {"test": feats}, {"test": labels}, CLASSES, rows_per_call=8)
    scores = scorer.score(TEMPLATES)
    scorer.close()
    assert all(s.ok for s in scores), [s.rejected for s in scores]
    for t, s in zip(TEMPLATES, scores):  # each model scores exactly its own direct encode
      text = _unit(model.encode_text(model.tokenize([templates_lib.fill(t, c)
                                                     for c in CLASSES])))
      acc, logp = reference_score(text, _unit(feats), labels, model.logit_scale)
      assert s.accuracy["test"] == pytest.approx(acc, abs=1e-12)
      assert s.logprob["test"] == pytest.approx(logp, abs=1e-5)
    chosen[name] = {t: s.logprob["test"] for t, s in zip(TEMPLATES, scores)}
  # The template CLIP prefers has a SigLIP score: the transfer row of the paper.
  best_on_clip = max(chosen["clip"], key=chosen["clip"].get)
  assert np.isfinite(chosen["siglip"][best_on_clip])


def test_experiment_transfer_step_scores_clip_choices_on_siglip(tmp_path):
  from lmbbo_jax.data import build_task
  from lmbbo_jax import experiment, transfer
  from lmbbo_jax.config import ExperimentConfig
  cfg = ExperimentConfig(dataset="toy:mix", workdir=str(tmp_path / "w"), seeds=(1,),
                         max_test_per_class=2, model="random:tiny-vit",
                         transfer_to=("random:tiny-siglip",), progress=False,
                         image_batch_size=16)
  task = build_task(cfg.dataset, cfg.shots, 1, max_test_per_class=2)
  chosen = {"1": {"best": "a photo of a {}.", "baseline:photo": "a {}"}}
  out = transfer.transfer(
      cfg, {1: task}, chosen, experiment.load_model,
      lambda clip, task, encoders: experiment.scorer_for(
          clip, task, encoders, cache_dir=str(tmp_path / "features"), batch_size=16)[0])
  row = out["random:tiny-siglip"]
  assert row["model"]["name"] == "tiny-siglip"
  entries = row["per_seed"]["1"]
  assert set(entries) == {"best", "baseline:photo"}
  assert entries["best"]["template"] == "a photo of a {}."
  for e in entries.values():  # scored on SigLIP: accuracies and a finite log-probability
    assert 0.0 <= e["test_acc"] <= 1.0 and 0.0 <= e["train_acc"] <= 1.0
    assert np.isfinite(e["train_logprob"])


def test_coop_refuses_a_siglip_model_with_the_reason():
  from lmbbo_jax.coop import CoOpConfig, CoOpError, train
  siglip = load_clip("random:tiny-siglip")
  feats = np.zeros((4, siglip.embed_dim), np.float32)
  with pytest.raises(CoOpError, match="siglip model"):
    train(siglip, CLASSES, {"train": feats}, {"train": np.arange(4)}, shots=1, seed=0,
          config=CoOpConfig())
