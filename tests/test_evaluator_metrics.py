"""acc@1, acc@5 and mean per-class recall: known answers through the scorer's device
partials (templates split over calls, ties, ensembles) and CLIP_benchmark's JSON layout."""

import json
import math

import numpy as np
import pytest

from lmbbo_jax.data import registry
from lmbbo_jax.evaluator import metrics
from lmbbo_jax.evaluator.scorer import PromptScorer
from lmbbo_jax.evaluator.text_encoder import PackedTextEncoder
from lmbbo_jax.evaluator.types import METRICS, Score

from evaluator_helpers import CLASS_NAMES, make_clip

TEMPLATE = "a photo of a {}."
# Segments longer than half a row: with one-row calls, every class in its own call.
LONG = "a photo of a {}" + " very" * 40 + " nice."


@pytest.fixture(scope="module")
def clip():
  return make_clip()


def text_features(clip, encoder, template: str) -> np.ndarray:
  """The scorer's own class features of `template` (what its logits are made of)."""
  probe = PromptScorer(clip, {"test": np.zeros((1, clip.embed_dim))}, {"test": [0]},
                       encoder.class_names, text_encoder=encoder, precompile=False)
  return probe.text_features([template])[0]


def images_with_ranks(text: np.ndarray, rankings: list[list[int]]) -> np.ndarray:
  """Image features whose logits order the classes as each ranking says, best first.

  Solves text @ x = d with d spaced 1 apart, so the order holds with a wide margin
  (`text` has more dimensions than classes).
  """
  num = text.shape[0]
  out = []
  for order in rankings:
    d = np.empty(num)
    d[list(order)] = np.arange(num, 0, -1, dtype=np.float64)
    x, *_ = np.linalg.lstsq(text.astype(np.float64), d, rcond=None)
    out.append(x / np.linalg.norm(x))
  return np.asarray(out, np.float32)


def ranking_with(label: int, rank: int, num: int, rng) -> list[int]:
  others = [c for c in rng.permutation(num).tolist() if c != label]
  return others[:rank] + [label] + others[rank:]


def test_top_k_hits_and_split_metrics_known_answers():
  # Two calls' candidates for 3 images; true logits and labels chosen by hand.
  top = np.array([[9., 5., 1.], [7., 5., 1.], [-np.inf, 4., 1.],
                  [8., 6., 1.], [3., 5., 1.], [2., 3., 1.]])
  top_class = np.array([[0, 3, 0], [1, 4, 1], [99, 5, 2], [2, 1, 3], [3, 6, 4], [4, 7, 5]])
  labels = np.array([4, 4, 5])
  true = np.array([2., 5., 1.])
  # Image 0: 9, 7, 8, 3 rank above 2 -> rank 4 -> hit; image 1: 5 (class 3) ties and
  # precedes class 4, plus 6 -> rank 2 -> hit; image 2: five classes tie at 1 before 5.
  assert metrics.top_k_hits(top, top_class, true, labels).tolist() == [True, True, False]
  assert metrics.top_k_hits(top, top_class, true, labels, k=2).tolist() == [False, False, False]
  pred = np.array([0, 4, 5, 1, 1])
  y = np.array([0, 4, 5, 1, 2])
  hits = np.array([True, True, True, False, True])
  got = metrics.split_metrics(pred, hits, y, num_classes=7)
  # Per class: 0, 1, 4, 5 -> 1 and 2 -> 0; classes 3 and 6 have no images (left out).
  assert got == {"accuracy": 0.8, "acc5": 0.8, "mean_per_class_recall": 0.8}
  y2 = np.array([0, 0, 0, 1])
  got = metrics.split_metrics(np.array([0, 1, 1, 1]), None, y2, num_classes=3)
  assert got == {"accuracy": 0.5, "mean_per_class_recall": pytest.approx((1 / 3 + 1) / 2)}
  empty = metrics.split_metrics(np.array([], int), None, np.array([], int), 3)
  assert math.isnan(empty["accuracy"]) and "acc5" not in empty


