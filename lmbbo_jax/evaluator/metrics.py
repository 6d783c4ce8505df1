"""Classification metrics from the scorer's merged per-image results, and CLIP_benchmark's
result layout (numpy only, no JAX).

The scorer's partials program gives, per template, call and image, the `TOP_K` highest
logits among the call's classes with their classes (equal logits: lowest class first) and
the true class's logit. Those are enough for exact top-1 and top-5 over all classes: every
class ranked above the true class overall is among the `TOP_K` of its own call whenever
the true class is in the overall top `TOP_K`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lmbbo_jax.evaluator.types import TOP_CONFUSIONS, Score

TOP_K = 5
# CLIP_benchmark's names (`clip_benchmark/metrics/zeroshot_classification.py`) of the
# `Score` metrics (`types.METRICS`).
CLIP_BENCHMARK_NAMES = {"accuracy": "acc1", "acc5": "acc5",
                        "mean_per_class_recall": "mean_per_class_recall"}


def top_k_hits(top: np.ndarray, top_class: np.ndarray, true: np.ndarray,
               labels: np.ndarray, k: int = TOP_K) -> np.ndarray:
  """Whether each image's true class is among its `k` highest logits.

  Args:
    top: [L, N] candidate logits (the union of every call's top `k`; -inf for none).
    top_class: [L, N] their classes.
    true: [N] the true class's logit, from the same logits (so equal values compare equal).
    labels: [N] true classes.
    k: how many of the highest count.

  Returns:
    bool [N]: fewer than `k` candidates rank above the true class (a higher logit, or an
    equal one of a lower class index).
  """
  above = (top > true[None]) | ((top == true[None]) & (top_class < labels[None]))
  return above.sum(axis=0) < k


def split_metrics(pred: np.ndarray, top_hit: np.ndarray | None, labels: np.ndarray,
                  num_classes: int) -> dict[str, float]:
  """accuracy, acc5 (when `top_hit` is given) and mean_per_class_recall of one split.

  Args:
    pred: [N] predicted classes.
    top_hit: [N] bool top-5 hits, or None (fewer than 5 classes: no acc5).
    labels: [N] true classes in 0..num_classes-1.
    num_classes: C.

  Returns:
    Metric name -> value (NaN for an empty split).
  """
  if not labels.size:
    out = {"accuracy": math.nan, "mean_per_class_recall": math.nan}
    return out | ({"acc5": math.nan} if top_hit is not None else {})
  correct = pred == labels
  hits = np.bincount(labels, weights=correct, minlength=num_classes)
  counts = np.bincount(labels, minlength=num_classes)
  present = counts > 0
  out = {"accuracy": float(correct.mean()),
         "mean_per_class_recall": float((hits[present] / counts[present]).mean())}
  if top_hit is not None:
    out["acc5"] = float(top_hit.mean())
  return out


def top_confusions(pred: np.ndarray, labels: np.ndarray, num_classes: int,
                   k: int = TOP_CONFUSIONS) -> list[tuple[int, int, int]]:
  """The `k` most frequent errors as (true class, predicted class, count), most frequent
  first; equal counts in (true, predicted) order. Exact, from the predictions alone.

  Args:
    pred: [N] predicted classes.
    labels: [N] true classes in 0..num_classes-1.
    num_classes: C.
  """
  wrong = pred != labels
  if not wrong.any():
    return []
  pairs = labels[wrong].astype(np.int64) * num_classes + pred[wrong]
  codes, counts = np.unique(pairs, return_counts=True)  # codes ascending: (true, pred) order
  top = np.argsort(-counts, kind="stable")[:k]
  return [(int(codes[i] // num_classes), int(codes[i] % num_classes), int(counts[i]))
          for i in top]


def clip_benchmark_result(score: Score, *, dataset: str, model: str, pretrained: str,
                          split: str = "test", language: str = "en",
                          templates: list[str] | None = None,
                          class_names: list[str] | None = None) -> dict[str, Any]:
  """One scored template (or ensemble) as CLIP_benchmark's result JSON (`cli.py`'s dump).

  `{"dataset", "model", "pretrained", "task": "zeroshot_classification", "metrics":
  {"acc1", "acc5", "mean_per_class_recall"}, "language"}`, plus "templates" and
  "classnames" when given (its `--dump_templates` / `--dump_classnames`). acc5 is NaN
  for fewer than 5 classes, as CLIP_benchmark writes it.

  Raises:
    ValueError: the score is rejected or has no `split`.
  """
  if not score.ok or split not in score.accuracy:
    raise ValueError(f"template {score.template!r} has no {split!r} metrics "
                     f"({score.rejected or 'split not scored'}); score it on that split")
  metrics = {CLIP_BENCHMARK_NAMES[name]: float(score.metric(name).get(split, math.nan))
             for name in CLIP_BENCHMARK_NAMES}
  out: dict[str, Any] = {"dataset": dataset, "model": model, "pretrained": pretrained,
                         "task": "zeroshot_classification", "metrics": metrics,
                         "language": language}
  if class_names is not None:
    out["classnames"] = list(class_names)
  if templates is not None:
    out["templates"] = list(templates)
  return out