@pytest.mark.parametrize("template,rows_per_call", [(TEMPLATE, 8), (LONG, 1)])
def test_scorer_reports_known_acc1_acc5_and_per_class_recall(clip, template, rows_per_call):
  """LONG in one-row calls: the 10 classes over 10 calls, merged on the host."""
  num = len(CLASS_NAMES)
  encoder = PackedTextEncoder(clip, CLASS_NAMES, rows_per_call=rows_per_call)
  text = text_features(clip, encoder, template)
  rng = np.random.default_rng(0)
  # test: every class, true-class ranks 0..9 in turn; train: classes 0-2 only.
  test_labels = [i % num for i in range(3 * num)]
  test_ranks = [(i * 7) % num for i in range(3 * num)]
  train_labels, train_ranks = [0, 0, 1, 2, 2, 2], [0, 4, 5, 0, 0, 3]
  feats = {split: images_with_ranks(text, [ranking_with(y, r, num, rng)
                                           for y, r in zip(labels, ranks)])
           for split, labels, ranks in (("test", test_labels, test_ranks),
                                        ("train", train_labels, train_ranks))}
  scorer = PromptScorer(clip, feats, {"test": test_labels, "train": train_labels},
                        CLASS_NAMES, text_encoder=encoder, precompile=False)
  score = scorer.score([template])[0]
  assert scorer.stats()["calls"] == (num if template == LONG else 1)
  for split, labels, ranks in (("test", test_labels, test_ranks),
                               ("train", train_labels, train_ranks)):
    ranks, labels = np.array(ranks), np.array(labels)
    per_class = [np.mean(ranks[labels == c] == 0) for c in np.unique(labels)]
    assert score.accuracy[split] == pytest.approx(np.mean(ranks == 0), abs=1e-12)
    assert score.acc5[split] == pytest.approx(np.mean(ranks < 5), abs=1e-12)
    assert score.mean_per_class_recall[split] == pytest.approx(np.mean(per_class), abs=1e-12)
  # train: class 0 -> 1/2, class 1 -> 0, class 2 -> 2/3; accuracy 3/6.
  assert score.mean_per_class_recall["train"] == pytest.approx((0.5 + 0 + 2 / 3) / 3)
  assert score.accuracy["train"] == 0.5 and score.acc5["train"] == pytest.approx(5 / 6)
  # One template as an ensemble classifies exactly as the template (the weights path).
  ens = scorer.score_ensemble([[template]])[0]
  assert {m: ens.metric(m) for m in METRICS} == {m: score.metric(m) for m in METRICS}
  # Without acc5 (one reduction round): the same top-1 and per-class recall.
  top1 = PromptScorer(clip, feats, {"test": test_labels, "train": train_labels}, CLASS_NAMES,
                      text_encoder=encoder, precompile=False, acc5=False).score([template])[0]
  assert top1.acc5 == {} and top1.accuracy == score.accuracy
  assert top1.mean_per_class_recall == score.mean_per_class_recall


def test_equal_logits_rank_by_class_index_in_top5(clip):
  names = ["cat", "dog", "cat", "owl", "fox", "eel", "ant"]  # 0 and 2: equal features
  cases = [  # (ranking of the distinct classes, label, top-1 hit, top-5 hit)
      ([0, 1, 2, 3, 4, 5], 2, False, True),   # cats tie first: 0 wins top-1, 2 is 2nd
      ([1, 2, 3, 4, 0, 5], 0, False, True),   # cats at 5th-6th: class 0 is 5th
      ([1, 2, 3, 4, 0, 5], 2, False, False),  # ... and class 2 is 6th
      ([0, 1, 2, 3, 4, 5], 0, True, True),
  ]
  labels = [c[1] for c in cases]
  for template, rows in ((TEMPLATE, 8), (LONG, 1)):
    encoder = PackedTextEncoder(clip, names, rows_per_call=rows)
    text = text_features(clip, encoder, template)
    assert np.array_equal(text[0], text[2])
    # The distinct rows ("cat" stands for classes 0 and 2) in the order each case says.
    feats = images_with_ranks(text[[0, 1, 3, 4, 5, 6]], [c[0] for c in cases])
    scorer = PromptScorer(clip, {"test": feats}, {"test": labels}, names, text_encoder=encoder,
                          precompile=False)
    s = scorer.score([template])[0]
    assert s.accuracy["test"] == np.mean([c[2] for c in cases]), template
    assert s.acc5["test"] == np.mean([c[3] for c in cases]), template


def test_fewer_than_five_classes_have_no_acc5(clip):
  names = CLASS_NAMES[:4]
  feats = np.random.default_rng(1).normal(size=(4, clip.embed_dim)).astype(np.float32)
  s = PromptScorer(clip, {"test": feats}, {"test": [0, 1, 2, 3]}, names).score([TEMPLATE])[0]
  assert s.acc5 == {} and set(s.accuracy) == set(s.mean_per_class_recall) == {"test"}
  out = metrics.clip_benchmark_result(s, dataset="wds/x", model="m", pretrained="p")
  assert math.isnan(out["metrics"]["acc5"])


def test_clip_benchmark_result_layout():
  s = Score("a photo of a {}.", accuracy={"test": 0.5, "train": 1.0}, logprob={"test": -1.0},
            acc5={"test": 0.75}, mean_per_class_recall={"test": 0.4})
  out = metrics.clip_benchmark_result(s, dataset="wds/cars", model="ViT-B-32",
                                      pretrained="openai", templates=[s.template],
                                      class_names=["a", "b"])
  # cli.py's dump: dataset, model, pretrained, task, metrics, language (+ optional dumps).
  assert out == {"dataset": "wds/cars", "model": "ViT-B-32", "pretrained": "openai",
                 "task": "zeroshot_classification",
                 "metrics": {"acc1": 0.5, "acc5": 0.75, "mean_per_class_recall": 0.4},
                 "language": "en", "classnames": ["a", "b"], "templates": [s.template]}
  json.dumps(out, allow_nan=False)
  with pytest.raises(ValueError, match="no 'val' metrics"):
    metrics.clip_benchmark_result(s, dataset="d", model="m", pretrained="p", split="val")
  with pytest.raises(ValueError, match="too long"):
    metrics.clip_benchmark_result(Score("x", rejected="too long"), dataset="d", model="m",
                                  pretrained="p")


def test_score_metric_names_and_json():
  s = Score("t", accuracy={"test": 1.0}, acc5={"test": 1.0},
            mean_per_class_recall={"test": 0.5})
  assert [s.metric(m) for m in METRICS] == [{"test": 1.0}, {"test": 1.0}, {"test": 0.5}]
  assert s.to_json()["mean_per_class_recall"] == {"test": 0.5}
  with pytest.raises(ValueError, match="unknown metric"):
    s.metric("acc1")
  # The registry's lead metrics are Score metrics; the CLIP paper's per-class ones.
  assert {info.lead_metric for info in registry.DATASETS.values()} <= set(METRICS)
  per_class = {n for n, i in registry.DATASETS.items() if i.lead_metric != "accuracy"}
  assert per_class == {"fgvc_aircraft", "oxford_pets", "caltech101", "oxford_flowers"}


def test_a_wds_task_scores_and_writes_clip_benchmark_json(clip, tmp_path):
  """Generated CLIP_benchmark shards -> task -> image features -> scorer -> the JSON."""
  from lmbbo_jax.data import build_task
  from lmbbo_jax.evaluator import features as features_lib
  from lmbbo_jax.io import write_json
  from data_helpers import make_wds
  root = tmp_path / "wds_toy"
  make_wds(root, {"train": 2, "test": 2})
  task = build_task(f"wds:{root}", shots=1, seed=1)
  feats = features_lib.encode_task(clip, task, batch_size=4, progress=False)
  by_split, labels = features_lib.scorer_inputs(feats)
  scorer = PromptScorer(clip, by_split, labels, task.class_names, rows_per_call=8)
  scores = scorer.score([TEMPLATE, *task.dataset_templates])
  ensemble = scorer.score_ensemble([task.dataset_templates])[0]
  for s in (*scores, ensemble):
    assert s.ok and set(s.accuracy) == set(s.acc5) == set(s.mean_per_class_recall) == {
        "train", "val", "test", "train_val"}
    # 5 classes: the true class is always among the top 5.
    assert s.acc5["test"] == 1.0 and 0.0 <= s.mean_per_class_recall["test"] <= 1.0
  out = metrics.clip_benchmark_result(ensemble, dataset="wds/toy", model="test-tiny",
                                      pretrained="random", templates=task.dataset_templates)
  write_json(tmp_path / "wds_toy_random_test-tiny_en_zeroshot_classification.json", out)
  written = json.loads((tmp_path / "wds_toy_random_test-tiny_en_zeroshot_classification.json")
                       .read_text())
  assert written["metrics"] == {"acc1": ensemble.accuracy["test"], "acc5": 1.0,
                                "mean_per_class_recall": ensemble.mean_per_class_recall["test"]}
  assert written["task"] == "zeroshot_classification" and written["language"] == "en"


def confusions_reference(pred, labels, k):
  """Brute force: count every (true, predicted) error, sort by -count, true, predicted."""
  counts = {}
  for y, p in zip(labels, pred):
    if y != p:
      counts[(int(y), int(p))] = counts.get((int(y), int(p)), 0) + 1
  return [(y, p, n) for (y, p), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:k]


def test_top_confusions_match_a_brute_force_count():
  rng = np.random.default_rng(3)
  for trial in range(50):
    num = int(rng.integers(2, 12))
    labels = rng.integers(0, num, size=int(rng.integers(0, 60)))
    pred = np.where(rng.random(labels.size) < 0.5, labels, rng.integers(0, num, labels.size))
    for k in (1, 5, 100):
      assert metrics.top_confusions(pred, labels, num, k) == confusions_reference(
          pred, labels, k), (trial, k)
  assert metrics.top_confusions(np.array([1, 2]), np.array([1, 2]), 3) == []


@pytest.mark.parametrize("template,rows_per_call", [(TEMPLATE, 8), (LONG, 1)])
def test_scorer_confusions_are_exact_per_split(clip, template, rows_per_call):
  """Images whose argmax is a chosen class: the scorer's confusions (merged over calls with
  LONG) equal the numpy count of (true, predicted) errors, per split, the top 5 only; none
  for test (no feedback may read it)."""
  num = len(CLASS_NAMES)
  encoder = PackedTextEncoder(clip, CLASS_NAMES, rows_per_call=rows_per_call)
  text = text_features(clip, encoder, template)
  rng = np.random.default_rng(1)
  labels, preds, feats = {}, {}, {}
  for split, n in (("train", 40), ("val", 25), ("test", 25)):
    labels[split] = rng.integers(0, num, n)
    # Mostly a few recurring confusions, so that counts differ and ties occur.
    preds[split] = np.where(rng.random(n) < 0.3, labels[split],
                            rng.choice([1, 4, 7], size=n))
    rankings = [[p] + [c for c in rng.permutation(num).tolist() if c != p]
                for p in preds[split]]
    feats[split] = images_with_ranks(text, rankings)
  scorer = PromptScorer(clip, feats, {k: v.tolist() for k, v in labels.items()}, CLASS_NAMES,
                        text_encoder=encoder, precompile=False)
  score = scorer.score([template])[0]
  assert "test" not in score.confusions
  for split in ("train", "val"):
    assert score.accuracy[split] == pytest.approx(np.mean(preds[split] == labels[split]))
    want = confusions_reference(preds[split], labels[split], 5)
    assert len(want) == 5
    assert score.confusions[split] == want, split
  assert json.loads(json.dumps(score.to_json()))["confusions"]["train"] == [
      list(c) for c in score.confusions["train"]]
